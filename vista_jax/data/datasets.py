"""From `config.data` to a built tfds sequence dataset, its example spec and its splits.

`config.data.kind` is one of:
  synthetic       -- `vista_jax.data.synthetic` (embedded default, nothing to download)
  movielens_1m    -- GroupLens ML-1M directory (`ratings.dat`, optional `movies.dat`)
  recbole_atomic  -- RecBole atomic files (`<name>.inter`, optional `<name>.item`)
  table           -- CSV/Parquet with `user,item,timestamp[,rating|label][,category]`
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import sys

import numpy as np

from vista_jax.data import loaders, synthetic
from vista_jax.data.eventlog import EventLogOptions
from vista_jax.data.examples import ExampleSpec, snapshot_positions
from vista_jax.data.tfds_builders import (
    build_sequence_dataset,
    event_log_fingerprint,
    event_log_records,
    read_sequence_dataset,
    read_sequence_metadata,
)
from vista_jax.fingerprints import config_hash

KINDS = ("synthetic", *loaders.LOADERS)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to load and how examples are cut from it (typed from `config.data`).

    Fields that do not apply to a kind keep their zero value: `synthetic` and the ranking
    fields for `kind="synthetic"`; `path`, `log_options` and the retrieval fields otherwise.
    """

    kind: str  # One of KINDS.
    history_window: int  # W: events a summary covers.
    num_recent: int  # R: raw recent events stage 2 reads.
    data_dir: str = ""  # Where built tfds datasets live ("" = <workdir>/data).
    # Ranking (synthetic):
    synthetic: synthetic.SyntheticConfig | None = None
    train_candidates: int = 0  # Candidates sampled per training request (0 = all).
    eval_every: int = 0  # Users u with u % eval_every == 0 are held out.
    # Retrieval (event logs):
    path: str = ""
    log_options: EventLogOptions | None = None
    snapshot_every: int = 0  # A cache row every S events (0 = one per user).
    num_negatives: int = 0  # Uniform negatives per training request.
    max_eval_users: int = 0  # Evaluate the first N users only (0 = all).

    @property
    def task(self) -> str:
        return "ranking" if self.kind == "synthetic" else "retrieval"


@dataclasses.dataclass(frozen=True)
class SequenceData:
    """A built per-user sequence dataset plus what examples and caches need to know of it."""

    source: object  # random access: len(source), source[user] -> record
    config: DataConfig
    spec: ExampleSpec
    num_users: int
    num_items: int
    lengths: np.ndarray  # [U] events per user
    item_category: np.ndarray  # [I+1] category of each item (0 unknown / padding)
    row_offsets: np.ndarray  # [U+1]: cache rows of user u are row_offsets[u]:row_offsets[u+1]
    fingerprint: str

    @property
    def num_categories(self) -> int:
        return int(self.item_category.max())

    @property
    def num_rows(self) -> int:
        return int(self.row_offsets[-1])

    def snapshots(self, user: int) -> np.ndarray:
        return snapshot_positions(int(self.lengths[user]), self.spec)


def build(data_cfg: DataConfig, data_dir: str | pathlib.Path) -> SequenceData:
    """Builds (or reuses) the tfds dataset named by `data_cfg` under `data_dir`.

    tfds' own messages ("Downloading and preparing ...") go to stderr: stdout is for results.
    """
    with contextlib.redirect_stdout(sys.stderr):
        path, fingerprint = _build_tfds(data_cfg, data_dir)
    return _read(data_cfg, path, fingerprint)


def _build_tfds(data_cfg: DataConfig, data_dir) -> tuple[pathlib.Path, str]:
    if data_cfg.kind == "synthetic":
        syn = data_cfg.synthetic
        fingerprint = "syn-" + config_hash(syn)
        path = build_sequence_dataset(
            "vista_synthetic",
            lambda: synthetic.iter_users(syn),
            data_dir,
            fingerprint=fingerprint,
            with_candidates=True,
            metadata={
                "num_items": synthetic.num_items(syn),
                "num_users": syn.num_users,
                "item_category": [0]
                + (synthetic.item_topic(syn, np.arange(1, synthetic.num_items(syn) + 1)) + 1)
                .astype(int)
                .tolist(),
            },
        )
    else:
        log = loaders.load_event_log(data_cfg.kind, data_cfg.path, data_cfg.log_options)
        fingerprint = event_log_fingerprint(log, kind=data_cfg.kind)
        path = build_sequence_dataset(
            "vista_event_log",
            lambda: event_log_records(log),
            data_dir,
            fingerprint=fingerprint,
            metadata={
                "num_items": log.num_items,
                "num_users": log.num_users,
                "item_category": log.item_category.tolist(),
            },
        )
    return path, fingerprint


def _read(data_cfg: DataConfig, path, fingerprint: str) -> SequenceData:
    meta = read_sequence_metadata(path)
    source = read_sequence_dataset(path)
    lengths = np.array([len(source[u]["item"]) for u in range(len(source))])
    spec = ExampleSpec(
        task=data_cfg.task,
        history_window=data_cfg.history_window,
        num_recent=data_cfg.num_recent,
        snapshot_every=data_cfg.snapshot_every,
        num_negatives=data_cfg.num_negatives,
        train_candidates=data_cfg.train_candidates,
        num_items=int(meta["num_items"]),
    )
    counts = [len(snapshot_positions(int(n), spec)) for n in lengths]
    return SequenceData(
        source=source,
        config=data_cfg,
        spec=spec,
        num_users=len(source),
        num_items=int(meta["num_items"]),
        lengths=lengths,
        item_category=np.asarray(meta["item_category"], np.int32),
        row_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        fingerprint=fingerprint,
    )

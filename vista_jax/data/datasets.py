"""From `config.data` to a built tfds sequence dataset, its example spec and its splits.

`config.data.kind` is one of:
  synthetic       -- `vista_jax.data.synthetic` (embedded default, nothing to download)
  movielens_1m    -- GroupLens ML-1M directory (`ratings.dat`, optional `movies.dat`)
  recbole_atomic  -- RecBole atomic files (`<name>.inter`, optional `<name>.item`)
  table           -- CSV/Parquet with `user,item,timestamp[,rating|label][,category]`
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from vista_jax.config import config_hash
from vista_jax.data import eventlog, synthetic
from vista_jax.data.examples import ExampleSpec, snapshot_positions
from vista_jax.data.tfds_builders import (
    build_sequence_dataset,
    event_log_fingerprint,
    event_log_records,
    read_sequence_dataset,
    read_sequence_metadata,
)


@dataclasses.dataclass(frozen=True)
class SequenceData:
    """A built per-user sequence dataset plus what examples and caches need to know of it."""

    source: object  # random access: len(source), source[user] -> record
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


def synthetic_config(data_cfg) -> synthetic.SyntheticConfig:
    return synthetic.SyntheticConfig(
        num_users=data_cfg.num_users,
        history_len=data_cfg.history_len,
        num_candidates=data_cfg.num_candidates,
        num_recent=data_cfg.num_recent,
        seed=data_cfg.seed,
    )


def build(data_cfg, data_dir: str | pathlib.Path) -> SequenceData:
    """Builds (or reuses) the tfds dataset named by `data_cfg` under `data_dir`."""
    if data_cfg.kind == "synthetic":
        syn = synthetic_config(data_cfg)
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
        task = "ranking"
    else:
        log = eventlog.load_event_log(data_cfg.kind, data_cfg.path)
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
        task = "retrieval"
    meta = read_sequence_metadata(path)
    source = read_sequence_dataset(path)
    lengths = np.array([len(source[u]["item"]) for u in range(len(source))])
    spec = ExampleSpec(
        task=task,
        history_window=data_cfg.history_window,
        num_recent=data_cfg.num_recent,
        snapshot_every=data_cfg.get("snapshot_every", 0),
        num_negatives=data_cfg.get("num_negatives", 128),
        train_candidates=data_cfg.get("train_candidates", 0),
        num_items=int(meta["num_items"]),
    )
    counts = [len(snapshot_positions(int(n), spec)) for n in lengths]
    return SequenceData(
        source=source,
        spec=spec,
        num_users=len(source),
        num_items=int(meta["num_items"]),
        lengths=lengths,
        item_category=np.asarray(meta["item_category"], np.int32),
        row_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        fingerprint=fingerprint,
    )

"""From `config.data` to a built tfds sequence dataset, its example spec and its splits.

`config.data.kind` is one of:
  synthetic       -- `vista_jax.data.synthetic` (embedded default, nothing to download)
  movielens_1m    -- GroupLens ML-1M directory (`ratings.dat`, optional `movies.dat`)
  recbole_atomic  -- RecBole atomic files (`<name>.inter`, optional `<name>.item`)
  table           -- CSV/Parquet with `user,item,timestamp[,rating|label][,category]`

An event log may get `delta_path`: a table of new events appended to it (`data.delta`).

`config.data.task` is `ranking` (synthetic: one request after each history; event logs: every
event is a request whose one candidate is its item, labelled by the `label` column or
`rating >= positive_rating`, split by time) or `retrieval` (event logs, leave-one-out).
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import sys

import numpy as np

from vista_jax.data import delta, loaders, synthetic
from vista_jax.data.eventlog import EventLogOptions
from vista_jax.data.examples import EVENT_SPLITS, ExampleSpec, event_requests, snapshot_positions
from vista_jax.data.tfds_builders import (
    build_sequence_dataset,
    event_log_fingerprint,
    event_log_records,
    read_sequence_dataset,
    read_sequence_metadata,
)
from vista_jax.errors import DataError
from vista_jax.fingerprints import config_hash

KINDS = ("synthetic", *loaders.LOADERS)
TASKS = ("ranking", "retrieval")
SPLITS = ("global_time", "per_user")  # How event-log ranking requests are split.


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to load and how examples are cut from it (typed from `config.data`).

    Fields that do not apply to a kind keep their zero value: `synthetic` and the ranking
    fields for `kind="synthetic"`; `path`, `log_options` and the retrieval fields otherwise.
    """

    kind: str  # One of KINDS.
    history_window: int  # W: events a summary (or a baseline's raw history) covers.
    num_recent: int  # R: raw recent events stage 2 reads.
    data_dir: str = ""  # Where built tfds datasets live ("" = <workdir>/data).
    task: str = ""  # One of TASKS; "" = ranking for synthetic data, retrieval for event logs.
    # Ranking (synthetic):
    synthetic: synthetic.SyntheticConfig | None = None
    train_candidates: int = 0  # Candidates sampled per training request (0 = all).
    eval_every: int = 0  # Users u with u % eval_every == 0 are held out.
    # Event logs (both tasks):
    path: str = ""
    # New events appended to the log at `path` (a CSV/Parquet table, `vista_jax.data.delta`):
    # every stage then reads the merged log; `--mode=refresh_cache` folds it into the cache.
    delta_path: str = ""
    log_options: EventLogOptions | None = None
    snapshot_every: int = 0  # A cache row every S events (0 = one per user).
    max_eval_users: int = 0  # Evaluate the requests of the first N users only (0 = all).
    summary_lag: int = 0  # Staleness ablation: events the summary lags (ExampleSpec).
    # Retrieval (event logs):
    num_negatives: int = 0  # Uniform negatives per training request.
    # Ranking (event logs): label = `label` column, else rating >= positive_rating.
    positive_rating: float = 4.0
    split: str = "global_time"  # One of SPLITS (docs/PROTOCOLS.md §2).
    valid_fraction: float = 0.1  # Share of events in the validation split.
    test_fraction: float = 0.1  # Share of events in the test split (the latest ones).

    def __post_init__(self):
        if not self.task:
            object.__setattr__(self, "task", "ranking" if self.kind == "synthetic" else "retrieval")

    @property
    def every_event(self) -> bool:
        """Event-log ranking: every event is a request (synthetic has one per user)."""
        return self.task == "ranking" and self.kind != "synthetic"


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
    # Event-log ranking only: user u's events [0, b0) train, [b0, b1) validate, [b1, n) test.
    split_bounds: np.ndarray | None = None  # int64 [U, 2]

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
        if data_cfg.delta_path:  # the log one file holding both would give
            new = delta.load(data_cfg.delta_path, data_cfg.log_options)
            log = delta.append(log, new, data_cfg.delta_path, data_cfg.log_options)
        labels = None
        settings = {"kind": data_cfg.kind}
        if data_cfg.task == "ranking":
            labels = event_labels(log, data_cfg)
            settings |= {"task": "ranking", "positive_rating": data_cfg.positive_rating}
        fingerprint = event_log_fingerprint(log, **settings)
        path = build_sequence_dataset(
            "vista_event_log",
            lambda: event_log_records(log, labels),
            data_dir,
            fingerprint=fingerprint,
            with_labels=labels is not None,
            metadata={
                "num_items": log.num_items,
                "num_users": log.num_users,
                "item_category": log.item_category.tolist(),
            },
        )
    return path, fingerprint


def event_labels(log, data_cfg: DataConfig) -> np.ndarray:
    """Binary label of every event (float32 [N]): the `label` column, else rating >= threshold.

    `data_cfg.positive_rating` was checked against the rating scale at the config boundary.
    """
    if log.label is not None:
        return np.asarray(log.label, np.float32)
    if log.rating is not None:
        return (np.asarray(log.rating) >= data_cfg.positive_rating).astype(np.float32)
    raise DataError(
        f"{data_cfg.path}: the ranking task needs a label for every event, but the log has "
        "neither a `label` column (0/1) nor a `rating` column (label = rating >= "
        f"data.positive_rating, here {data_cfg.positive_rating:g}). Fix: add one of the two "
        "columns, or run the retrieval task (--config.data.task=retrieval)."
    )


def _read(data_cfg: DataConfig, path, fingerprint: str) -> SequenceData:
    meta = read_sequence_metadata(path)
    source = read_sequence_dataset(path)
    records = [source[u] for u in range(len(source))]
    lengths = np.array([len(r["item"]) for r in records])
    bounds = None
    if data_cfg.every_event:
        bounds = split_bounds([r["time"] for r in records], data_cfg)
        _check_splits(lengths, bounds, data_cfg)
    spec = ExampleSpec(
        task=data_cfg.task,
        requests="every_event" if data_cfg.every_event else "after_history",
        history_window=data_cfg.history_window,
        num_recent=data_cfg.num_recent,
        snapshot_every=data_cfg.snapshot_every,
        num_negatives=data_cfg.num_negatives,
        train_candidates=data_cfg.train_candidates,
        num_items=int(meta["num_items"]),
        summary_lag=data_cfg.summary_lag,
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
        split_bounds=bounds,
    )


def split_bounds(times: list[np.ndarray], data_cfg: DataConfig) -> np.ndarray:
    """[U, 2] first validation and first test position of each user's (time-sorted) events.

    `global_time`: the cutoffs are the times of the events that start the last
    `test_fraction` and the `valid_fraction` before it, over all events; an event at or after
    a cutoff time is on its far side, so events sharing a timestamp never straddle it.
    `per_user`: each user's last round(test_fraction * n) events test, the
    round(valid_fraction * n) before them validation (rounded half up).
    """
    if data_cfg.split == "per_user":
        n = np.array([len(t) for t in times], np.int64)
        n_test = np.floor(n * data_cfg.test_fraction + 0.5).astype(np.int64)
        n_valid = np.floor(n * data_cfg.valid_fraction + 0.5).astype(np.int64)
        return np.stack([n - n_test - n_valid, n - n_test], 1).clip(0)
    every = np.sort(np.concatenate(times))
    total = len(every)
    first_test = total - int(np.floor(total * data_cfg.test_fraction + 0.5))
    first_valid = first_test - int(np.floor(total * data_cfg.valid_fraction + 0.5))
    # An empty side (a fraction rounding to no event) gets a cutoff after the last event.
    after_last = (every[-1] + 1) if total else 0
    cut = [every[max(i, 0)] if i < total else after_last for i in (first_valid, first_test)]
    return np.array(
        [[np.searchsorted(t, c, side="left") for c in cut] for t in times], np.int64
    ).reshape(-1, 2)


def _check_splits(lengths: np.ndarray, bounds: np.ndarray, data_cfg: DataConfig) -> None:
    """Refuses a split with no request, naming the counts and what to change."""
    counts = dict(zip(EVENT_SPLITS, (len(event_requests(lengths, bounds, s)) for s in EVENT_SPLITS),
                      strict=True))  # fmt: skip
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise DataError(
            f"{data_cfg.path}: the {data_cfg.split} split of {int(lengths.sum())} events leaves "
            f"the {' and '.join(empty)} split(s) empty (requests per split: {counts}; "
            f"valid_fraction={data_cfg.valid_fraction}, test_fraction={data_cfg.test_fraction}). "
            "A global time cutoff puts every event that shares the cutoff's timestamp on its "
            "later side. Fix: use a log with more events or distinct timestamps, raise "
            "--config.data.valid_fraction / test_fraction, or try --config.data.split=per_user."
        )

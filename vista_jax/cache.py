"""The summary cache of a workdir: what names it, how rows are built, how examples join it.

A cache row holds the summary of one (user, snapshot): rows of user u are
`data.row_offsets[u]:data.row_offsets[u+1]`, one per snapshot position. Beside each summary
the store may keep each summarizer layer's QLA state and the time of the last covered event,
so a refresh folds in only new events (`vista_jax.models.incremental`). The cache is named by
a hash of the summarizer config *and* the data it indexes; readers refuse another hash.
"""

from __future__ import annotations

import itertools
import pathlib
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from vista_jax.config import SummarizerConfig
from vista_jax.data import examples as ex
from vista_jax.data.datasets import SequenceData
from vista_jax.fingerprints import config_hash
from vista_jax.models import qla
from vista_jax.quantize import decode
from vista_jax.store import NO_EVENTS, UNKNOWN_TIME, RowBlock, SummaryStore, SummaryStoreError

LAST_TIME = "last_time"  # Extra array [rows] int64: time of the last covered event.


def cache_root(workdir, root: str = "") -> str:
    """The store root of a workdir's cache: `root` (config key ``cache.root``: a path, URL or
    kvstore spec JSON, e.g. an S3 bucket) when given, else ``<workdir>/cache``."""
    return root or str(pathlib.Path(workdir).absolute() / "cache")


def cache_hash(scfg: SummarizerConfig, data: SequenceData) -> str:
    """Names the summarizer *and* the data the cache rows index."""
    return config_hash({"summarizer": scfg, "data": data.fingerprint, "spec": data.spec})


def open_cache(
    workdir,
    scfg: SummarizerConfig,
    data: SequenceData,
    version: str | None = None,
    root: str = "",
) -> SummaryStore:
    """The current version (or `version`) of the cache at `cache_root(workdir, root)`;
    refuses one built by another summarizer or data."""
    return SummaryStore.open(
        cache_root(workdir, root), expected_config_hash=cache_hash(scfg, data), version=version
    )


def trained_on(store: SummaryStore) -> dict:
    """What a downstream checkpoint records of the cache it trains on (its `meta` item):
    the version, its config hash (serving checks it) and its lineage (`SummaryStore.lineage`)."""
    return {
        "cache_version": store.version,
        "config_hash": store.manifest["config_hash"],
        "cache_lineage": store.lineage,
    }


def require_version(store: SummaryStore, trained_on: str | None, model: str) -> None:
    """A cache-fed model is evaluated on the cache version it was trained on, or refused."""
    if trained_on is not None and trained_on != store.version:
        raise SummaryStoreError(
            f"{model} was trained on cache version {trained_on!r} but the current version "
            f"is {store.version!r}. Fix: retrain it on the current cache (delete its "
            "checkpoint directory, then --mode=train_ranker)"
        )


def with_summaries(store: SummaryStore) -> Callable[[dict], dict]:
    """Host-side batch transform: cached summaries for each example's snapshot row."""

    def add(batch):
        read = store.read(batch["row"])
        if np.any(read.present & (read.coverage != batch["snapshot"])):
            raise SummaryStoreError(
                "cache rows cover other events than the examples' snapshots: the cache was "
                "built with another snapshot schedule. Fix: rebuild it (--mode=build_cache)"
            )
        return batch | {"summary": read.summaries, "summary_mask": read.present}

    return add


# -- point in time by event time --------------------------------------------------------------
EVENT_FIELDS = ("item", "action", "time", "category")


class AsOf(NamedTuple):
    """What a request at time t may know of a user: a cached snapshot, then raw events."""

    row: int  # the snapshot's cache row; -1 when no stored row covers only events before t
    summary: np.ndarray  # [K, D] float32 (zeros when row is -1)
    covered: int  # the snapshot covers the user's first `covered` events (0 when row is -1)
    event_time: int  # time of the last event it covers (NO_EVENTS: none)
    since: dict[str, np.ndarray]  # EVENT_FIELDS of events [covered, first at or after t)


def as_of(store: SummaryStore, data: SequenceData, user: int, t: int) -> AsOf:
    """The newest snapshot of `user` covering only events before time `t` (its event_time
    stamp < t), plus the user's events since it that are still before t.

    Events at time t itself are never seen: a request at t must not see its own label, nor
    events tied with it. Refuses a version whose rows carry no event time (format < 4).
    """
    rows = np.arange(data.row_offsets[user], data.row_offsets[user + 1])
    stored = store.read_quantized(rows)
    if np.any(stored.event_time[stored.present] == UNKNOWN_TIME):
        raise SummaryStoreError(
            f"cache version {store.version!r} has rows without an event-time stamp (built "
            "before stamps, or by a writer that gave none), so it cannot answer as-of reads. "
            "Fix: rebuild the cache (--mode=build_cache)"
        )
    record = data.source[user]
    before = int(np.searchsorted(record["time"], t, side="left"))  # events with time < t
    usable = np.flatnonzero(stored.present & (stored.event_time < t))
    j = usable[np.argmax(stored.coverage[usable])] if len(usable) else None
    covered = int(stored.coverage[j]) if j is not None else 0
    if covered > before:
        raise SummaryStoreError(
            f"cache row {int(rows[j])} of user {user} covers {covered} events, but only "
            f"{before} are before its stamp: the cache indexes other data. Fix: rebuild it "
            "(--mode=build_cache)"
        )
    since = {f: np.asarray(record[f])[covered:before] for f in EVENT_FIELDS}
    if j is None:
        return AsOf(-1, np.zeros((store.k, store.d), np.float32), 0, NO_EVENTS, since)
    scale = None if stored.scale is None else stored.scale[j]
    summary = decode(stored.values[j], scale)
    return AsOf(int(rows[j]), summary, covered, int(stored.event_time[j]), since)


# -- building rows ----------------------------------------------------------------------------
def keeps_states(data: SequenceData) -> bool:
    """States extend exactly only if the summary window holds the whole prefix (synthetic);
    with a sliding window (ML-1M's 200 events) a refresh recomputes the window instead."""
    last_snapshot = max(int(data.snapshots(u)[-1]) for u in range(data.num_users))
    return last_snapshot <= data.spec.history_window


def snapshot_rows(
    data: SequenceData, rows: range | None = None
) -> Iterator[tuple[int, int, int, dict]]:
    """(row id, snapshot, last covered time, summarizer input) per row (of `rows` only, when
    given: a process's share of a multi-host build); each record read once."""
    rows = range(data.num_rows) if rows is None else rows
    first_user = int(np.searchsorted(data.row_offsets, rows.start, side="right")) - 1
    for u in range(max(first_user, 0), data.num_users):
        if data.row_offsets[u] >= rows.stop:
            break
        record = data.source[u]
        gaps = ex.user_gaps(record, data.spec.num_gap_buckets)
        for j, s in enumerate(data.snapshots(u)):
            if int(data.row_offsets[u]) + j not in rows:
                continue
            last_time = record["time"][s - 1] if s else 0
            yield (
                data.row_offsets[u] + j,
                s,
                last_time,
                ex.history_arrays(record, gaps, s, data.spec),
            )


def summarize_fn(summarizer) -> Callable[[dict], tuple]:
    """`summarize(hist) -> (summary [B,K,D], per-layer states or None)`: the frozen
    summarizer, jitted, over the `hist_*` fields of `ex.history_arrays` (stacked)."""
    graphdef, params = nnx.split(summarizer)

    @jax.jit
    def summarize(params, hist):
        valid = jnp.arange(hist["hist_item"].shape[1])[None] < hist["hist_len"][:, None]
        model = nnx.merge(graphdef, params)
        summary, aux = model(
            hist["hist_item"],
            hist["hist_action"],
            hist["hist_gap"],
            valid,
            category=hist["hist_category"],
        )
        return summary, aux["states"]

    return lambda hist: summarize(params, hist)


def row_event_times(last_time, coverage) -> np.ndarray:
    """The store's event_time stamp of rows: their last covered event's time, NO_EVENTS for
    a row covering none."""
    return np.where(np.asarray(coverage) > 0, np.asarray(last_time, np.int64), NO_EVENTS)


def row_blocks(
    data: SequenceData, summarize: Callable, batch_size: int, rows: range | None = None
) -> Iterator[RowBlock]:
    """Summarizes every row (or those of `rows`) in fixed-shape batches;
    `summarize(hist) -> (summary, states)`. Shows one progress bar on stderr."""
    total = data.num_rows if rows is None else len(rows)
    todo = snapshot_rows(data, rows)
    return summarize_blocks(todo, summarize, batch_size, total, keeps_states(data))


def summarize_blocks(
    todo: Iterator[tuple[int, int, int, dict]],
    summarize: Callable,
    batch_size: int,
    total: int,
    with_states: bool,
    desc: str = "build_cache",
) -> Iterator[RowBlock]:
    """`RowBlock`s of the `(row id, snapshot, last covered time, summarizer input)` tuples of
    `todo` (as `snapshot_rows` yields them), summarized `batch_size` at a time, padded to one
    shape (one compile); with the per-layer states and `last_time` as extras if
    `with_states`. Shows one progress bar of `total` rows on stderr."""
    with tqdm.tqdm(total=total, desc=desc, unit="row", file=sys.stderr) as bar:
        while chunk := list(itertools.islice(todo, batch_size)):
            row_ids, coverage, last_time, hists = zip(*chunk, strict=True)
            n = len(chunk)
            hist = {
                k: np.pad(v, [(0, batch_size - n)] + [(0, 0)] * (v.ndim - 1))
                for k, v in ex.stack(hists).items()
            }
            summary, states = summarize(hist)
            extras = None
            if with_states and states is not None:
                extras = {k: v[:n] for k, v in states_to_arrays(states).items()}
                extras[LAST_TIME] = np.array(last_time, np.int64)
            bar.update(n)
            yield RowBlock(
                np.array(row_ids),
                np.asarray(summary)[:n],
                np.array(coverage, np.int64),
                extras,
                row_event_times(last_time, coverage),
            )


# -- per-layer states <-> store arrays --------------------------------------------------------
def state_names(layer: int) -> tuple[str, str]:
    """Store array names of one layer's state: (kv sum, count)."""
    return f"state_l{layer}_kv", f"state_l{layer}_count"


def states_to_arrays(states) -> dict[str, np.ndarray]:
    """Per-layer states -> {"state_l{i}_kv": [B,H,E,E] f32, "state_l{i}_count": [B] f32}."""
    arrays = {}
    for i, state in enumerate(states):
        kv_name, count_name = state_names(i)
        arrays[kv_name] = np.asarray(state.kv_sum, np.float32)
        arrays[count_name] = np.asarray(state.count, np.float32)
    return arrays


def arrays_to_states(arrays: Mapping[str, np.ndarray], num_layers: int) -> list[qla.QLAState]:
    """Inverse of `states_to_arrays`; a missing layer is an error naming what is there."""
    states = []
    for i in range(num_layers):
        kv_name, count_name = state_names(i)
        if kv_name not in arrays or count_name not in arrays:
            raise SummaryStoreError(
                f"stored states lack layer {i} ({kv_name!r}, {count_name!r}); have "
                f"{sorted(arrays)}. Fix: rebuild the cache with the {num_layers}-layer "
                "summarizer (--mode=build_cache)"
            )
        kv = np.asarray(arrays[kv_name], np.float32)
        states.append(qla.QLAState(kv, np.asarray(arrays[count_name], np.float32)))
    return states


def read_states(store, row_ids, num_layers: int) -> tuple[list[qla.QLAState], np.ndarray]:
    """Per-layer states and `last_time` of rows from a `SummaryStore` version."""
    names = [n for i in range(num_layers) for n in state_names(i)]
    arrays = {name: store.read_extra(name, row_ids) for name in names}
    return arrays_to_states(arrays, num_layers), store.read_extra(LAST_TIME, row_ids)

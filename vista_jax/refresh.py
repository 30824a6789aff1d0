"""Refresh in place: fold an event-log delta into the current cache version.

  python run.py --config=... --workdir=W --mode=refresh_cache --config.data.delta_path=D

`config.data.path` is the log the current version was built from and `D` a table of new
events (`vista_jax.data.delta`); every stage run with the same `delta_path` reads the merged
log, whose fingerprint is that of one file holding both. The refresh:

1. finds which users the delta touches (their event count grew) and, for each of them,
   which snapshot rows of the merged log are new: a snapshot at a position the old log had
   covers the same events and is carried; every untouched user's rows are carried;
2. computes the new rows. Where summaries cover whole histories (`cache.keeps_states`, and the
   parent stores per-layer QLA states), it folds events [c, s) into the stored states of the
   user's newest old snapshot c <= s (`models.incremental.update`, the first gap from the
   stored `last_time`): exact, O(new events). Where the window slides (ML-1M's 200 events),
   it recomputes the window of each new row from the merged events;
3. publishes a refresh version (`SummaryStore.write_refresh`) that writes those rows alone
   and references the parent's attempts for every carried row, with the parent's summarizer
   (restored from the checkpoint and step the parent names) and lineage naming the parent and
   the delta. CURRENT moves by compare-and-swap from the parent.

A rerun after a kill republishes the same version id (parent and delta name it) or finds it
published; a rerun after success finds CURRENT already indexes the merged log and does
nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sys
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vista_jax import cache, checkpoints
from vista_jax.config import ExperimentConfig
from vista_jax.data import datasets, delta
from vista_jax.data import examples as ex
from vista_jax.data.datasets import SequenceData
from vista_jax.errors import ConfigError
from vista_jax.models import incremental
from vista_jax.models.summarizer import Summarizer
from vista_jax.store import NO_EVENTS, RowBlock, SummaryStore, SummaryStoreError

MIN_FOLD_WIDTH = 8  # new-event arrays are padded to a power of two >= this: few compiles


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class RowPlan(NamedTuple):
    """Which rows of the merged log's cache a refresh carries and which it computes."""

    parent_row: np.ndarray  # [rows] int64: the parent row each row carries, -1: computed
    written_rows: np.ndarray  # [T] ascending: the computed rows
    user: np.ndarray  # [T] user of each computed row
    snapshot: np.ndarray  # [T] events it covers (its snapshot position)
    base_row: np.ndarray  # [T] parent row of the user's newest old snapshot <= it (-1: none)
    base_coverage: np.ndarray  # [T] that snapshot's position (0 when none)
    touched: np.ndarray  # users whose event count grew


def plan_rows(base: SequenceData, merged: SequenceData) -> RowPlan:
    """Carries every row whose (user, snapshot position) the old log had; plans the rest."""
    if merged.num_users != base.num_users or np.any(merged.lengths < base.lengths):
        raise SummaryStoreError(
            "the merged log does not extend the base log user by user. Fix: rebuild the cache "
            "(--mode=build_cache)"
        )  # delta.append guarantees this; a bug otherwise
    counts = np.diff(merged.row_offsets)
    user_of_row = np.repeat(np.arange(merged.num_users), counts)
    j = np.arange(merged.num_rows) - merged.row_offsets[user_of_row]
    touched = np.flatnonzero(merged.lengths != base.lengths)
    untouched = (merged.lengths == base.lengths)[user_of_row]
    parent_row = np.full(merged.num_rows, -1, np.int64)
    parent_row[untouched] = base.row_offsets[user_of_row[untouched]] + j[untouched]
    planned = []
    for u in touched.tolist():
        old, new = base.snapshots(u), merged.snapshots(u)
        i = np.searchsorted(old, new, side="right") - 1  # newest old snapshot <= each new one
        same = (i >= 0) & (old[i.clip(0)] == new)
        rows = merged.row_offsets[u] + np.arange(len(new))
        parent_row[rows[same]] = base.row_offsets[u] + i[same]
        for row, s, k in zip(rows[~same], new[~same], i[~same], strict=True):
            base_row = base.row_offsets[u] + k if k >= 0 else -1
            planned.append((row, u, s, base_row, old[k] if k >= 0 else 0))
    columns = np.array(planned, np.int64).reshape(-1, 5).T
    return RowPlan(parent_row, *columns, touched)


# -- computing the planned rows ---------------------------------------------------------------
def _records(data: SequenceData, users) -> dict[int, dict]:
    return {u: data.source[u] for u in sorted(set(np.asarray(users).tolist()))}


def recompute_blocks(plan: RowPlan, merged: SequenceData, summarize, batch_size: int):
    """The planned rows from their windows of the merged events, by the cache build's own
    batching (`cache.summarize_blocks`)."""
    records = _records(merged, plan.user)
    gaps = {u: ex.user_gaps(r, merged.spec.num_gap_buckets) for u, r in records.items()}
    last_times = _last_times(records, plan.user, plan.snapshot)
    todo = (
        (row, s, t, ex.history_arrays(records[u], gaps[u], s, merged.spec))
        for row, u, s, t in zip(plan.written_rows.tolist(), plan.user.tolist(),
                                plan.snapshot.tolist(), last_times.tolist(), strict=True)
    )  # fmt: skip
    return cache.summarize_blocks(
        todo, summarize, batch_size, len(plan.written_rows), with_states=False, desc="refresh"
    )


def fold_fn(summarizer: Summarizer):
    """`fold(states, item, action, gap, valid, category) -> (summary, states)`, jitted."""
    graphdef, params = nnx.split(summarizer)

    @jax.jit
    def fold(params, states, item, action, gap, valid, category):
        model = nnx.merge(graphdef, params)
        states, summary = incremental.update(model, states, item, action, gap, valid, category)
        return summary, states

    return lambda *args: fold(params, *args)


def fold_blocks(
    plan: RowPlan, merged: SequenceData, parent: SummaryStore, fold, num_layers: int,
    batch_size: int,
) -> Iterator[RowBlock]:  # fmt: skip
    """The planned rows by folding events [c, s) into the stored states of snapshot c."""
    records = _records(merged, plan.user)
    for lo in range(0, len(plan.written_rows), batch_size):
        part = slice(lo, lo + batch_size)
        users, snaps = plan.user[part], plan.snapshot[part]
        base_rows, starts = plan.base_row[part], plan.base_coverage[part]
        n = len(users)
        states, last_time = cache.read_states(parent, base_rows.clip(0), num_layers)
        has_base = base_rows >= 0
        states = [s._replace(kv_sum=s.kv_sum * has_base[:, None, None, None],
                             count=s.count * has_base) for s in states]  # fmt: skip
        last_time = np.where(has_base, last_time, 0)
        width = max(MIN_FOLD_WIDTH, 1 << int(max(1, (snaps - starts).max()) - 1).bit_length())
        events = {f: np.zeros((batch_size, width), np.int64)
                  for f in ("item", "action", "time", "category")}  # fmt: skip
        valid = np.zeros((batch_size, width), bool)
        for r, (u, c, s) in enumerate(zip(users.tolist(), starts.tolist(), snaps.tolist(),
                                          strict=True)):  # fmt: skip
            for f in events:
                events[f][r, : s - c] = records[u][f][c:s]
            valid[r, : s - c] = True
        gap = incremental.incremental_gaps(
            _pad(last_time, batch_size), _pad(starts > 0, batch_size), events["time"], valid,
            merged.spec.num_gap_buckets,
        )  # fmt: skip
        states = [s._replace(kv_sum=_pad(s.kv_sum, batch_size), count=_pad(s.count, batch_size))
                  for s in states]  # fmt: skip
        summary, new_states = fold(
            states, *(jnp.asarray(events[f], jnp.int32) for f in ("item", "action")),
            jnp.asarray(gap), jnp.asarray(valid), jnp.asarray(events["category"], jnp.int32),
        )  # fmt: skip
        extras = {k: v[:n] for k, v in cache.states_to_arrays(new_states).items()}
        new_last = _last_times(records, users, snaps)
        extras[cache.LAST_TIME] = new_last
        yield RowBlock(
            plan.written_rows[part], np.asarray(summary)[:n], snaps, extras,
            cache.row_event_times(new_last, snaps),
        )  # fmt: skip


def _pad(x, size: int) -> np.ndarray:
    x = np.asarray(x)
    return np.pad(x, [(0, size - len(x))] + [(0, 0)] * (x.ndim - 1))


def _last_times(records, users, snaps) -> np.ndarray:
    """Time of the last event each row covers (0 for a row covering none), as the build
    stores in `last_time`."""
    return np.array([records[u]["time"][s - 1] if s else 0
                     for u, s in zip(users.tolist(), snaps.tolist(), strict=True)],
                    np.int64)  # fmt: skip


# -- the stage ---------------------------------------------------------------------------------
def refresh_cache(config: ExperimentConfig, workdir, merged: SequenceData) -> dict:
    """Folds `config.data.delta_path` into the current cache version; returns the published
    manifest (or the current one, when it already indexes the merged log)."""
    data_cfg = config.data
    if data_cfg.kind == "synthetic" or not data_cfg.delta_path:
        raise ConfigError(
            "--mode=refresh_cache folds an event-log delta into the cache, and needs "
            "--config.data.delta_path=<CSV or Parquet of new events> on an event-log config "
            f"(data.kind={data_cfg.kind!r}). Fix: pass the delta, or rebuild "
            "(--mode=build_cache)"
        )
    data_dir = data_cfg.data_dir or pathlib.Path(workdir) / "data"
    base = datasets.build(dataclasses.replace(data_cfg, delta_path=""), data_dir)
    scfg = config.summarizer_for(merged)
    root = cache.cache_root(workdir, config.cache.root)
    parent = SummaryStore.open(root)  # CURRENT
    new_hash = cache.cache_hash(scfg, merged)
    if parent.manifest["config_hash"] == new_hash:
        _log(f"[refresh_cache] CURRENT ({parent.version}) already indexes the merged log")
        return parent.manifest
    if parent.manifest["config_hash"] != cache.cache_hash(scfg, base):
        raise SummaryStoreError(
            f"the current cache version {parent.version!r} was not built from "
            f"--config.data.path={data_cfg.path} with this summarizer config, so the delta "
            "cannot be folded into it. Fix: point data.path at the log the current version "
            "indexes (after a refresh: the merged log), or rebuild (--mode=build_cache)"
        )
    plan = plan_rows(base, merged)
    manifest = parent.manifest
    summarizer = Summarizer(scfg, nnx.Rngs(0))
    step = checkpoints.restore_module(
        manifest["summarizer_checkpoint"], "summarizer", summarizer,
        step=manifest["summarizer_step"],
    )  # fmt: skip
    keep_states = cache.keeps_states(merged) and bool(parent.extra_names)
    if keep_states:
        blocks = fold_blocks(plan, merged, parent, fold_fn(summarizer), scfg.num_layers,
                             config.cache.batch_size)  # fmt: skip
    else:
        blocks = recompute_blocks(plan, merged, cache.summarize_fn(summarizer),
                                  config.cache.batch_size)  # fmt: skip
    delta_fp = delta.fingerprint(data_cfg.delta_path)
    tag = hashlib.sha256(f"{parent.version}\n{delta_fp}".encode()).hexdigest()[:12]
    newest = max((int(merged.source[u]["time"][-1]) for u in plan.touched.tolist()),
                 default=NO_EVENTS)  # fmt: skip
    result = SummaryStore.write_refresh(
        root, parent=parent.version, version=f"v{step:08d}-r{tag}", rows=blocks,
        written_rows=plan.written_rows, parent_row=plan.parent_row, config_hash=new_hash,
        data_fingerprint=merged.fingerprint, delta_fingerprint=delta_fp,
        watermark=max(parent.watermark or NO_EVENTS, newest), with_extras=keep_states,
        chunk_rows=config.cache.chunk_rows,
        coverage_info={"kind": "event_position", "rows": "one per (user, snapshot)"},
    )  # fmt: skip
    how = "folded into stored states" if keep_states else "recomputed windows"
    _log(
        f"[refresh_cache] published {result['version']} from {parent.version}: "
        f"{len(plan.touched)} users touched, {len(plan.written_rows)} of {merged.num_rows} "
        f"rows written ({how}); CURRENT is {result.current}"
    )
    return result

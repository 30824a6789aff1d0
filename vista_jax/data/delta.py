"""An event-log delta: new events of users already in a log, appended after their history.

`--config.data.delta_path` names a CSV or Parquet table in the `table` format
(`vista_jax.data.loaders.table`: columns user, item, timestamp, the base log's rating or
label column, optionally category), whatever format the base log has. Ids are the base log's
raw ids. `append` validates it against the base `EventLog` and returns the log a full load of
one file holding both would give (same dense ids, order, duplicates handling, fingerprint):

- every user and item must already be in the base log (a new item would renumber the items
  and has no embedding; a new user, no cache row), and categories must agree;
- every event must be at or after its user's last base event (an earlier one would change
  events the stored summaries already cover); ties go after the base events, as file order
  would put them;
- the feedback columns must be the base log's (rating, or label, or neither).

Every problem is a `DeltaError` (a `DataError`) that names the delta file and ends "Fix: ...".
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib

import numpy as np

from vista_jax.data import loaders
from vista_jax.data.eventlog import EventLog, EventLogOptions, from_columns
from vista_jax.errors import DataError


class DeltaError(DataError):
    """An event-log delta that cannot be folded into the log it extends."""


def load(path: str, options: EventLogOptions) -> EventLog:
    """Reads and validates the delta table (missing file, bad columns: the table loader's
    errors, which name the file)."""
    return loaders.load_event_log("table", path, options)


def fingerprint(path: str) -> str:
    """A hash of the delta file's bytes: a version's lineage names the delta it folded in."""
    digest = hashlib.sha256()
    with open(pathlib.Path(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def append(base: EventLog, delta: EventLog, path: str, options: EventLogOptions) -> EventLog:
    """The base log with the delta's events appended (see the module docstring)."""
    _check_feedback(base, delta, path)
    user = _base_ids(base.raw_user_ids, delta.raw_user_ids[delta.user], "user", path)
    item = _base_ids(base.raw_item_ids[1:], delta.raw_item_ids[delta.item], "item", path) + 1
    _check_times(base, user, delta.time, path)
    category = None
    if base.num_categories or delta.num_categories:
        names = np.array(["", *base.category_names[1:]], object)
        delta_names = np.array(["", *delta.category_names[1:]], object)[delta.category]
        from_base = names[base.item_category[item]]  # a delta without categories
        delta_names = np.where(delta_names == "", from_base, delta_names)
        category = np.concatenate([names[base.category], delta_names])
    feedback = {}
    for name in ("rating", "label"):
        if getattr(base, name) is not None:
            feedback[name] = np.concatenate([getattr(base, name), getattr(delta, name)])
    return from_columns(
        base.raw_user_ids[np.concatenate([base.user, user])],
        base.raw_item_ids[np.concatenate([base.item, item])],
        np.concatenate([base.time, delta.time]),
        category=category,
        source=f"{path} (appended to the base log)",
        options=dataclasses.replace(options, time_unit="s"),  # both already in seconds
        **feedback,
    )


def _check_feedback(base: EventLog, delta: EventLog, path: str) -> None:
    have = [n for n in ("rating", "label") if getattr(base, n) is not None]
    got = [n for n in ("rating", "label") if getattr(delta, n) is not None]
    if have != got:
        raise DeltaError(
            f"{path}: the delta has feedback column(s) {got or 'none'}, the base log "
            f"{have or 'none'}. Fix: give the delta the same columns as the base log "
            f"(user,item,timestamp{''.join(',' + n for n in have)}[,category])"
        )


def _base_ids(base_raw: np.ndarray, delta_raw: np.ndarray, what: str, path: str) -> np.ndarray:
    """Dense base ids (0-based in `base_raw`) of the delta's raw ids; refuses unknown ones."""
    keys = np.asarray(base_raw).astype(str)
    order = np.argsort(keys)
    wanted = np.asarray(delta_raw).astype(str)
    at = np.searchsorted(keys[order], wanted).clip(0, max(len(keys) - 1, 0))
    found = len(keys) > 0
    known = keys[order][at] == wanted if found else np.zeros(len(wanted), bool)
    if not known.all():
        unknown = sorted(set(wanted[~known].tolist()))
        fix = (
            "a refresh folds new events of known users; a new user needs a rebuild "
            "(--mode=build_cache on the concatenated log)"
            if what == "user"
            else "the summarizer has no embedding for a new item: retrain "
            "(--mode=train_source, then build_cache) on the concatenated log"
        )
        raise DeltaError(
            f"{path}: {len(unknown)} {what}(s) not in the base log, e.g. {unknown[:5]}. "
            f"Fix: drop them from the delta, or {fix}"
        )
    return order[at].astype(np.int64)


def _check_times(base: EventLog, user: np.ndarray, time: np.ndarray, path: str) -> None:
    """Each delta event must be at or after its user's last base event."""
    offsets = base.user_offsets
    counts = np.diff(offsets)
    last = np.where(counts > 0, base.time[np.maximum(offsets[1:] - 1, 0)], np.iinfo(np.int64).min)
    early = np.flatnonzero(time < last[user])
    if len(early):
        i = int(early[0])
        raise DeltaError(
            f"{path}: {len(early)} event(s) predate their user's last event in the base log, "
            f"e.g. user {base.raw_user_ids[user[i]]!r} at time {int(time[i])} (seconds), before "
            f"its last stored event at {int(last[user[i]])}. A refresh only appends events. "
            "Fix: drop the late events, or rebuild the cache on the merged log "
            "(--mode=build_cache)"
        )

"""Rows of per-user event windows for the sequential encoders (SASRec, HSTU, VISTA retriever).

Two tasks. Retrieval (`leave_one_out`, the HSTU protocol, docs/PROTOCOLS.md §1), below; and
event ranking (`event_ranking`, §2: every event a request, scored at every position of
overlapping rows), at the end of this file.

Per user, events sorted by time: the last is the test target, the second to last the
validation target, the rest train. Rows are LEFT aligned windows of at most W events (padding
id 0 after the last event), as the reference's `DatasetV2(chronological=True)` builds them.

* train row (one per user, fixed across epochs): the most recent W + 1 training events
  e_0..e_W; inputs e_0..e_{W-1}, and position t is supervised by e_{t+1} (`target`, 0 where
  unsupervised). With `train_on_valid` (the reference setting: it trains on all but the last
  event) the validation item is the last training event.
* valid / test request: inputs are the W events before the target; `target` [U] is the item,
  `length` [U] the number of inputs; the answer is read at position length - 1.

With `prefix_len` P > 0 every row also holds `prefix` [P]: the most recent P events *before*
its window (left aligned, 0 = padding), for models that summarize the lifelong history (the
VISTA retriever); the window models never read it.

HSTU's relative time bias at position t uses `next_time[t]`, the time of the event t predicts
(for a request's last position: the target's timestamp, as the reference does).
Times are int32 seconds since the earliest event of the log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from vista_jax.data import examples
from vista_jax.data.features import gap_buckets
from vista_jax.errors import DataError

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class SequenceSplits:
    train: Batch  # item, time, next_time, target: int32 [U, W]
    valid: Batch  # item, time, next_time: [U', W]; target, length, user: [U']
    test: Batch
    num_items: int
    window: int


def user_sequences(log) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets [U+1], item [N], time [N]) of an `EventLog` (already sorted per user)."""
    return log.user_offsets, np.asarray(log.item), np.asarray(log.time, np.int64)


def _left_aligned(values: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros(width, np.int32)
    out[: len(values)] = values
    return out


def _prefix(item, start: int, prefix_len: int) -> Batch:
    """The last `prefix_len` events before `start` (nothing when prefix_len is 0)."""
    if not prefix_len:
        return {}
    return {"prefix": _left_aligned(item[max(0, start - prefix_len) : start], prefix_len)}


def _train_row(item, time, end: int, window: int, prefix_len: int = 0) -> Batch:
    """Events [max(0, end - W - 1), end): inputs all but the last, targets all but the first."""
    start = max(0, end - window - 1)
    seg_item, seg_time = item[start:end], time[start:end]
    return _prefix(item, start, prefix_len) | {
        "item": _left_aligned(seg_item[:-1], window),
        "time": _left_aligned(seg_time[:-1], window),
        "next_time": _left_aligned(seg_time[1:], window),
        "target": _left_aligned(seg_item[1:], window),
    }


def _request_row(item, time, t: int, window: int, prefix_len: int = 0) -> Batch:
    """Predict event t from the W events before it."""
    start = max(0, t - window)
    next_time = np.append(time[start + 1 : t], time[t])
    return _prefix(item, start, prefix_len) | {
        "item": _left_aligned(item[start:t], window),
        "time": _left_aligned(time[start:t], window),
        "next_time": _left_aligned(next_time, window),
        "target": np.int32(item[t]),
        "length": np.int32(t - start),
    }


def _stack(rows: list[Batch]) -> Batch:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def leave_one_out(
    offsets,
    item,
    time,
    num_items: int,
    window: int = 200,
    train_on_valid: bool = False,
    prefix_len: int = 0,
) -> SequenceSplits:
    """Rows of the users that `examples.retrieval_requests` splits (>= 3 events).

    The validation and test requests are its (user, n-2) and (user, n-1) pairs; a user's train
    row holds the events before the held-out validation target (the test target with
    `train_on_valid`), when they give at least one supervised position. Raises `DataError`
    when no user has 3 events.
    """
    time = np.asarray(time, np.int64)
    time = (time - time.min()).astype(np.int32) if len(time) else time.astype(np.int32)
    lengths = np.diff(np.asarray(offsets, np.int64))
    pairs = {split: examples.retrieval_requests(lengths, split) for split in ("valid", "test")}
    rows = {"train": [], "valid": [], "test": []}
    for u, t in pairs["test" if train_on_valid else "valid"]:
        if t >= 2:  # The train row stops before t: events [0, t) give t - 1 targets.
            lo = int(offsets[u])
            rows["train"].append(_train_row(item[lo:], time[lo:], t, window, prefix_len))
    for split in ("valid", "test"):
        for u, t in pairs[split]:
            lo = int(offsets[u])
            row = _request_row(item[lo:], time[lo:], t, window, prefix_len)
            rows[split].append(row | {"user": np.int32(u)})
    splits = {k: _stack(v) for k, v in rows.items()}
    return SequenceSplits(**splits, num_items=num_items, window=window)


def from_event_log(
    log, window: int = 200, train_on_valid: bool = False, prefix_len: int = 0
) -> SequenceSplits:
    offsets, item, time = user_sequences(log)
    return leave_one_out(offsets, item, time, log.num_items, window, train_on_valid, prefix_len)


# -- ranking: every event a request, every position of a row scored --------------------------
def ranking_row_starts(n: int, window: int) -> list[tuple[int, int]]:
    """(start a, first supervised position) of each row of a user with n events.

    Position p of a row reads events [a, a + p] and scores event a + p + 1. Row 0 (a = 0)
    scores events 1..W; row k >= 1 starts at a = k * W/2 and scores only its last W/2
    positions, events (a + W/2, a + W]: every event from 1 on is scored in exactly one row,
    with at least W/2 events of the window before it (all of them in row 0).
    """
    half = window // 2
    starts = [(0, 0)]
    while starts[-1][0] + window < n - 1:  # Events after the last row's last target remain.
        starts.append((starts[-1][0] + half, window - half))
    return starts


def event_ranking(
    log, labels: np.ndarray, bounds: np.ndarray, window: int = 200, prefix_len: int = 0
) -> SequenceSplits:
    """Rows for the event ranking task, scored at every position (docs/PROTOCOLS.md §2).

    Every event t >= 1 of a user is a request: its item is the candidate (`target` at the
    position before it, 0 where a position scores nothing of this split), `labels[event]` its
    label (`label`, float32), and the events before it are the history (the row's window up
    to it, and `prefix`, the P events before the window). `bounds[u] = (b0, b1)` split user
    u's events as `examples.event_requests` does: [0, b0) train, [b0, b1) valid, [b1, n) test.
    A user's first event (no history at all) is no request here. Rows (`ranking_row_starts`)
    overlap by W/2 so every scored event has at least W/2 events of window before it; a split
    holds the rows that score any of its events. Each row also carries, per input event,
    `action` (its rating action id: a history event's label is known), `gap` (the log2 bucket
    of the time since the user's previous event, `features.gap_buckets`) and `category` (0 =
    unknown), the same for the prefix (`prefix_action`, `prefix_gap`, `prefix_category`), the
    candidate's `target_category`, and the row's `user` and `start`.
    """
    offsets, item, time = user_sequences(log)
    gap = gap_buckets(time, offsets)
    time = (time - time.min()).astype(np.int32) if len(time) else time.astype(np.int32)
    action = np.asarray(log.action, np.int32)
    category = np.asarray(log.category, np.int32)
    labels = np.asarray(labels, np.float32)
    rows = {"train": [], "valid": [], "test": []}
    for u in range(len(offsets) - 1):
        lo, hi = int(offsets[u]), int(offsets[u + 1])
        n, (b0, b1) = hi - lo, (int(b) for b in bounds[u])
        events = {"item": item, "time": time, "action": action, "gap": gap, "category": category}
        events = {name: x[lo:hi] for name, x in events.items()}
        for a, first in ranking_row_starts(n, window):
            end = min(n, a + window + 1)  # Inputs [a, end - 1), scored events [a + 1, end).
            scored = np.arange(a + 1, end)
            row = {name: _left_aligned(x[a : end - 1], window) for name, x in events.items()}
            row |= {
                "next_time": _left_aligned(events["time"][a + 1 : end], window),
                "user": np.int32(u),
                "start": np.int32(a),  # Position p scores the user's event start + p + 1.
            }
            if prefix_len:  # The P events before the window (left aligned).
                p0 = max(0, a - prefix_len)
                row |= {
                    "prefix" if name == "item" else f"prefix_{name}": _left_aligned(
                        events[name][p0:a], prefix_len
                    )
                    for name in ("item", "action", "gap", "category")
                }
            label = _left_aligned(labels[lo:hi][a + 1 : end], window).astype(np.float32)
            in_row = np.arange(len(scored)) >= first
            for split, (s0, s1) in zip(rows, ((0, b0), (b0, b1), (b1, n)), strict=True):
                mine = in_row & (scored >= s0) & (scored < s1)
                if mine.any():
                    target = {
                        name: _left_aligned(np.where(mine, events[x][a + 1 : end], 0), window)
                        for name, x in (("target", "item"), ("target_category", "category"))
                    }
                    rows[split].append(row | target | {"label": label})
    empty = [k for k, v in rows.items() if not v]
    if empty:
        raise DataError(
            f"the ranking split leaves no {' and no '.join(empty)} request (a user's first "
            "event is never one). Fix: use a log with more events per user, or other split "
            "fractions"
        )
    splits = {k: _stack(v) for k, v in rows.items()}
    return SequenceSplits(**splits, num_items=log.num_items, window=window)


def _padded(split: Batch, rows: np.ndarray, batch_size: int) -> Batch:
    """Rows `rows` of a split, padded with all-zero rows to `batch_size` (static shapes)."""
    out = {}
    for k, v in split.items():
        chunk = v[rows]
        pad = np.zeros((batch_size - len(rows),) + v.shape[1:], v.dtype)
        out[k] = np.concatenate([chunk, pad]) if len(pad) else chunk
    return out


def train_batches(split: Batch, batch_size: int, rng: np.random.Generator) -> Iterator[Batch]:
    """One epoch: rows shuffled; the last batch is padded with empty rows (no supervision)."""
    order = rng.permutation(len(split["item"]))
    for start in range(0, len(order), batch_size):
        yield _padded(split, order[start : start + batch_size], batch_size)


def bucketed_capacity(count: int, full: int, buckets: int) -> int:
    """`count` rounded up to a multiple of full / buckets, at most `full`: a static size
    (rows, positions) that takes few distinct values, so few shapes are compiled."""
    step = -(-full // buckets)
    return min(full, max(step, -(-count // step) * step))


def packed_rows_capacity(num_rows: int, batch_size: int) -> int:
    """Rows of a packed batch: `num_rows` rounded up to a multiple of batch_size / 16."""
    return bucketed_capacity(num_rows, batch_size, 16)


def pack_rows(batch: Batch, capacity: int | None = None) -> Batch:
    """Several users' left-aligned rows packed into one window row each, first fit decreasing.

    A row of n events (`item > 0`) fills n consecutive slots of a packed row; `segment` [R, W]
    numbers the users of a packed row 1, 2, ... (0 = padding) and the encoders mask attention
    across segments and read positions from segment starts, so every supervised position sees
    exactly what it saw unpacked, and the loss covers the same positions: the reference's
    jagged batches, with static shapes. On ML-1M, 128 rows pack into about 74. Every key must
    be per position ([B, W]); the result has `capacity` rows (default: the rows needed,
    rounded by `packed_rows_capacity`). Raises ValueError when the rows do not fit.
    """
    per_row = {k for k, v in batch.items() if v.shape[:2] != batch["item"].shape}
    if per_row:
        raise ValueError(
            f"pack_rows: {sorted(per_row)} are not per-position [B, W] arrays; only the "
            "window rows of retrieval training can be packed (prefix, summaries and request "
            "fields cannot). Fix: pack only `item`, `time`, `next_time`, `target` rows"
        )
    width = batch["item"].shape[1]
    lengths = np.sum(batch["item"] > 0, axis=1)
    bins: list[list[int]] = []  # Row indices per packed row.
    room: list[int] = []
    for r in np.argsort(-lengths, kind="stable"):
        if lengths[r] == 0:
            break
        fit = next((i for i, free in enumerate(room) if free >= lengths[r]), None)
        if fit is None:
            bins.append([])
            room.append(width)
            fit = len(bins) - 1
        bins[fit].append(int(r))
        room[fit] -= int(lengths[r])
    size = len(bins)
    capacity = packed_rows_capacity(size, len(lengths)) if capacity is None else capacity
    if size > capacity:
        raise ValueError(f"pack_rows: {size} packed rows do not fit in capacity {capacity}")
    out = {k: np.zeros((capacity, width), v.dtype) for k, v in batch.items()}
    out["segment"] = np.zeros((capacity, width), np.int32)
    for i, rows in enumerate(bins):
        at = 0
        for s, r in enumerate(rows, start=1):
            n = int(lengths[r])
            for k, v in batch.items():
                out[k][i, at : at + n] = v[r, :n]
            out["segment"][i, at : at + n] = s
            at += n
    return out


def eval_batches(split: Batch, batch_size: int) -> Iterator[tuple[Batch, int]]:
    """(batch, number of real rows) in order; the last batch is padded."""
    n = len(split["item"])
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(n, start + batch_size))
        yield _padded(split, rows, batch_size), len(rows)

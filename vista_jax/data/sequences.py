"""Leave-one-out sequences for SASRec/HSTU retrieval (the HSTU protocol, docs/PROTOCOLS.md §1).

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


def eval_batches(split: Batch, batch_size: int) -> Iterator[tuple[Batch, int]]:
    """(batch, number of real rows) in order; the last batch is padded."""
    n = len(split["item"])
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(n, start + batch_size))
        yield _padded(split, rows, batch_size), len(rows)

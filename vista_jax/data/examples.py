"""Point-in-time examples from per-user sequence records (see docs/ARCHITECTURE.md).

An example at request position t (events [0, t) happened before it) joins the newest
*snapshot* s <= t (s <= t - lag in the staleness ablation, `ExampleSpec.summary_lag`): the
summary covers only events [max(0, s - W), s), never the example's own
label. The last R events before t (fresher than the snapshot) go to stage 2 raw. Snapshots sit
at fixed positions per user, so the cache holds one row per (user, snapshot) and both the
source model (which summarizes on the fly) and a cache-fed ranker see exactly the same inputs.

Three kinds of request:
  * `ranking`, `after_history` (synthetic): one request per user after its whole history, C
                labelled candidates; the snapshot covers the history up to the last R events.
  * `ranking`, `every_event` (event logs): every event t is a request whose one candidate is
                its item, with its label; the split is by time (`event_requests`).
  * `retrieval` (HSTU leave-one-out protocol): request t predicts the item at t; training
                requests are t in [1, n-3], validation n-2, test n-1.

A `live` spec (the raw-history baselines: full target attention, SIM-hard, TWIN) puts the
snapshot at the request itself, so `hist_*` holds the W events right before the request.
Examples built `with_history=False` (a cache-fed model's training stream) carry no `hist_*`
at all: the long-history window is sliced only for the models that read it
(`request_inputs`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vista_jax.data.features import NUM_GAP_BUCKETS, gap_buckets
from vista_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
    task: str  # "ranking" or "retrieval"
    history_window: int  # W: events a summary covers (bounded by the data, not the model).
    num_recent: int  # R
    requests: str = "after_history"  # Ranking: "after_history" (synthetic) or "every_event".
    live: bool = False  # The snapshot is the request itself (raw-history models, no cache).
    snapshot_every: int = 0  # Retrieval: a snapshot every S events (0 = only at the end).
    num_negatives: int = 128  # Retrieval training: uniform negatives per request.
    train_candidates: int = 0  # Ranking training: candidates sampled per request (0 = all).
    num_items: int = 0
    num_gap_buckets: int = NUM_GAP_BUCKETS
    # Staleness ablation (0 = the freshest summary): a request at t reads the newest
    # snapshot at or before t - lag; the synthetic one-request-per-user snapshot moves from
    # n - R to n - R - lag. The recent window is never stale.
    summary_lag: int = 0


def user_gaps(record, num_gap_buckets: int) -> np.ndarray:
    time = np.asarray(record["time"])
    return gap_buckets(time, np.array([0, len(time)]), num_gap_buckets).astype(np.int32)


def window_gaps(record, start: int, end: int, num_gap_buckets: int) -> np.ndarray:
    """`user_gaps(record)[start:end]` from events [start - 1, end) alone: O(end - start)."""
    lead = min(start, 1)  # The event before the window sets the first event's gap.
    time = np.asarray(record["time"][start - lead : end])
    return gap_buckets(time, np.array([0, len(time)]), num_gap_buckets)[lead:].astype(np.int32)


def snapshot_positions(n: int, spec: ExampleSpec) -> np.ndarray:
    """Snapshot positions of a user with n events (ascending; a row of the cache each)."""
    if spec.task == "ranking" and spec.requests == "after_history":
        return np.array([max(0, n - spec.num_recent - spec.summary_lag)])
    if spec.task == "ranking":  # Every event is a request: a snapshot every S events.
        return np.arange(0, max(n, 1), spec.snapshot_every or max(n, 1))
    # Retrieval: every S events, and one at n-2 so validation/test join the freshest summary.
    step = spec.snapshot_every or max(n, 1)
    return np.unique(np.concatenate([np.arange(0, n - 1, step), [max(n - 2, 0)]]))


def snapshot_for(t: int, positions: np.ndarray, lag: int = 0) -> int:
    """Index of the newest snapshot at or before request position t - lag (the first
    snapshot when none is that old)."""
    return max(0, int(np.searchsorted(positions, t - lag, side="right") - 1))


def _window(x, start, end, width, dtype=np.int32):
    out = np.zeros((width,), dtype)
    seg = np.asarray(x[max(start, end - width) : end])
    out[: len(seg)] = seg
    return out


def history_arrays(record, gaps, s: int, spec: ExampleSpec) -> dict[str, np.ndarray]:
    """The summarizer's input for the snapshot at s: events [max(0, s-W), s), left aligned."""
    w = spec.history_window
    start = max(0, s - w)
    return {
        "hist_item": _window(record["item"], start, s, w),
        "hist_action": _window(record["action"], start, s, w),
        "hist_gap": _window(gaps, start, s, w),
        "hist_category": _window(record["category"], start, s, w),
        "hist_len": np.int32(s - start),
    }


def recent_arrays(record, t: int, spec: ExampleSpec) -> dict[str, np.ndarray]:
    """Stage 2's raw events: the last R before t, left aligned. Reads only events [t-R-1, t),
    so a record holding a user's last R + 1 events gives the same arrays (serving)."""
    r = spec.num_recent
    start = max(0, t - r)
    gaps = window_gaps(record, start, t, spec.num_gap_buckets)
    return {
        "recent_item": _window(record["item"], start, t, r),
        "recent_action": _window(record["action"], start, t, r),
        "recent_gap": _window(gaps, 0, t - start, r),
        "recent_category": _window(record["category"], start, t, r),
        "recent_len": np.int32(t - start),
    }


def request_inputs(
    record, spec: ExampleSpec, row: int, s: int, t: int, with_history: bool
) -> dict[str, np.ndarray]:
    """What every request at t carries: its ids, the summarizer's window for the snapshot at s
    (`hist_*`, only `with_history`) and the last R raw events before t.

    The one switch between the two kinds of reader: models that summarize or attend to the
    raw history (the source model, the `live` baselines) need `hist_*`; a cache-fed model
    must not read it (`with_history=False`: no event before the recent window is sliced).
    """
    ex = {"user": np.int32(record["user"]), "row": np.int32(row), "snapshot": np.int64(s)}
    if with_history:
        ex |= history_arrays(record, user_gaps(record, spec.num_gap_buckets), s, spec)
    return ex | recent_arrays(record, t, spec)


def ranking_example(
    record,
    spec: ExampleSpec,
    row: int,
    item_category: np.ndarray,
    rng=None,
    with_history: bool = True,
) -> dict[str, np.ndarray]:
    """Synthetic request after the history: snapshot at n - R (minus `spec.summary_lag`),
    recent = the last R events.

    With an rng (training), `spec.train_candidates` of the request's candidates are sampled,
    so repeated passes over a user see different candidates. `with_history=False` leaves out
    the summarizer's window (`hist_*`): a cache-fed model reads the cache row instead.
    """
    n = len(record["item"])
    s = n if spec.live else int(snapshot_positions(n, spec)[0])
    ex = request_inputs(record, spec, row, s, n, with_history)
    keep = slice(None)
    if rng is not None and spec.train_candidates:
        keep = rng.choice(len(record["cand_item"]), spec.train_candidates, replace=False)
    ex["cand_item"] = np.asarray(record["cand_item"], np.int32)[keep]
    ex["cand_category"] = item_category[ex["cand_item"]].astype(np.int32)
    ex["cand_label"] = np.asarray(record["cand_label"], np.float32)[keep]
    ex["cand_mask"] = np.ones_like(ex["cand_label"], bool)
    if "cand_prob" in record:
        ex["cand_prob"] = np.asarray(record["cand_prob"], np.float32)[keep]
    return ex


def _joined_snapshot(record, spec: ExampleSpec, t: int, row_offset: int) -> tuple[int, int]:
    """(cache row, snapshot position) a request at t reads; live: (-1, t), no cache row."""
    if spec.live:
        return -1, t
    positions = snapshot_positions(len(record["item"]), spec)
    idx = snapshot_for(t, positions, spec.summary_lag)
    return row_offset + idx, int(positions[idx])


def event_example(
    record,
    spec: ExampleSpec,
    t: int,
    row_offset: int,
    item_category: np.ndarray,
    with_history: bool = True,
) -> dict[str, np.ndarray]:
    """Event-log ranking request at position t: one candidate, the item at t, with its label.

    The history is the user's events strictly before t (the summary up to the joined
    snapshot, the last R raw); the event's own action (its rating) is never an input.
    `with_history=False` leaves out the summarizer's window, as in `ranking_example`.
    """
    row, s = _joined_snapshot(record, spec, t, row_offset)
    item = np.asarray(record["item"][t : t + 1], np.int32)
    ex = request_inputs(record, spec, row, s, t, with_history)
    ex["cand_item"] = item
    ex["cand_category"] = item_category[item].astype(np.int32)
    ex["cand_label"] = np.asarray(record["label"][t : t + 1], np.float32)
    ex["cand_mask"] = np.ones(1, bool)
    return ex


EVENT_SPLITS = ("train", "valid", "test")


def event_requests(lengths: np.ndarray, bounds: np.ndarray, split: str) -> np.ndarray:
    """(user, t) pairs of an event-log ranking split, int64 [P, 2], in user then time order.

    `bounds[u] = (b0, b1)`: user u's events [0, b0) are training requests, [b0, b1)
    validation and [b1, n) test (see `datasets.split_bounds`).
    """
    if split not in EVENT_SPLITS:
        raise ValueError(f"split {split!r} is not one of {EVENT_SPLITS}")
    lengths = np.asarray(lengths, np.int64)
    edges = np.concatenate([np.zeros((len(lengths), 1), np.int64), bounds, lengths[:, None]], 1)
    col = EVENT_SPLITS.index(split)
    start, stop = edges[:, col], np.maximum(edges[:, col + 1], edges[:, col])
    counts = stop - start
    user = np.repeat(np.arange(len(lengths)), counts)
    first = np.cumsum(counts) - counts
    t = np.arange(len(user)) - np.repeat(first, counts) + np.repeat(start, counts)
    return np.stack([user, t], 1).astype(np.int64)


def retrieval_example(
    record,
    spec: ExampleSpec,
    t: int,
    row_offset: int,
    item_category: np.ndarray,
    rng: np.random.Generator | None,
    with_history: bool = True,
) -> dict[str, np.ndarray]:
    """Request at position t: predict item t. With an rng, add uniform negatives (training).

    `with_history=False` leaves out the summarizer's window (`hist_*`), as in
    `ranking_example`. Evaluation requests (no rng) carry `seen_item`, the protocol's history
    window (the W events before t), which scoring excludes from the ranking.
    """
    row, s = _joined_snapshot(record, spec, t, row_offset)
    target = np.int32(record["item"][t])
    ex = request_inputs(record, spec, row, s, t, with_history) | {"target_item": target}
    if rng is None:
        w = spec.history_window
        ex["seen_item"] = _window(record["item"], max(0, t - w), t, w)
    else:
        negatives = rng.integers(1, spec.num_items + 1, spec.num_negatives).astype(np.int32)
        ex["cand_item"] = np.concatenate([[target], negatives]).astype(np.int32)
        ex["cand_category"] = item_category[ex["cand_item"]].astype(np.int32)
        ex["cand_label"] = (ex["cand_item"] == target).astype(np.float32)
        ex["cand_mask"] = np.concatenate([[True], negatives != target])
    return ex


MIN_EVENTS = 3  # Leave-one-out: the last event is the test target, the one before validation.
SPLITS = ("train", "valid", "test")


def retrieval_requests(lengths: np.ndarray, split: str) -> np.ndarray:
    """(user, t) pairs of a split under leave-one-out, int64 [P, 2].

    A user with n events has training requests t in [1, n-3], the validation request n-2 and
    the test request n-1. Users with fewer than `MIN_EVENTS` (3) events cannot be split and are
    left out of every split (training included), so pairs are not indexed by user: pair `i` is
    `(user, t)`, not user `i`. Raises `DataError` when the split would be empty.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    lengths = np.asarray(lengths, np.int64)
    users = np.flatnonzero(lengths >= MIN_EVENTS)
    if not len(users):
        raise DataError(
            f"the event log has {len(lengths)} user(s) but none with at least {MIN_EVENTS} "
            f"events (longest: {int(lengths.max(initial=0))}); leave-one-out needs >= "
            f"{MIN_EVENTS} events per user (train, validation and test targets), and shorter "
            "users are left out. Fix: use a log with longer user histories (more events per "
            "user, e.g. a longer time span)."
        )
    if split == "valid":
        return np.stack([users, lengths[users] - 2], 1)
    if split == "test":
        return np.stack([users, lengths[users] - 1], 1)
    counts = lengths[users] - 3  # Training requests t = 1 .. n-3 of each user.
    if not counts.sum():
        raise DataError(
            f"the event log has {len(lengths)} user(s), {len(users)} with >= {MIN_EVENTS} events, "
            f"but no training request: leave-one-out trains on positions 1..n-3, so a user needs "
            f">= {MIN_EVENTS + 1} events to contribute one. Fix: use a log with longer user "
            "histories."
        )
    user = np.repeat(users, counts)
    starts = np.cumsum(counts) - counts  # First pair of each user.
    t = np.arange(len(user)) - np.repeat(starts, counts) + 1
    return np.stack([user, t], 1).astype(np.int64)


def stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}

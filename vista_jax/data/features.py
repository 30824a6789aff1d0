"""The event-feature vocabulary shared by the data and every model: actions and time gaps.

A leaf module (numpy only, nothing from vista_jax), so that both `vista_jax.config` and
`vista_jax.data` can import it. It is the one place these vocabularies and their defaults live:

  * action ids: 0 is padding; ratings map to 1..MAX_RATING_ACTION, binary labels to 1 (0) and
    2 (1), events without feedback to IMPLICIT_ACTION; NUM_ACTIONS leaves headroom above;
  * gap buckets: log2 bucket of the time since the user's previous event, NUM_GAP_BUCKETS of
    them (see `gap_buckets`).
"""

from __future__ import annotations

import numpy as np

MAX_RATING_ACTION = 5  # Ratings map onto action ids 1..5.
NUM_ACTIONS = 8  # Action ids used: 0 pad, ratings 1..5, labels 1..2; the rest is headroom.
NUM_GAP_BUCKETS = 16  # log2 buckets of the gap to the previous event (see `gap_buckets`).
RATING_SCALE = (1.0, 5.0)  # Default (lowest, highest) rating of a log.
IMPLICIT_ACTION = 1  # Action of an event with neither rating nor label.


def rating_actions(rating: np.ndarray, scale: tuple[float, float] = RATING_SCALE) -> np.ndarray:
    """Action ids 1..MAX_RATING_ACTION of ratings on `scale`, int32.

    The scale is mapped linearly onto 1..MAX_RATING_ACTION and rounded half up, so on the
    default 1..5 scale an action is the rating itself and 4.5 stars count as 5.
    """
    low, high = (float(v) for v in scale)
    steps = (np.asarray(rating, np.float64) - low) / (high - low) * (MAX_RATING_ACTION - 1)
    return np.clip(np.floor(steps + 0.5) + 1, 1, MAX_RATING_ACTION).astype(np.int32)


def label_actions(label: np.ndarray) -> np.ndarray:
    """Action ids of binary labels: 1 for label 0, 2 for label 1; int32."""
    return np.asarray(label).astype(np.int32) + 1


def actions(
    rating: np.ndarray | None,
    label: np.ndarray | None,
    n: int,
    rating_scale: tuple[float, float] = RATING_SCALE,
) -> np.ndarray:
    """Action id of each of n events from its rating, else its label, else IMPLICIT_ACTION."""
    if rating is not None:
        return rating_actions(rating, rating_scale)
    if label is not None:
        return label_actions(label)
    return np.full(n, IMPLICIT_ACTION, np.int32)


def gap_buckets(
    time: np.ndarray, user_offsets: np.ndarray, num_buckets: int = NUM_GAP_BUCKETS
) -> np.ndarray:
    """Log2 bucket of the gap to the user's previous event, int32 [N].

    Bucket 0 marks a user's first event; otherwise `1 + floor(log2(1 + gap_seconds))`, clipped
    to `num_buckets - 1`. It depends only on event times, never on when it is read, so cached
    summaries stay exact under incremental updates.
    """
    time = np.asarray(time, np.int64)
    gap = np.diff(time, prepend=time[:1] if len(time) else time)
    # frexp(x) = (m, e) with x = m * 2**e and m in [0.5, 1): floor(log2(x)) = e - 1 exactly.
    _, exponent = np.frexp(1.0 + np.maximum(gap, 0).astype(np.float64))
    buckets = np.minimum(exponent, num_buckets - 1).astype(np.int32)
    starts = np.asarray(user_offsets[:-1])
    buckets[starts[starts < len(time)]] = 0
    return buckets


__all__ = [
    "IMPLICIT_ACTION",
    "MAX_RATING_ACTION",
    "NUM_ACTIONS",
    "NUM_GAP_BUCKETS",
    "RATING_SCALE",
    "actions",
    "gap_buckets",
    "label_actions",
    "rating_actions",
]

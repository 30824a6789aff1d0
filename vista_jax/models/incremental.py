"""Exact incremental summaries: continue a user's stored per-layer QLA states with new events.

Because history attention is causal and the seeds sit in the target slot, a user's summary
is a function of the per-layer states `(sum of k v^T, count)` alone. Folding new events into
stored states with the chunked form and reading the seeds out again gives the same summary as
recomputing the whole history (up to float summation order), at a cost of O(new events):

  states, summary = update(summarizer, stored_states, new_item, new_action, new_gap, valid)

The cache keeps, beside each summary, the states as named arrays and the time of the last
covered event (`vista_jax.cache.states_to_arrays`, `LAST_TIME`), because the gap feature of
the first new event is measured from it (`incremental_gaps`).
"""

from __future__ import annotations

import jax
import numpy as np

from vista_jax.data.features import NUM_GAP_BUCKETS, gap_buckets
from vista_jax.models import qla
from vista_jax.models.summarizer import Summarizer


def update(
    summarizer: Summarizer,
    states,
    new_item,
    new_action,
    new_gap,
    new_valid,
    new_category=None,
    remat: bool = False,
) -> tuple[list[qla.QLAState], jax.Array]:
    """Folds new events [B, N] into stored per-layer states; returns (new states, summary).

    Padding (`new_valid` False) is skipped exactly, so users with different numbers of new
    events share one batch. Equal to recomputing from scratch over old + new events.
    """
    states = summarizer.history_states(
        new_item, new_action, new_gap, new_valid, states=states, form="chunked", remat=remat,
        category=new_category,
    )  # fmt: skip
    return states, summarizer.readout(states)


def incremental_gaps(
    last_time_B, has_history_B, new_time_BxN, new_valid_BxN, num_buckets: int = NUM_GAP_BUCKETS
) -> np.ndarray:
    """Gap buckets [B, N] of new events, the first measured from the last stored event.

    Users without a stored event (`has_history_B` False, e.g. `states[0].count == 0`) start a
    new history: their first new event gets bucket 0, exactly as in a from-scratch build.
    Valid new events must be time-sorted within each row; padding gets bucket 0.
    """
    last = np.asarray(last_time_B, np.int64)
    times, valid = np.asarray(new_time_BxN, np.int64), np.asarray(new_valid_BxN, bool)
    has = np.asarray(has_history_B, bool)
    n_new = valid.sum(axis=1)
    lengths = n_new + has  # each user's stream: [last stored time], new times
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    prefix_rows = np.repeat(has, lengths) & _is_first(offsets, int(offsets[-1]))
    flat = np.empty(int(offsets[-1]), np.int64)
    flat[prefix_rows] = last[has]
    flat[~prefix_rows] = times[valid]
    buckets = gap_buckets(flat, offsets, num_buckets)[~prefix_rows]
    out = np.zeros(times.shape, np.int32)
    out[valid] = buckets
    return out


def _is_first(offsets: np.ndarray, total: int) -> np.ndarray:
    first = np.zeros(total, bool)
    starts = offsets[:-1][offsets[:-1] < total]
    first[starts] = True
    return first


def last_event_time(last_time_B, new_time_BxN, new_valid_BxN) -> np.ndarray:
    """The stored `last_time` after appending the valid new events (unchanged if none)."""
    times = np.where(new_valid_BxN, np.asarray(new_time_BxN, np.int64), np.iinfo(np.int64).min)
    return np.maximum(np.asarray(last_time_B, np.int64), times.max(axis=1, initial=-1))


# ------------------------------------------------------------------------------ store arrays

"""Exact incremental summaries: continue a user's stored per-layer QLA states with new events.

Because history attention is causal and the seeds sit in the target slot, a user's summary
is a function of the per-layer states `(sum of k v^T, count)` alone. Folding new events into
stored states with the chunked form and reading the seeds out again gives the same summary as
recomputing the whole history (up to float summation order), at a cost of O(new events):

  states, summary = update(summarizer, stored_states, new_item, new_action, new_gap, valid)

The store keeps, beside each summary, the states as named per-user arrays
(`states_to_arrays`) and the time of the last covered event (`LAST_TIME`), because the gap
feature of the first new event is measured from it (`incremental_gaps`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from vista_jax.data.eventlog import NUM_GAP_BUCKETS, gap_buckets
from vista_jax.models import qla
from vista_jax.models.summarizer import Summarizer

LAST_TIME = "last_time"  # Extra store array [U] int64: time of the last covered event.


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
            raise KeyError(
                f"stored states lack layer {i} ({kv_name!r}, {count_name!r}); have "
                f"{sorted(arrays)}. Was the cache built by a summarizer with {num_layers} layers?"
            )
        kv = np.asarray(arrays[kv_name], np.float32)
        states.append(qla.QLAState(kv, np.asarray(arrays[count_name], np.float32)))
    return states


def read_states(store, user_ids, num_layers: int) -> tuple[list[qla.QLAState], np.ndarray]:
    """Per-layer states and `last_time` of users from a `SummaryStore` version."""
    names = [n for i in range(num_layers) for n in state_names(i)]
    arrays = {name: store.read_extra(name, user_ids) for name in names}
    return arrays_to_states(arrays, num_layers), store.read_extra(LAST_TIME, user_ids)

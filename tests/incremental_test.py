"""Folding new events into stored states equals recomputing the summary from scratch."""

import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from flax import nnx

from vista_jax import cache
from vista_jax.config import SummarizerConfig
from vista_jax.data.features import NUM_GAP_BUCKETS, gap_buckets
from vista_jax.models import incremental
from vista_jax.models.summarizer import Summarizer
from vista_jax.store import SummaryStore, SummaryStoreError

OLD = [30, 0, 17, 9]  # events already summarized per user (user 1 has none yet)
NEW = [6, 5, 0, 11]  # events arriving later (user 2 gets none)
NUM_GAPS = NUM_GAP_BUCKETS


@pytest.fixture(scope="module")
def model() -> Summarizer:
    cfg = SummarizerConfig(
        num_items=40, d_model=16, num_heads=2, num_layers=2, num_seeds=4, sglu_hidden=32,
        chunk_size=8, num_gap_buckets=NUM_GAPS,
    )  # fmt: skip
    return Summarizer(cfg, nnx.Rngs(0))


def _user_events(seed=0):
    """Per user: time-sorted (item, action, time) of old + new events, gaps of minutes to days."""
    rng = np.random.default_rng(seed)
    users = []
    for n in np.add(OLD, NEW):
        time = np.cumsum(rng.integers(0, 200_000, n)) + 1_000
        users.append((rng.integers(1, 41, n), rng.integers(1, 8, n), time))
    return users


def _pad(rows, width):
    out = np.zeros((len(rows), max(width, 1)), np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _batch(users, lo, hi):
    """Events [lo[u], hi[u]) of each user as padded arrays (item, action, time, valid)."""
    parts = [[x[a:b] for x in u] for u, a, b in zip(users, lo, hi, strict=True)]
    width = max(b - a for a, b in zip(lo, hi, strict=True))
    item, action, time = (_pad([p[j] for p in parts], width) for j in range(3))
    valid = np.arange(item.shape[1])[None] < np.subtract(hi, lo)[:, None]
    return item, action, time, valid


def _full_gaps(users, width):
    rows = [gap_buckets(u[2], np.array([0, len(u[2])]), NUM_GAPS) for u in users]
    return _pad(rows, width)


def _recompute(model, users):
    item, action, _, valid = _batch(users, [0] * len(users), np.add(OLD, NEW))
    gap = _full_gaps(users, item.shape[1])
    states = model.history_states(*map(jnp.asarray, (item, action, gap)), jnp.asarray(valid))
    return states, model.readout(states)


def _initial_build(model, users):
    """Summaries, stored states and last event time after the OLD events of each user."""
    item, action, time, valid = _batch(users, [0] * len(users), OLD)
    gap = _full_gaps([[x[:n] for x in u] for u, n in zip(users, OLD, strict=True)], item.shape[1])
    states = model.history_states(*map(jnp.asarray, (item, action, gap)), jnp.asarray(valid))
    return states, model.readout(states), _last_time(users)


def _last_time(users):
    _, _, time, valid = _batch(users, [0] * len(users), OLD)
    return np.where(valid, time, 0).max(axis=1)


def _new_events(users, last_time, has_history):
    item, action, time, valid = _batch(users, OLD, np.add(OLD, NEW))
    gap = incremental.incremental_gaps(last_time, has_history, time, valid, NUM_GAPS)
    return item, action, gap, valid, time


def test_incremental_gaps_match_a_full_build():
    users = _user_events(seed=1)
    *_, gap, valid, _ = _new_events(users, _last_time(users), np.array(OLD) > 0)
    full = _full_gaps(users, max(np.add(OLD, NEW)))
    for u, (old, new) in enumerate(zip(OLD, NEW, strict=True)):
        np.testing.assert_array_equal(gap[u, :new], full[u, old : old + new])
        assert not np.any(gap[u][~valid[u]])


def test_update_equals_recompute(model):
    users = _user_events()
    states, _, last_time = _initial_build(model, users)
    has_history = np.asarray(states[0].count) > 0
    item, action, gap, valid, _ = _new_events(users, last_time, has_history)
    new_states, summary = incremental.update(
        model, states, *map(jnp.asarray, (item, action, gap, valid))
    )
    ref_states, ref_summary = _recompute(model, users)
    assert np.max(np.abs(summary - ref_summary)) <= 1e-4
    for got, want in zip(new_states, ref_states, strict=True):
        np.testing.assert_allclose(got.kv_sum, want.kv_sum, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got.count, want.count)


def test_states_round_trip_through_the_store_then_update(model):
    users = _user_events(seed=2)
    states, summary, last_time = _initial_build(model, users)
    extras = {**cache.states_to_arrays(states), cache.LAST_TIME: last_time}
    root, context = {"driver": "memory", "path": "cache/"}, ts.Context()
    SummaryStore.write_version(
        root, version="v1", summaries=np.asarray(summary), coverage=np.array(OLD),
        config_hash="h", summarizer_step=0, extra_arrays=extras, quantization="none",
        context=context,
    )  # fmt: skip
    store = SummaryStore.open(root, context=context)
    assert set(store.extra_names) == {*cache.states_to_arrays(states), "last_time"}
    stored, stored_time = cache.read_states(store, np.arange(len(OLD)), num_layers=2)
    np.testing.assert_array_equal(stored_time, last_time)
    has_history = stored[0].count > 0
    item, action, gap, valid, time = _new_events(users, stored_time, has_history)
    _, summary = incremental.update(model, stored, *map(jnp.asarray, (item, action, gap, valid)))
    _, ref_summary = _recompute(model, users)
    assert np.max(np.abs(summary - ref_summary)) <= 1e-4
    new_last = incremental.last_event_time(stored_time, time, valid)
    np.testing.assert_array_equal(new_last, [u[2][-1] for u in users])


def test_missing_layer_is_a_clear_error():
    arrays = {"state_l0_kv": np.zeros((1, 2, 8, 8)), "state_l0_count": np.zeros(1)}
    with pytest.raises(SummaryStoreError, match="lack layer 1"):
        cache.arrays_to_states(arrays, num_layers=2)

"""Sampled-softmax loss, catalog scoring, leave-one-out sequences and a short training run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vista_jax import metrics, retrieval
from vista_jax.data import sequences
from vista_jax.errors import DataError
from vista_jax.models.seq_layers import l2_normalize
from vista_jax.models.sequential import SequentialEncoder, preset


def reference_loss(user, target, items, negatives, temperature):
    """The reference's formula in numpy: cosines / T, negatives == positive get -5e4."""
    user, items = np.asarray(user, np.float64), np.asarray(items, np.float64)
    pos = np.einsum("bld,bld->bl", user, items[target]) / temperature
    neg = np.einsum("bld,blrd->blr", user, items[negatives]) / temperature
    neg = np.where(negatives == target[..., None], -5e4, neg)
    logits = np.concatenate([pos[..., None], neg], axis=-1)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    weight = target > 0
    return ((lse - pos) * weight).sum() / weight.sum()


def random_case(seed=0, batch=3, length=5, num_items=6, dim=4):
    rng = np.random.default_rng(seed)
    user = l2_normalize(jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32))
    items = l2_normalize(jnp.asarray(rng.normal(size=(num_items + 1, dim)), jnp.float32))
    target = rng.integers(1, num_items + 1, (batch, length)).astype(np.int32)
    target[0, 3:] = 0  # Unsupervised (padding) positions.
    return user, jnp.asarray(target), items


@pytest.mark.parametrize("sampling", ["per_position", "per_row"])
def test_loss_matches_reference_formula(sampling):
    user, target, items = random_case()
    key, r = jax.random.key(3), 16
    loss, m = retrieval.sampled_softmax_loss(user, target, items, key, r, 0.05, sampling)
    b, length = target.shape
    shape = (b, length, r) if sampling == "per_position" else (b, r)
    negatives = np.asarray(retrieval.uniform_items(key, shape, items.shape[0] - 1))
    if sampling == "per_row":
        negatives = np.broadcast_to(negatives[:, None], (b, length, r))
    expected = reference_loss(user, np.asarray(target), items, negatives, 0.05)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert int(m["positions"]) == int(np.sum(np.asarray(target) > 0))
    # With 6 items and 16 draws some negatives hit the positive: they were masked.
    assert int(m["masked_negatives"]) > 0


def test_negatives_equal_to_the_positive_are_masked():
    """One item: every negative is the positive, so the loss is log(1 + R e^-5e4) = 0."""
    user, target, items = random_case(num_items=1)
    loss, m = retrieval.sampled_softmax_loss(user, target, items, jax.random.key(0), 8)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    assert int(m["masked_negatives"]) == 8 * int(m["positions"])


def test_packed_positions_equal_unpacked_formula():
    user, target, items = random_case(seed=1)
    key, r, cap = jax.random.key(5), 8, 16  # 12 supervised positions, 16 slots.
    loss, _ = retrieval.sampled_softmax_loss(user, target, items, key, r, max_positions=cap)
    keep = np.asarray(target).reshape(-1) > 0
    packed_user = np.zeros((1, cap, 4), np.float32)
    packed_target = np.zeros((1, cap), np.int32)
    packed_user[0, : keep.sum()] = np.asarray(user).reshape(-1, 4)[keep]
    packed_target[0, : keep.sum()] = np.asarray(target).reshape(-1)[keep]
    negatives = np.asarray(retrieval.uniform_items(key, (1, cap, r), items.shape[0] - 1))
    expected = reference_loss(packed_user, packed_target, items, negatives, 0.05)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_uniform_items_cover_the_catalog():
    ids = np.asarray(retrieval.uniform_items(jax.random.key(0), (20000,), 7))
    assert ids.min() == 1 and ids.max() == 7
    assert np.all(np.abs(np.bincount(ids)[1:] / 20000 - 1 / 7) < 0.01)


def test_position_capacity_rounds_up_in_few_steps():
    assert retrieval.position_capacity(1, 800) == 100
    assert retrieval.position_capacity(301, 800) == 400
    assert retrieval.position_capacity(800, 800) == 800


def test_catalog_scoring_excludes_history_and_ranks_target():
    # Items on a circle; the user points at item 2. Item 2 is in the history, so the target
    # (item 3, the next closest) must rank first among the remaining items.
    angles = np.array([0.0, 0.1, 0.5, 0.7, 1.6, 3.0])  # row 0 = padding
    items = jnp.asarray(np.stack([np.cos(angles), np.sin(angles)], 1), jnp.float32)
    user = jnp.asarray([[np.cos(0.5), np.sin(0.5)]], jnp.float32)
    scores = np.asarray(retrieval.catalog_scores(user, items))
    assert np.isneginf(scores[0, 0]) and np.argmax(scores[0]) == 2
    seen = metrics.seen_mask(np.array([[2, 5, 0]]), scores.shape[1])
    np.testing.assert_array_equal(seen[0], [True, False, True, False, False, True])
    assert metrics.rank_of_target(scores, np.array([3]), seen)[0] == 0
    assert metrics.rank_of_target(scores, np.array([3]))[0] == 1  # Without the exclusion.
    assert metrics.rank_of_target(scores, np.array([4]), seen)[0] == 2  # Behind 3 and 1.


def test_leave_one_out_rows():
    # User 0: items 1..6 at times 10..60; user 1: two events (no valid/test); window 3.
    offsets = np.array([0, 6, 8])
    item = np.array([1, 2, 3, 4, 5, 6, 7, 8])
    time = np.array([10, 20, 30, 40, 50, 60, 15, 25])
    s = sequences.leave_one_out(offsets, item, time, num_items=8, window=3)
    # Train events 1..4 (all but the last two); window 3 -> inputs 1,2,3 -> targets 2,3,4.
    np.testing.assert_array_equal(s.train["item"][0], [1, 2, 3])
    np.testing.assert_array_equal(s.train["target"][0], [2, 3, 4])
    np.testing.assert_array_equal(s.train["next_time"][0], [10, 20, 30])  # since min time 10
    assert len(s.train["item"]) == 1 and len(s.valid["item"]) == 1
    np.testing.assert_array_equal(s.valid["item"][0], [2, 3, 4])
    assert s.valid["target"][0] == 5 and s.test["target"][0] == 6 and s.test["length"][0] == 3
    np.testing.assert_array_equal(s.test["item"][0], [3, 4, 5])
    np.testing.assert_array_equal(s.test["next_time"][0], [30, 40, 50])  # last = target time
    ref = sequences.leave_one_out(offsets, item, time, 8, window=3, train_on_valid=True)
    np.testing.assert_array_equal(ref.train["item"][0], [2, 3, 4])
    np.testing.assert_array_equal(ref.train["target"][0], [3, 4, 5])  # ends at the valid item
    short = sequences.leave_one_out(offsets, item, time, 8, window=10)
    np.testing.assert_array_equal(short.train["target"][0][:4], [2, 3, 4, 0])
    assert "prefix" not in s.train


def test_leave_one_out_refuses_a_log_without_a_splittable_user():
    offsets, item, time = np.array([0, 2, 4]), np.array([1, 2, 3, 4]), np.arange(4)
    with pytest.raises(DataError, match="at least 3 events"):
        sequences.leave_one_out(offsets, item, time, num_items=4, window=3)


def test_lifelong_prefix_holds_only_events_before_the_window():
    # User 0: items 1..8; window 2. Train: events 1..6 -> window inputs 4,5 (targets 5,6).
    offsets, item, time = np.array([0, 8]), np.arange(1, 9), np.arange(8) * 10
    s = sequences.leave_one_out(offsets, item, time, 8, window=2, prefix_len=4)
    np.testing.assert_array_equal(s.train["item"][0], [4, 5])
    np.testing.assert_array_equal(s.train["prefix"][0], [1, 2, 3, 0])
    # Test target 8: window 6,7; prefix = the 4 most recent events before it: 2,3,4,5.
    np.testing.assert_array_equal(s.test["item"][0], [6, 7])
    np.testing.assert_array_equal(s.test["prefix"][0], [2, 3, 4, 5])
    np.testing.assert_array_equal(s.valid["prefix"][0], [1, 2, 3, 4])


def test_batches_are_padded_to_a_static_size():
    split = {"item": np.arange(10).reshape(5, 2), "target": np.ones((5, 2), np.int32)}
    batches = list(sequences.train_batches(split, 2, np.random.default_rng(0)))
    assert [b["item"].shape for b in batches] == [(2, 2)] * 3
    assert batches[-1]["target"][1].sum() == 0  # The padding row is unsupervised.
    sizes = [n for _, n in sequences.eval_batches(split, 4)]
    assert sizes == [4, 1]


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_training_reduces_loss_on_a_cyclic_pattern(name):
    """Users walk a cycle of 12 items (next = current + 1): a few steps learn it."""
    num_items, batch, length = 12, 16, 10
    rng = np.random.default_rng(0)
    start = rng.integers(0, num_items, batch)
    walk = (start[:, None] + np.arange(length + 1)[None]) % num_items + 1
    t = np.cumsum(rng.integers(1, 1000, (batch, length + 1)), 1)
    data = {
        "item": walk[:, :-1],
        "target": walk[:, 1:],
        "time": t[:, :-1],
        "next_time": t[:, 1:],
    }
    data = {k: jnp.asarray(v, jnp.int32) for k, v in data.items()}
    sizes = dict(d_model=16, max_len=length, ffn_hidden=16, attn_dim=8, linear_dim=8)
    cfg = preset(name, num_items, **sizes)
    tx = retrieval.make_optimizer(1e-2)
    graphdef, state = retrieval.init_train_state(SequentialEncoder(cfg, nnx.Rngs(0)), tx)
    step = jax.jit(retrieval.make_train_step(graphdef, tx, num_negatives=8))
    losses = []
    for _ in range(40):
        state, m = step(state, data, jax.random.key(0))
        losses.append(float(m["loss"]))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    scores = np.asarray(retrieval.make_score_fn(graphdef)(state.params, data))
    assert np.mean(np.argmax(scores, 1) == np.asarray(walk[:, -1])) > 0.8


def test_sampled_logits_gradients_match_dense_autodiff():
    rng = np.random.default_rng(0)
    user = jnp.asarray(rng.normal(size=(37, 4)), jnp.float32)  # Not a multiple of a chunk.
    items = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 9, (37, 6)), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(37, 6)), jnp.float32)

    def dense(u, t):
        return jnp.sum(jnp.take_along_axis(u @ t.T, ids, axis=-1) * weights)

    def chunked(u, t):
        return jnp.sum(retrieval.sampled_logits(u, t, ids, 8) * weights)

    np.testing.assert_allclose(chunked(user, items), dense(user, items), rtol=1e-5)
    for got, want in zip(
        jax.grad(chunked, argnums=(0, 1))(user, items),
        jax.grad(dense, argnums=(0, 1))(user, items),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

"""VISTA retriever: snapshots equal direct summaries of each prefix, stage 2 sees only its
snapshot and the last R events, nothing after its position, and padding never matters."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vista_jax.models import qla
from vista_jax.models.sequential import build_encoder, preset
from vista_jax.models.vista_retriever import stage2_mask

NUM_ITEMS, LENGTH, EVERY, RECENT, SEEDS = 30, 12, 4, 6, 3
TOL = dict(rtol=1e-4, atol=1e-5)


def tiny(**overrides):
    cfg = preset(
        "vista", NUM_ITEMS, d_model=8, max_len=LENGTH, ffn_hidden=8, num_seeds=SEEDS,
        snapshot_every=EVERY, num_recent=RECENT, **overrides,
    )  # fmt: skip
    return build_encoder(cfg, nnx.Rngs(0))


def inputs(seed=0, lengths=(12, 7, 3)):
    rng = np.random.default_rng(seed)
    valid = np.arange(LENGTH)[None] < np.asarray(lengths)[:, None]
    item = np.where(valid, rng.integers(1, NUM_ITEMS + 1, (len(lengths), LENGTH)), 0)
    return jnp.asarray(item, jnp.int32), jnp.asarray(valid)


def test_stage2_mask_by_hand():
    mask = stage2_mask(length=6, snapshot_every=2, num_seeds=1, num_recent=3)
    # Keys: snapshots 0..3 (one token each), then events 0..5.
    want = [
        [1, 0, 0, 0, 1, 0, 0, 0, 0, 0],  # t=0: snapshot 0 (empty), event 0
        [0, 1, 0, 0, 1, 1, 0, 0, 0, 0],  # t=1: snapshot 1 covers events 0-1
        [0, 1, 0, 0, 1, 1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0, 1, 1, 1, 0, 0],  # t=3: last 3 events are 1..3
        [0, 0, 1, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 0, 0, 0, 1, 1, 1],
    ]
    np.testing.assert_array_equal(mask, np.array(want, bool))


def test_snapshots_equal_summaries_of_each_prefix():
    model = tiny()
    item, valid = inputs()
    x = model.embed(item, valid, None)
    snaps = model.summarizer(x, valid, EVERY)  # [B, J, K, D]
    for j in range(LENGTH // EVERY + 1):
        end = j * EVERY
        states = [qla.QLAState.zeros(3, 1, 8) for _ in model.summarizer.layers]
        if end:  # Snapshot 0 covers nothing: zero states.
            h = x[:, :end]
            for i, layer in enumerate(model.summarizer.layers[:-1]):
                h, states[i] = layer.history(h, valid[:, :end], states[i], "parallel")
            states[-1] = model.summarizer.layers[-1].fold_state(h, valid[:, :end], states[-1])
        t = jnp.broadcast_to(model.summarizer.seeds[...], (3, SEEDS, 8))
        for layer, state in zip(model.summarizer.layers, states, strict=True):
            t = layer.seeds(t, state)
        np.testing.assert_allclose(snaps[:, j], model.summarizer.final_norm(t), **TOL)


def test_no_position_reads_a_later_event():
    model = tiny()
    item, valid = inputs(lengths=(12, 12, 12))
    base, _ = model(item, valid)
    for t in range(LENGTH - 1):
        changed = item.at[:, t + 1 :].set((item[:, t + 1 :] % NUM_ITEMS) + 1)
        out, _ = model(changed, valid)
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], **TOL)


def test_old_events_reach_a_position_only_through_its_summary():
    """Event 0 is outside position 11's raw window (R = 6), yet its output depends on it:
    through the summary of snapshot 3, which covers events 0..11."""
    model = tiny()
    item, valid = inputs(lengths=(12, 12, 12))
    base, aux = model(item, valid)
    changed, aux2 = model(item.at[:, 0].set(item[:, 0] % NUM_ITEMS + 1), valid)
    assert not np.allclose(aux["summary"][:, -1], aux2["summary"][:, -1])
    assert not np.allclose(base[:, -1], changed[:, -1])


def test_padding_never_matters():
    model = tiny()
    item, valid = inputs()
    base, _ = model(item, valid)
    noisy = jnp.where(valid, item, 7)
    out, _ = model(noisy, valid)
    m = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(out)[m], np.asarray(base)[m], **TOL)


def test_int8_summaries_change_outputs_little():
    model = tiny()
    item, valid = inputs()
    base, _ = model(item, valid)
    model.quantize_summaries = True
    out, _ = model(item, valid)
    m = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(out)[m], np.asarray(base)[m], atol=0.05)


def test_prefix_chunked_scan_equals_one_parallel_pass():
    model = tiny()
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 10, 8)), jnp.float32)
    valid = jnp.asarray(np.arange(10)[None] < np.array([[10], [4], [0]]))
    chunked = model.summarizer.prefix_states(x * valid[..., None], valid, chunk=4)
    whole = model.summarizer._fold(x * valid[..., None], valid, model.summarizer.zero_states(3))
    for a, b in zip(chunked, whole, strict=True):
        np.testing.assert_allclose(a.kv_sum, b.kv_sum, **TOL)
        np.testing.assert_allclose(a.count, b.count, **TOL)


def test_lifelong_prefix_reaches_every_position_and_empty_prefix_is_no_prefix():
    model = tiny()
    item, valid = inputs()
    base, _ = model(item, valid)
    empty, _ = model(item, valid, prefix_BxP=jnp.zeros((3, 5), jnp.int32))
    np.testing.assert_allclose(empty, base, **TOL)
    prefix = jnp.asarray(np.random.default_rng(2).integers(1, NUM_ITEMS + 1, (3, 5)), jnp.int32)
    out, _ = model(item, valid, prefix_BxP=prefix)
    assert not np.allclose(np.asarray(out)[:, 0], np.asarray(base)[:, 0])

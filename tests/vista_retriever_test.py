"""VISTA retriever: snapshots equal direct summaries of each prefix, stage 2 sees only its
snapshot and the last R events, nothing after its position, and padding never matters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vista_jax.models import hstu, qla
from vista_jax.models.sequential import build_encoder, preset
from vista_jax.models.vista_retriever import stage2_mask

NUM_ITEMS, LENGTH, EVERY, RECENT, SEEDS = 30, 12, 4, 6, 3
TOL = dict(rtol=1e-4, atol=1e-5)
STAGE2 = pytest.mark.parametrize("stage2", ["sasrec", "hstu"])


def tiny(stage2="sasrec", **overrides):
    sizes = dict(d_model=8, max_len=LENGTH, ffn_hidden=8, attn_dim=8, linear_dim=8)
    vista = dict(num_seeds=SEEDS, snapshot_every=EVERY, num_recent=RECENT)
    name = "vista" if stage2 == "sasrec" else "vista_hstu"
    cfg = preset(name, NUM_ITEMS, **(sizes | vista | overrides))
    return build_encoder(cfg, nnx.Rngs(0))


def times(item):
    """Increasing integer seconds, gaps of 1 s to ~3 h, and each position's next time."""
    gaps = np.random.default_rng(5).integers(1, 10_000, item.shape)
    time = jnp.asarray(np.cumsum(gaps, axis=1), jnp.int32)
    return time, jnp.concatenate([time[:, 1:], time[:, -1:] + 1], axis=1)


def run(model, item, valid, **kw):
    return model(item, valid, *times(item), **kw)


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


@STAGE2
def test_no_position_reads_a_later_event(stage2):
    model = tiny(stage2)
    item, valid = inputs(lengths=(12, 12, 12))
    base, _ = run(model, item, valid)
    for t in range(LENGTH - 1):
        changed = item.at[:, t + 1 :].set((item[:, t + 1 :] % NUM_ITEMS) + 1)
        out, _ = run(model, changed, valid)
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], **TOL)


def test_old_events_reach_a_position_only_through_its_summary():
    """Event 0 is outside position 11's raw window (R = 6), yet its output depends on it:
    through the summary of snapshot 3, which covers events 0..11."""
    model = tiny()
    item, valid = inputs(lengths=(12, 12, 12))
    base, aux = run(model, item, valid)
    changed, aux2 = run(model, item.at[:, 0].set(item[:, 0] % NUM_ITEMS + 1), valid)
    assert not np.allclose(aux["summary"][:, -1], aux2["summary"][:, -1])
    assert not np.allclose(base[:, -1], changed[:, -1])


@STAGE2
def test_padding_never_matters(stage2):
    model = tiny(stage2)
    item, valid = inputs()
    base, _ = run(model, item, valid)
    noisy = jnp.where(valid, item, 7)
    out, _ = run(model, noisy, valid)
    m = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(out)[m], np.asarray(base)[m], **TOL)


@STAGE2
def test_int8_summaries_change_outputs_little(stage2):
    model = tiny(stage2)
    item, valid = inputs()
    base, _ = run(model, item, valid)
    model.quantize_summaries = True
    out, _ = run(model, item, valid)
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


@STAGE2
def test_lifelong_prefix_reaches_every_position_and_empty_prefix_is_no_prefix(stage2):
    model = tiny(stage2)
    item, valid = inputs()
    base, _ = run(model, item, valid)
    empty, _ = run(model, item, valid, prefix_BxP=jnp.zeros((3, 5), jnp.int32))
    np.testing.assert_allclose(empty, base, **TOL)
    prefix = jnp.asarray(np.random.default_rng(2).integers(1, NUM_ITEMS + 1, (3, 5)), jnp.int32)
    out, _ = run(model, item, valid, prefix_BxP=prefix)
    assert not np.allclose(np.asarray(out)[:, 0], np.asarray(base)[:, 0])


@pytest.mark.parametrize("recent,chunks", [(RECENT, 1), (RECENT, 3), (LENGTH, 2), (EVERY, 4)])
def test_hstu_stage2_equals_one_dense_masked_attention(recent, chunks):
    """The snapshot-grouped summary attention and the windowed, query-blocked raw attention
    equal one dense point-wise attention over [all summary tokens; all events] under
    `stage2_mask`, with the per-slot bias on summary keys and HSTU's biases on raw keys."""
    model = tiny("hstu", num_recent=recent, attention_chunks=chunks)
    block = model.blocks[0]
    item, valid = inputs(lengths=(12, 12, 9))
    time, next_time = times(item)
    x = model.embed(item, valid, None)
    summary = jax.random.normal(jax.random.key(3), (3, LENGTH // EVERY + 1, SEEDS, 8))
    buckets = hstu.time_buckets(next_time, time, model.cfg.num_time_buckets)
    got = block(x, summary, buckets, lambda: None)

    u, v, q, k = block.split_projection(x)
    _, v_s, _, k_s = block.split_projection(summary.reshape(3, -1, 8))
    keys, values = jnp.concatenate([k_s, k], 1), jnp.concatenate([v_s, v], 1)
    num_summary = summary.shape[1] * SEEDS
    bias = jnp.concatenate(
        [
            jnp.broadcast_to(
                jnp.tile(block.summary_bias[...], summary.shape[1]), (3, LENGTH, num_summary)
            ),
            block.relative_bias(buckets, 0),
        ],
        axis=2,
    )
    mask = stage2_mask(LENGTH, EVERY, SEEDS, recent)
    weights = jnp.where(mask, jax.nn.silu(jnp.einsum("ble,bme->blm", q, keys) + bias), 0.0)
    dense = jnp.einsum("blm,bme->ble", weights / LENGTH, values)[:, None]
    want = block.gate_and_project(u, dense, x, lambda: None)
    np.testing.assert_allclose(got, want, **TOL)

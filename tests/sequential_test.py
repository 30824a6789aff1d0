"""SASRec / HSTU encoders: causality, padding, time buckets, shapes (tiny dims, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vista_jax.models import hstu, sasrec
from vista_jax.models.sequential import SequentialEncoder, preset

NUM_ITEMS, LENGTH = 30, 12


def tiny(name: str, **overrides) -> SequentialEncoder:
    sizes = dict(d_model=8, max_len=LENGTH, ffn_hidden=8)
    if name != "sasrec":
        sizes |= dict(attn_dim=4, linear_dim=4) if name == "hstu_large" else {}
    cfg = preset(name, NUM_ITEMS, **(sizes | overrides))
    return SequentialEncoder(cfg, nnx.Rngs(0))


def inputs(seed: int = 0, lengths=(12, 7, 3)):
    rng = np.random.default_rng(seed)
    batch = len(lengths)
    valid = np.arange(LENGTH)[None] < np.asarray(lengths)[:, None]
    item = np.where(valid, rng.integers(1, NUM_ITEMS + 1, (batch, LENGTH)), 0)
    time = np.cumsum(rng.integers(0, 100_000, (batch, LENGTH)), axis=1)
    next_time = time + rng.integers(1, 50_000, (batch, LENGTH))
    return [jnp.asarray(a, jnp.int32) for a in (item, valid, time, next_time)]


MODELS = ["sasrec", "hstu", "hstu_large"]


@pytest.mark.parametrize("name", MODELS)
def test_outputs_are_unit_norm_at_valid_positions(name):
    item, valid, time, next_time = inputs()
    out, aux = tiny(name)(item, valid.astype(bool), time, next_time)
    assert out.shape == (3, LENGTH, 8) and aux["encoded"].shape == out.shape
    norms = np.linalg.norm(np.asarray(out), axis=-1)
    np.testing.assert_allclose(norms[np.asarray(valid, bool)], 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dropout_key", [None, 7])
def test_causality(name, dropout_key):
    """The output at t does not change when events after t change (also with dropout on)."""
    model = tiny(name)
    key = None if dropout_key is None else jax.random.key(dropout_key)
    item, valid, time, next_time = inputs(lengths=(12, 12, 12))
    t = 5
    item2 = item.at[:, t + 1 :].set((item[:, t + 1 :] % NUM_ITEMS) + 1)
    time2 = time.at[:, t + 1 :].add(12345)
    next2 = next_time.at[:, t + 1 :].add(999)
    valid = valid.astype(bool)
    out, _ = model(item, valid, time, next_time, dropout_key=key)
    out2, _ = model(item2, valid, time2, next2, dropout_key=key)
    np.testing.assert_allclose(out[:, : t + 1], out2[:, : t + 1], atol=1e-6)
    assert not np.allclose(out[:, t + 1 :], out2[:, t + 1 :])


@pytest.mark.parametrize("name", MODELS)
def test_padding_never_matters(name):
    """Padded ids/times, and extra padding columns, leave every valid output unchanged."""
    model = tiny(name)
    item, valid, time, next_time = inputs(lengths=(6, 4, 1))
    valid = valid.astype(bool)
    out, _ = model(item, valid, time, next_time)
    junk = jnp.asarray(np.random.default_rng(1).integers(1, NUM_ITEMS + 1, item.shape), jnp.int32)
    out_junk, _ = model(
        jnp.where(valid, item, junk),
        valid,
        jnp.where(valid, time, 7 * junk),
        jnp.where(valid, next_time, 3 * junk),
    )
    short = 6  # The same rows with only 6 columns (less padding).
    out_short, _ = model(item[:, :short], valid[:, :short], time[:, :short], next_time[:, :short])
    mask = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(out)[mask], np.asarray(out_junk)[mask], atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(out)[:, :short][mask[:, :short]],
        np.asarray(out_short)[mask[:, :short]],
        atol=1e-6,
    )


def test_time_buckets_match_hand_computed_values():
    # floor(ln(max(|dt|, 1)) / 0.301): ln 2 / .301 = 2.30; ln 10 / .301 = 7.65;
    # ln 3600 / .301 = 27.2; ln 86400 / .301 = 37.8; ln 1e9 / .301 = 68.8.
    dt = np.array([0, 1, -1, 2, 10, 3600, -86400, 10**9])
    expected = np.array([0, 0, 0, 2, 7, 27, 37, 68])
    query = jnp.asarray(dt, jnp.int32)[None, :]
    zero = jnp.zeros((1, 1), jnp.int32)
    got = hstu.time_buckets(query, zero, 128)[0, :, 0]
    np.testing.assert_array_equal(got, expected)
    assert int(hstu.time_buckets(query, zero, 5).max()) == 5  # Clipped to num_buckets.


@pytest.mark.parametrize("query_time", ["next", "current"])
def test_hstu_target_timestamp_switch(query_time):
    """'next' (the reference) lets the last position see the target's time; 'current' not."""
    model = tiny("hstu", query_time=query_time)
    item, valid, time, next_time = inputs(lengths=(12, 12, 12))
    valid = valid.astype(bool)
    out, _ = model(item, valid, time, next_time)
    out2, _ = model(item, valid, time, next_time.at[:, -1].add(10**7))
    changed = not np.allclose(out[:, -1], out2[:, -1], atol=1e-6)
    assert changed == (query_time == "next")
    np.testing.assert_allclose(out[:, :-1], out2[:, :-1], atol=1e-6)


def test_encode_last_reads_each_rows_last_valid_position():
    model = tiny("sasrec")
    item, valid, time, next_time = inputs(lengths=(12, 7, 3))
    valid = valid.astype(bool)
    out, _ = model(item, valid, time, next_time)
    last = model.encode_last(item, valid, time, next_time)
    np.testing.assert_allclose(last, out[np.arange(3), np.array([11, 6, 2])], atol=1e-6)


def test_parameters_carry_logical_axes():
    allowed = {None, "vocab", "embed", "heads", "mlp"}
    for name in MODELS:
        for _, var in nnx.to_flat_state(nnx.state(tiny(name), nnx.Param)):
            meta = var.get_metadata()
            names = next(
                meta[k] for k in ("out_sharding", "sharding_names", "sharding") if k in meta
            )
            assert set(names) <= allowed and len(names) == var.ndim


@pytest.mark.parametrize("name", ["hstu", "hstu_large"])
def test_blocked_causal_attention_equals_one_block(name):
    item, valid, time, next_time = inputs(lengths=(12, 7, 3))
    valid = valid.astype(bool)
    one, _ = tiny(name, attention_chunks=1)(item, valid, time, next_time)
    for chunks in (3, 5):  # 5 does not divide 12: uneven last block.
        blocked, _ = tiny(name, attention_chunks=chunks)(item, valid, time, next_time)
        np.testing.assert_allclose(blocked, one, atol=1e-6)


def test_sasrec_training_attention_equals_dot_product_attention():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 11, 2, 4)), jnp.float32) for _ in range(3))
    want = sasrec.causal_softmax_attention(q, k, v, 0.0, None)  # jax.nn.dot_product_attention
    for chunks in (1, 3, 4):  # A rate this small keeps every weight but takes the blocked path.
        got = sasrec.causal_softmax_attention(q, k, v, 1e-9, jax.random.key(0), chunks)
        np.testing.assert_allclose(got, want, atol=1e-6)


# -- a line-by-line numpy transcription of the reference's forward pass ----------------------
def _ln(x, eps):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _numpy_sasrec_block(p, x, valid, heads):
    q_in = _ln(x, 1e-8)
    q = q_in @ p["query"]["kernel"] + p["query"]["bias"]
    k, v = np.split(x @ p["key_value"]["kernel"] + p["key_value"]["bias"], 2, axis=-1)
    b, length, d = x.shape
    split = lambda t: t.reshape(b, length, heads, d // heads)  # noqa: E731
    logits = np.einsum("blhe,bmhe->bhlm", split(q), split(k)) / np.sqrt(d // heads)
    logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("bhlm,bmhe->blhe", weights, split(v)).reshape(x.shape)
    y = _ln(q_in + attended @ p["out"]["kernel"] + p["out"]["bias"], 1e-8)
    hidden = np.maximum(y @ p["ffn_in"]["kernel"] + p["ffn_in"]["bias"], 0.0)
    return (y + hidden @ p["ffn_out"]["kernel"] + p["ffn_out"]["bias"]) * valid[..., None]


def _numpy_hstu_block(p, x, query_time, time, heads, max_len):
    b, length, _ = x.shape
    u, v, q, k = np.split(_silu(_ln(x, 1e-6) @ p["uvqk"]), 4, axis=-1)  # dv = dqk here
    dt = np.abs(query_time[:, :, None] - time[:, None, :]).astype(np.float64)
    bucket = np.clip(np.floor(np.log(np.maximum(dt, 1.0)) / 0.301), 0, 128).astype(int)
    offset = np.clip(np.arange(length)[:, None] - np.arange(length)[None, :], 0, None)
    bias = p["time_bias"][bucket] + p["position_bias"][offset]
    split = lambda t: t.reshape(b, length, heads, -1)  # noqa: E731
    scores = np.einsum("blhe,bmhe->bhlm", split(q), split(k)) + bias[:, None]
    weights = _silu(scores) / max_len * np.tril(np.ones((length, length)))
    attended = np.einsum("bhlm,bmhe->blhe", weights, split(v)).reshape(b, length, -1)
    return x + (u * _ln(attended, 1e-6)) @ p["out"]["kernel"] + p["out"]["bias"]


@pytest.mark.parametrize("name", MODELS)
def test_forward_matches_numpy_transcription_of_the_reference(name):
    model = tiny(name)
    rng = np.random.default_rng(0)  # Random values everywhere, biases included.
    state = nnx.state(model, nnx.Param)
    draw = lambda a: 0.3 * rng.standard_normal(a.shape, np.float32)  # noqa: E731
    nnx.update(model, jax.tree.map(draw, state))
    p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    item, valid, time, next_time = inputs(lengths=(12, 7, 3))
    got, _ = model(item, valid.astype(bool), time, next_time)
    cfg = model.cfg
    x = p["embed"]["items"][np.asarray(item)] * np.sqrt(cfg.d_model) + p["embed"]["positions"]
    x = x * np.asarray(valid)[..., None]
    for i in range(cfg.num_blocks):
        if cfg.kind == "sasrec":
            x = _numpy_sasrec_block(p["blocks"][i], x, np.asarray(valid), cfg.num_heads)
        else:
            t, nt = np.asarray(time), np.asarray(next_time)
            x = _numpy_hstu_block(p["blocks"][i], x, nt, t, cfg.num_heads, cfg.max_len)
    want = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)

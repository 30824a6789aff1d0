"""Packed rows (`sequences.pack_rows`): several users per window row, segment-masked.

The fast path of SASRec/HSTU retrieval training, checked against one user per row: the same
per-position outputs, the same loss and the same gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vista_jax import retrieval
from vista_jax.data import sequences
from vista_jax.models.seq_layers import segment_positions
from vista_jax.models.sequential import SequentialEncoder, preset

NUM_ITEMS, WIDTH = 30, 12
LENGTHS = (12, 7, 3, 5, 0, 2, 4)  # One full row, one empty row.


def rows(lengths=LENGTHS, seed=0) -> dict:
    """Left-aligned retrieval train rows (item, time, next_time, target) of these lengths."""
    rng = np.random.default_rng(seed)
    valid = np.arange(WIDTH)[None] < np.asarray(lengths)[:, None]
    shape = valid.shape
    time = np.cumsum(rng.integers(0, 100_000, shape), axis=1)
    return {
        "item": np.where(valid, rng.integers(1, NUM_ITEMS + 1, shape), 0),
        "time": np.where(valid, time, 0),
        "next_time": np.where(valid, time + rng.integers(1, 50_000, shape), 0),
        "target": np.where(valid, rng.integers(1, NUM_ITEMS + 1, shape), 0),
    }


def as_int32(batch):
    return {k: np.asarray(v, np.int32) for k, v in batch.items()}


def segments(packed, batch):
    """(row, columns, user) of every segment of the packed rows: the user whose events (and
    count) the segment holds, each user matched once."""
    lengths, used, out = np.sum(batch["item"] > 0, 1), set(), []
    seg = packed["segment"]
    for r in range(len(seg)):
        for s in range(1, seg[r].max() + 1):
            cols = np.flatnonzero(seg[r] == s)
            u = next(
                (u for u, n in enumerate(lengths)
                 if u not in used and n == len(cols)
                 and np.array_equal(batch["item"][u, :n], packed["item"][r, cols])),
                None,
            )  # fmt: skip
            assert u is not None, f"segment {s} of packed row {r} is no user's events"
            used.add(u)
            out.append((r, cols, u))
    return out


def test_packing_keeps_every_event_in_order_within_its_segment():
    batch = as_int32(rows())
    packed = sequences.pack_rows(batch)
    # 33 events in rows of 12: 12 | 7 + 5 | 4 + 3 + 2 (first fit decreasing), capacity
    # rounded up to a multiple of ceil(7 / 16) = 1.
    assert packed["item"].shape == (3, WIDTH)
    seg = packed["segment"]
    assert np.sum(seg > 0) == sum(LENGTHS)
    found = []
    for r, cols, u in segments(packed, batch):
        assert np.all(np.diff(cols) == 1)  # Contiguous.
        for k in batch:
            np.testing.assert_array_equal(packed[k][r, cols], batch[k][u, : len(cols)])
        found.append(u)
    assert sorted(found) == [u for u, n in enumerate(LENGTHS) if n]
    np.testing.assert_array_equal(
        segment_positions(jnp.asarray(seg))[0], np.arange(WIDTH)
    )  # One user fills row 0.
    np.testing.assert_array_equal(
        segment_positions(jnp.asarray(seg))[1, :12], [*range(7), *range(5)]
    )


def test_packing_refuses_what_it_cannot_pack():
    batch = as_int32(rows()) | {"prefix": np.zeros((len(LENGTHS), 4), np.int32)}
    with pytest.raises(ValueError, match="prefix"):
        sequences.pack_rows(batch)
    with pytest.raises(ValueError, match="capacity 2"):
        sequences.pack_rows(as_int32(rows()), capacity=2)
    assert sequences.packed_rows_capacity(70, 128) == 72
    assert sequences.packed_rows_capacity(121, 128) == 128
    assert sequences.packed_rows_capacity(1, 128) == 8


def encoder(name):
    sizes = dict(d_model=8, max_len=WIDTH, ffn_hidden=8, attention_chunks=3)
    return SequentialEncoder(preset(name, NUM_ITEMS, **sizes), nnx.Rngs(0))


def unpack(packed_BxLxD, packed, batch):
    """Per-user [U, W, D] outputs read back from packed rows (zeros at padding)."""
    out = np.zeros(batch["item"].shape + packed_BxLxD.shape[-1:], np.float32)
    for r, cols, u in segments(packed, batch):
        out[u, : len(cols)] = np.asarray(packed_BxLxD)[r, cols]
    return out


@pytest.mark.parametrize("name", ["sasrec", "hstu", "hstu_large"])
@pytest.mark.parametrize("blocked", [False, True])
def test_packed_rows_give_each_user_its_unpacked_outputs(name, blocked):
    """Per-position outputs equal, on the evaluation path and on the blocked training path
    (a dropout rate that keeps every weight)."""
    model = encoder(name)
    if blocked:
        for block in model.blocks:
            block.rate = 1e-9
            block.attn_rate = 1e-9
        model.embed.rate = 1e-9
    key = jax.random.key(3) if blocked else None
    batch = as_int32(rows())
    packed = sequences.pack_rows(batch)
    inputs = retrieval.batch_inputs
    want, _ = model(*inputs(batch), dropout_key=key)
    got, _ = model(*inputs(packed), dropout_key=key, **retrieval.extra_inputs(packed))
    valid = batch["item"] > 0
    np.testing.assert_allclose(
        unpack(got, packed, batch)[valid], np.asarray(want)[valid], atol=2e-5
    )


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_packed_loss_and_gradients_equal_unpacked(name):
    """A deterministic loss (full softmax over the catalog at every supervised position):
    the same value and the same gradient for every parameter, packed or not."""
    model = encoder(name)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, batch):
        m = nnx.merge(graphdef, params)
        user_BxLxD, _ = m(*retrieval.batch_inputs(batch), **retrieval.extra_inputs(batch))
        logits = user_BxLxD @ m.normalized_items().T / 0.05
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["target"][..., None], -1)
        weight = batch["target"] > 0
        return jnp.sum(nll[..., 0] * weight) / jnp.sum(weight)

    batch = as_int32(rows(seed=1))
    packed = sequences.pack_rows(batch)
    want, want_grads = jax.value_and_grad(loss)(params, batch)
    got, got_grads = jax.value_and_grad(loss)(params, packed)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)

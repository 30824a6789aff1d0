"""Chunked online-softmax target attention equals the plain softmax; candidates stay apart."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vista_jax.config import RankerConfig
from vista_jax.models import target_attention as ta

B, C, L, H, E = 3, 5, 45, 2, 4


def _qkv(seed=0, lengths=(L, 0, 17)):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (B, C, H, E)) * 3.0  # sharp softmax: stresses the rescaling
    k, v = (jax.random.normal(kk, (B, L, H, E)) for kk in keys[1:])
    valid = jnp.arange(L)[None] < jnp.array(lengths)[:, None]
    return q, k, v, valid


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64])
def test_chunked_online_softmax_equals_reference(chunk_size):
    q, k, v, valid = _qkv()
    ref = ta.target_attention_reference(q, k, v, valid)
    got = ta.target_attention_chunked(q, k, v, valid, chunk_size)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[1], 0.0)  # no valid key: zeros, not NaN


def _model_and_batch(seed=0):
    cfg = RankerConfig(num_items=30, d_model=8, num_heads=2, mlp_hidden=16, summary_dim=0)
    rng = np.random.default_rng(seed)
    batch = {
        "hist_item": rng.integers(1, 31, (B, L)),
        "hist_action": rng.integers(1, 8, (B, L)),
        "hist_gap": rng.integers(0, 16, (B, L)),
        "hist_len": np.array([L, 0, 17]),
        "cand_item": rng.integers(1, 31, (B, C)),
    }
    batch = {name: jnp.asarray(x, jnp.int32) for name, x in batch.items()}
    return ta.FullTargetAttentionRanker(cfg, nnx.Rngs(0), chunk_size=8), batch


def test_one_candidate_never_depends_on_another():
    model, batch = _model_and_batch()
    logits, _ = model(batch)
    other = batch["cand_item"].at[:, 1:].set((batch["cand_item"][:, 1:] + 3) % 30 + 1)
    logits2, _ = model(batch, cand_item=other)
    np.testing.assert_allclose(logits[:, 0], logits2[:, 0], atol=1e-6)
    single, _ = model(batch, cand_item=batch["cand_item"][:, :1])
    np.testing.assert_allclose(logits[:, :1], single, atol=1e-6)


def test_padding_never_changes_scores_and_chunking_is_exact():
    model, batch = _model_and_batch(seed=1)
    logits, _ = model(batch)
    pad = jnp.arange(L)[None] >= batch["hist_len"][:, None]
    repadded = {**batch, **{n: jnp.where(pad, 7, batch[n]) for n in ("hist_item", "hist_gap")}}
    np.testing.assert_allclose(model(repadded)[0], logits, atol=1e-6)
    model.chunk_size = 1000  # one chunk: the same scores
    np.testing.assert_allclose(model(batch)[0], logits, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(logits))

"""SIM-hard and TWIN: each search fast path against a plain reference, and their properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vista_jax.config import RankerConfig
from vista_jax.models import target_attention as ta
from vista_jax.models.sim import SimHardRanker, sim_hard_select
from vista_jax.models.twin import TwinRanker

B, C, L, K = 3, 4, 37, 5
LENGTHS = np.array([L, 0, 11])  # a full, an empty and a short history


@pytest.mark.parametrize("chunk", [1, 6, 64])
@pytest.mark.parametrize("k", [3, 50])  # 50 > L: every valid event, the rest empty slots
def test_chunked_top_k_equals_one_top_k(chunk, k):
    rng = np.random.default_rng(0)
    scores = jnp.asarray(rng.normal(size=(B, C, L)), jnp.float32)
    valid = jnp.arange(L)[None] < jnp.asarray(LENGTHS)[:, None]

    def score(pos_T, s_BxTxC, valid_BxT):
        return jnp.where(valid_BxT[:, None], jnp.moveaxis(s_BxTxC, 1, 2), -jnp.inf)

    top, pos = ta.chunked_top_k(score, (jnp.moveaxis(scores, 2, 1), valid), k, chunk, C)
    masked = jnp.where(valid[:, None], scores, -jnp.inf)
    ref_top, ref_pos = jax.lax.top_k(jnp.pad(masked, [(0, 0), (0, 0), (0, max(0, k - L))],
                                             constant_values=-jnp.inf), k)  # fmt: skip
    np.testing.assert_array_equal(top, ref_top)
    finite = np.isfinite(np.asarray(ref_top))
    np.testing.assert_array_equal(np.asarray(pos)[finite], np.asarray(ref_pos)[finite])


def _sim_numpy(category, lengths, cand_category, k):
    """Per (b, c): the last k positions p < length with category[b, p] == cand_category[b, c]."""
    out = np.zeros(cand_category.shape + (category.shape[1],), bool)
    for b in range(len(lengths)):
        for c in range(cand_category.shape[1]):
            hits = [p for p in range(lengths[b]) if category[b, p] == cand_category[b, c]]
            out[b, c, hits[-k:]] = True
    return out


def _as_mask(positions, selected, length):
    mask = np.zeros(positions.shape[:2] + (length,), bool)
    b, c, j = np.nonzero(np.asarray(selected))
    mask[b, c, np.asarray(positions)[b, c, j]] = True
    return mask


@pytest.mark.parametrize("chunk", [4, 1000])
def test_sim_category_filter_equals_numpy(chunk):
    rng = np.random.default_rng(1)
    category = rng.integers(0, 4, (B, L))
    cand_category = rng.integers(0, 4, (B, C))
    end = jnp.broadcast_to(jnp.asarray(LENGTHS)[:, None], (B, C))
    positions, selected = sim_hard_select(
        jnp.asarray(category), (jnp.zeros_like(end), end), jnp.asarray(cand_category), K, chunk
    )
    got = _as_mask(positions, selected, L)
    np.testing.assert_array_equal(got, _sim_numpy(category, LENGTHS, cand_category, K))


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    batch = {
        "hist_item": rng.integers(1, 31, (B, L)),
        "hist_action": rng.integers(1, 8, (B, L)),
        "hist_gap": rng.integers(0, 16, (B, L)),
        "hist_category": rng.integers(1, 4, (B, L)),
        "hist_len": LENGTHS,
        "cand_item": rng.integers(1, 31, (B, C)),
        "cand_category": rng.integers(1, 4, (B, C)),
    }
    return {name: jnp.asarray(x, jnp.int32) for name, x in batch.items()}


def _model(cls, chunk=8, k=K):
    cfg = RankerConfig(num_items=30, num_categories=3, d_model=8, num_heads=2, mlp_hidden=16)
    return cls(cfg, nnx.Rngs(0), chunk_size=chunk, top_k=k)


def _query(model, batch):
    cand = model.events.items(batch["cand_item"], batch["cand_category"])
    return model._heads(model.query(model.q_norm(cand)))


def test_sim_gathered_attention_equals_dense_masked_attention():
    model, batch = _model(SimHardRanker), _batch()
    q = _query(model, batch)
    keep = _sim_numpy(np.asarray(batch["hist_category"]), LENGTHS,
                      np.asarray(batch["cand_category"]), K)  # fmt: skip
    ref = model.attend_reference(q, batch, jnp.asarray(keep))
    np.testing.assert_allclose(model.attend(q, batch), ref, rtol=1e-5, atol=1e-6)


def _twin_reference_selection(model, batch, q, k):
    """Dense: every history event's head-averaged score, one lax.top_k over the valid ones."""
    keys, _ = model._keys_values(*model._history_ids(batch))
    scores = jnp.einsum("bche,blhe->bcl", q, keys) / (q.shape[2] * np.sqrt(q.shape[3]))
    valid = np.arange(L)[None] < np.asarray(batch["hist_len"])[:, None]
    scores = np.where(valid[:, None], scores, -np.inf)
    keep = np.zeros(scores.shape, bool)
    for b in range(B):
        for c in range(C):
            order = np.argsort(-scores[b, c], kind="stable")[:k]
            keep[b, c, order[np.isfinite(scores[b, c, order])]] = True
    return keep


@pytest.mark.parametrize("chunk", [3, 1000])
def test_twin_top_k_gather_equals_dense_masked_attention(chunk):
    model, batch = _model(TwinRanker, chunk=chunk), _batch(seed=2)
    q = _query(model, batch)
    keep = _twin_reference_selection(model, batch, q, K)
    positions, selected = model.select(q, batch)
    np.testing.assert_array_equal(_as_mask(positions, selected, L), keep)
    ref = model.attend_reference(q, batch, jnp.asarray(keep))
    np.testing.assert_allclose(model.attend(q, batch), ref, rtol=1e-5, atol=1e-6)


def test_twin_with_k_at_least_the_history_is_full_attention():
    model, batch = _model(TwinRanker, k=L), _batch(seed=3)
    q = _query(model, batch)
    np.testing.assert_allclose(
        model.attend(q, batch), model.attend_reference(q, batch), rtol=1e-5, atol=1e-6
    )
    full = ta.FullTargetAttentionRanker.attend(model, q, batch)  # the chunked online softmax
    np.testing.assert_allclose(model.attend(q, batch), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [SimHardRanker, TwinRanker])
def test_candidates_independent_and_padding_ignored(cls):
    model, batch = _model(cls), _batch(seed=4)
    logits, _ = model(batch)
    assert np.isfinite(np.asarray(logits)).all()  # the empty history included
    other = batch | {"cand_item": batch["cand_item"].at[:, 1:].set(5),
                     "cand_category": batch["cand_category"].at[:, 1:].set(2)}  # fmt: skip
    np.testing.assert_allclose(model(other)[0][:, 0], logits[:, 0], atol=1e-6)
    pad = jnp.arange(L)[None] >= batch["hist_len"][:, None]
    noisy = batch | {n: jnp.where(pad, 3, batch[n]) for n in ("hist_item", "hist_category")}
    np.testing.assert_allclose(model(noisy)[0], logits, atol=1e-6)

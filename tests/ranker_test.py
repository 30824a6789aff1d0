"""Stage-2 properties: candidates are independent, padding never matters."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vista_jax.config import RankerConfig
from vista_jax.models.ranker import Ranker

B, C, R, K, D = 3, 6, 5, 4, 8


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "recent_item": jnp.array(rng.integers(1, 30, (B, R))),
        "recent_action": jnp.array(rng.integers(1, 3, (B, R))),
        "recent_gap": jnp.array(rng.integers(0, 16, (B, R))),
        "recent_category": jnp.array(rng.integers(1, 4, (B, R))),
        "recent_len": jnp.array([R, 2, 0]),
        "summary": jnp.array(rng.normal(size=(B, K, D)), jnp.float32),
        "summary_mask": jnp.array([True, True, False]),
        "cand_item": jnp.array(rng.integers(1, 30, (B, C))),
        "cand_category": jnp.array(rng.integers(1, 4, (B, C))),
    }


def _ranker(summary_dim=D):
    cfg = RankerConfig(
        num_items=29, num_categories=3, d_model=16, num_recent=R, summary_dim=summary_dim
    )
    return Ranker(cfg, nnx.Rngs(0))


def test_one_candidate_never_depends_on_another():
    ranker, batch = _ranker(), _batch()
    logits, _ = ranker(batch)
    changed = batch | {"cand_item": batch["cand_item"].at[:, 1:].set(7)}
    np.testing.assert_allclose(ranker(changed)[0][:, 0], logits[:, 0], rtol=1e-6, atol=1e-6)
    # And the Jacobian of candidate 0's logit w.r.t. other candidates' embeddings is zero.
    cand = ranker.events.items(batch["cand_item"], batch["cand_category"])
    grads = jax.grad(lambda c: _logit_from_embeddings(ranker, batch, c)[:, 0].sum())(cand)
    np.testing.assert_array_equal(grads[:, 1:], 0.0)


def _logit_from_embeddings(ranker, batch, cand):
    context, valid = ranker.context(batch)
    x = cand
    for block in ranker.blocks:
        x = block(x, context, valid)
    feats = ranker.head_norm(jnp.concatenate([cand, x], -1))
    return ranker.head_out(jax.nn.gelu(ranker.head_in(feats)))[..., 0]


def test_padding_never_changes_scores():
    ranker, batch = _ranker(), _batch()
    logits, _ = ranker(batch)
    noisy = dict(batch)
    pad = jnp.arange(R)[None] >= batch["recent_len"][:, None]
    noisy["recent_item"] = jnp.where(pad, 13, batch["recent_item"])
    noisy["recent_action"] = jnp.where(pad, 2, batch["recent_action"])
    noisy["summary"] = jnp.where(batch["summary_mask"][:, None, None], batch["summary"], 9.0)
    np.testing.assert_allclose(ranker(noisy)[0], logits, rtol=1e-5, atol=1e-6)


def test_user_with_no_context_gets_finite_scores():
    logits, _ = _ranker(summary_dim=0)(_batch())
    assert np.isfinite(np.asarray(logits)).all()

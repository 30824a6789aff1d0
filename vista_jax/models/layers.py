"""Small building blocks shared by the summarizer and the ranker.

Parameters carry *logical* axis names only (`vocab`, `embed`, `mlp`, `heads`); the mapping to
mesh axes is configuration (see `vista_jax.sharding`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_dense_init = nnx.initializers.lecun_normal()
_embed_init = nnx.initializers.normal(stddev=0.02)


def dense(
    d_in: int,
    d_out: int,
    axes: tuple[str | None, str | None],
    rngs: nnx.Rngs,
    kernel_init=_dense_init,
    **kw,
):
    return nnx.Linear(
        d_in,
        d_out,
        kernel_init=nnx.with_partitioning(kernel_init, axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
        **kw,
    )


def embedding(num: int, dim: int, rngs: nnx.Rngs, axes=("vocab", "embed")) -> nnx.Embed:
    return nnx.Embed(num, dim, embedding_init=nnx.with_partitioning(_embed_init, axes), rngs=rngs)


def rms_norm(dim: int, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(
        dim, scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)), rngs=rngs
    )


class SGLU(nnx.Module):
    """Gated feed-forward `(x W_u * x W_v) W_o` that follows each attention in VISTA."""

    def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs):
        self.up = dense(dim, hidden, ("embed", "mlp"), rngs)
        self.gate = dense(dim, hidden, ("embed", "mlp"), rngs)
        self.down = dense(hidden, dim, ("mlp", "embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(self.up(x) * self.gate(x))


class EventEmbedding(nnx.Module):
    """History token = item + item category + action + log-gap bucket embeddings.

    Nothing here depends on when a summary is read, so incremental updates stay exact.
    """

    def __init__(self, num_items, num_actions, num_gaps, num_categories, dim: int, rngs):
        self.item = embedding(num_items + 1, dim, rngs)
        self.category = embedding(num_categories + 1, dim, rngs, axes=(None, "embed"))
        self.action = embedding(num_actions, dim, rngs, axes=(None, "embed"))
        self.gap = embedding(num_gaps, dim, rngs, axes=(None, "embed"))

    def items(self, item, category=None) -> jax.Array:
        """Item-side features (id + category): what a candidate is."""
        out = self.item(item)
        return out if category is None else out + self.category(category)

    def __call__(self, item, action, gap, category=None) -> jax.Array:
        return self.items(item, category) + self.action(action) + self.gap(gap)


def attention_logits(q, k) -> jax.Array:
    """Scaled dot products: q [B,Q,H,E], k [B,M,H,E] -> [B,H,Q,M]."""
    return jnp.einsum("bqhe,bmhe->bhqm", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)


def masked_softmax(logits, mask) -> jax.Array:
    """Softmax over the last axis where `mask` holds; a row with no allowed entry -> 0."""
    weights = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1)
    return weights * jnp.any(mask, axis=-1, keepdims=True)


def masked_softmax_attention(q, k, v, mask) -> jax.Array:
    """q [B,Q,H,E], k/v [B,M,H,E], mask broadcastable to [B,H,Q,M]; rows with no key -> 0."""
    weights = masked_softmax(attention_logits(q, k), mask)
    return jnp.einsum("bhqm,bmhe->bqhe", weights, v)

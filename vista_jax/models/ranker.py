"""Stage 2: each candidate attends to `[summary tokens; last R events]`, then an MLP scores it.

Candidates are queries only: they never attend to each other, so one candidate's score can
not depend on another's (no label leakage across candidates). A learned null key is always
present, so a user with no summary and no recent events still gets a well-defined score.
The same module is the source model's head and the downstream ranker; with
`summary_dim == 0` it is the `recent_only` baseline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vista_jax.config import RankerConfig
from vista_jax.models.layers import EventEmbedding, dense, masked_softmax_attention, rms_norm


class CrossAttentionBlock(nnx.Module):
    """Pre-norm multi-head attention from candidates to context, then an MLP."""

    def __init__(self, cfg: RankerConfig, rngs: nnx.Rngs):
        d = cfg.d_model
        self.num_heads = cfg.num_heads
        self.q_norm = rms_norm(d, rngs)
        self.kv_norm = rms_norm(d, rngs)
        self.query = dense(d, d, ("embed", "heads"), rngs)
        self.key = dense(d, d, ("embed", "heads"), rngs)
        self.value = dense(d, d, ("embed", "heads"), rngs)
        self.out = dense(d, d, ("heads", "embed"), rngs)
        self.mlp_norm = rms_norm(d, rngs)
        self.mlp_in = dense(d, cfg.mlp_hidden, ("embed", "mlp"), rngs)
        self.mlp_out = dense(cfg.mlp_hidden, d, ("mlp", "embed"), rngs)

    def _heads(self, x):
        return x.reshape(x.shape[:-1] + (self.num_heads, -1))

    def __call__(self, cand_BxCxD, context_BxNxD, context_valid_BxN):
        q = self._heads(self.query(self.q_norm(cand_BxCxD)))
        ctx = self.kv_norm(context_BxNxD)
        k, v = self._heads(self.key(ctx)), self._heads(self.value(ctx))
        o = masked_softmax_attention(q, k, v, context_valid_BxN[:, None, None, :])
        x = cand_BxCxD + self.out(o.reshape(cand_BxCxD.shape))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class Ranker(nnx.Module):
    """Scores candidates [B, C] -> logits [B, C]."""

    def __init__(self, cfg: RankerConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.d_model
        self.events = EventEmbedding(
            cfg.num_items, cfg.num_actions, cfg.num_gap_buckets, cfg.num_categories, d, rngs
        )
        init = nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "embed"))
        # Token types: 0 null key, 1 summary token, 2 recent event; plus recency positions.
        self.token_type = nnx.Param(init(rngs.params(), (3, d)))
        self.recent_position = nnx.Param(init(rngs.params(), (cfg.num_recent, d)))
        if cfg.use_summaries:
            self.summary_proj = dense(cfg.summary_dim, d, (None, "embed"), rngs)
        self.blocks = nnx.List([CrossAttentionBlock(cfg, rngs) for _ in range(cfg.num_layers)])
        self.head_norm = rms_norm(2 * d, rngs)
        self.head_in = dense(2 * d, cfg.mlp_hidden, ("embed", "mlp"), rngs)
        self.head_out = dense(cfg.mlp_hidden, 1, ("mlp", None), rngs)

    def context(self, batch) -> tuple[jax.Array, jax.Array]:
        """Keys/values [B, 1 + K + R, D] and their validity."""
        recent = self.events(
            batch["recent_item"],
            batch["recent_action"],
            batch["recent_gap"],
            batch.get("recent_category"),
        )
        recent = recent + self.recent_position[...] + self.token_type[2]
        r = recent.shape[1]
        recent_valid = jnp.arange(r)[None] < batch["recent_len"][:, None]
        b = recent.shape[0]
        null = jnp.broadcast_to(self.token_type[0], (b, 1, recent.shape[-1]))
        parts, valid = [null], [jnp.ones((b, 1), bool)]
        if self.cfg.use_summaries:
            summary = self.summary_proj(batch["summary"]) + self.token_type[1]
            parts.append(summary)
            valid.append(jnp.broadcast_to(batch["summary_mask"][:, None], summary.shape[:2]))
        parts.append(recent)
        valid.append(recent_valid)
        return jnp.concatenate(parts, 1), jnp.concatenate(valid, 1)

    def __call__(self, batch):
        """Logits [B, C] for `batch["cand_item"]` (and `cand_category`) and aux outputs."""
        cand = self.events.items(batch["cand_item"], batch.get("cand_category"))
        context, context_valid = self.context(batch)
        x = cand
        for block in self.blocks:
            x = block(x, context, context_valid)
        features = self.head_norm(jnp.concatenate([cand, x], axis=-1))
        logits = self.head_out(jax.nn.gelu(self.head_in(features)))[..., 0]
        return logits, {"attended": x}

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

    def queries(self, cand_BxCxD):  # -> [B, C, H, E]
        return self._heads(self.query(self.q_norm(cand_BxCxD)))

    def keys_values(self, context_BxNxD):  # -> k, v [B, N, H, E]; any leading dims
        ctx = self.kv_norm(context_BxNxD)
        return self._heads(self.key(ctx)), self._heads(self.value(ctx))

    def finish(self, cand_BxCxD, attended_BxCxHxE):
        """Residual around the attention output's projection, then around the MLP."""
        x = cand_BxCxD + self.out(attended_BxCxHxE.reshape(cand_BxCxD.shape))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))

    def __call__(self, cand_BxCxD, context_BxNxD, context_valid_BxN):
        k, v = self.keys_values(context_BxNxD)
        mask = context_valid_BxN[:, None, None, :]
        return self.finish(
            cand_BxCxD, masked_softmax_attention(self.queries(cand_BxCxD), k, v, mask)
        )


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

    def summary_tokens(self, summary) -> jax.Array:
        """Context tokens of summaries [..., K, summary_dim] -> [..., K, D]."""
        return self.summary_proj(summary) + self.token_type[1]

    def recent_context(self, batch) -> tuple[jax.Array, jax.Array]:
        """The null token and the last R events: tokens [B, 1 + R, D] and their validity."""
        recent = self.events(
            batch["recent_item"],
            batch["recent_action"],
            batch["recent_gap"],
            batch.get("recent_category"),
        )
        recent = recent + self.recent_position[...] + self.token_type[2]
        b, r = recent.shape[:2]
        null = jnp.broadcast_to(self.token_type[0], (b, 1, recent.shape[-1]))
        valid = jnp.arange(r)[None] < batch["recent_len"][:, None]
        return (jnp.concatenate([null, recent], 1),
                jnp.concatenate([jnp.ones((b, 1), bool), valid], 1))  # fmt: skip

    def context(self, batch) -> tuple[jax.Array, jax.Array]:
        """Keys/values [B, 1 + K + R, D] (null token, summary tokens, recent events) and
        their validity."""
        tokens, valid = self.recent_context(batch)
        if not self.cfg.use_summaries:
            return tokens, valid
        summary = self.summary_tokens(batch["summary"])
        summary_valid = jnp.broadcast_to(batch["summary_mask"][:, None], summary.shape[:2])
        return (jnp.concatenate([tokens[:, :1], summary, tokens[:, 1:]], 1),
                jnp.concatenate([valid[:, :1], summary_valid, valid[:, 1:]], 1))  # fmt: skip

    def candidates(self, batch) -> jax.Array:  # [B, C, D]
        return self.events.items(batch["cand_item"], batch.get("cand_category"))

    def head(self, cand_BxCxD, attended_BxCxD) -> jax.Array:
        """Logits [B, C] from each candidate and what it attended to."""
        features = self.head_norm(jnp.concatenate([cand_BxCxD, attended_BxCxD], axis=-1))
        return self.head_out(jax.nn.gelu(self.head_in(features)))[..., 0]

    def __call__(self, batch):
        """Logits [B, C] for `batch["cand_item"]` (and `cand_category`) and aux outputs."""
        cand = self.candidates(batch)
        context, context_valid = self.context(batch)
        x = cand
        for block in self.blocks:
            x = block(x, context, context_valid)
        return self.head(cand, x), {"attended": x}

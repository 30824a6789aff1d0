"""TWIN: the top-k history events by the second stage's own attention score, then attention.

Stage one (search) scores every history event against the candidate with the *same* query
and key projections that stage two attends with (the head-averaged scaled dot product), so
the two stages agree on what is relevant; it keeps the k highest per candidate, scanning the
history in chunks (`chunked_top_k`), O(C * (k + chunk)) memory at any length. Stage two is
the target attention of `FullTargetAttentionRanker` over `[null; those k events]`. The choice
of events carries no gradient (top-k is a selection); the scores of the chosen ones do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vista_jax.models.target_attention import FullTargetAttentionRanker, chunked_top_k


class TwinRanker(FullTargetAttentionRanker):
    """TWIN (consistency-preserving search by the attention score, then target attention)."""

    def search_scores(self, q_BxCxHxE, ids, visible_BxCxT) -> jax.Array:
        """Head-averaged attention logits [B, C, T] of a chunk of events; -inf where unread."""
        k, _ = self._keys_values(*ids)
        scale = 1.0 / (q_BxCxHxE.shape[2] * jnp.sqrt(q_BxCxHxE.shape[3]).astype(jnp.float32))
        scores = jnp.einsum("bche,bthe->bct", q_BxCxHxE, k) * scale
        return jnp.where(visible_BxCxT, scores, -jnp.inf)

    def select(self, q_BxCxHxE, batch) -> tuple[jax.Array, jax.Array]:
        """(positions [B, C, k], selected [B, C, k]) of the k best-scoring history events."""
        q = jax.lax.stop_gradient(q_BxCxHxE)
        item, action, gap, category = self._history_ids(batch)
        span = self.history_span(batch, q.shape[1])

        def score(pos_T, item, action, gap, category):
            return self.search_scores(q, (item, action, gap, category), self.visible(span, pos_T))

        xs = (item, action, gap, category)
        top, positions = chunked_top_k(score, xs, self.top_k, self.chunk_size, q.shape[1])
        return positions, jnp.isfinite(top)

    def attend(self, q_BxCxHxE, batch) -> jax.Array:
        positions, selected = self.select(q_BxCxHxE, batch)
        return self.attend_gathered(q_BxCxHxE, batch, positions, selected)

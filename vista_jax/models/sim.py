"""SIM-hard: the history events of the candidate's category, then attention to the latest k.

Stage one (search) keeps, per candidate, the valid history events whose category equals the
candidate's, and of those the k most recent (highest positions); stage two is the target
attention of `FullTargetAttentionRanker` over `[null; those k events]`. The search scans the
history in chunks (`chunked_top_k` with score = position), so memory stays O(C * (k + chunk))
at any length. An item of unknown category (0) matches history events of unknown category,
so on a log without categories SIM-hard reads the last k events.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vista_jax.models.target_attention import FullTargetAttentionRanker, chunked_top_k


def sim_hard_select(hist_category_BxL, span, cand_category_BxC, k: int, chunk: int):
    """(positions [B, C, k], selected [B, C, k]): the latest k same-category events.

    `span` = (begin, end) [B, C]: candidate c searches history positions [begin, end).
    """

    def score(pos_T, category_BxT):
        match = category_BxT[:, None, :] == cand_category_BxC[:, :, None]
        match &= FullTargetAttentionRanker.visible(span, pos_T)
        return jnp.where(match, pos_T.astype(jnp.float32), -jnp.inf)

    top, positions = chunked_top_k(
        score, (hist_category_BxL,), k, chunk, cand_category_BxC.shape[1]
    )
    return positions, jnp.isfinite(top)


class SimHardRanker(FullTargetAttentionRanker):
    """SIM-hard (category search, then target attention to the latest `top_k` matches)."""

    def select(self, batch, cand_category_BxC) -> tuple[jax.Array, jax.Array]:
        category = batch.get("hist_category")
        if category is None:  # No categories: every event matches (the last k events).
            category = jnp.zeros_like(batch["hist_item"])
        span = self.history_span(batch, cand_category_BxC.shape[1])
        return sim_hard_select(category, span, cand_category_BxC, self.top_k, self.chunk_size)

    def attend(self, q_BxCxHxE, batch) -> jax.Array:
        """Searches by `batch["cand_category"]` (unknown, 0, when absent), then attends."""
        cand_category_BxC = batch.get("cand_category")
        if cand_category_BxC is None:
            cand_category_BxC = jnp.zeros(q_BxCxHxE.shape[:2], jnp.int32)
        positions, selected = self.select(batch, cand_category_BxC)
        return self.attend_gathered(q_BxCxHxE, batch, positions, selected)

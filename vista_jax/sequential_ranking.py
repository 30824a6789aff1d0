"""Event ranking scored at every position: one causal pass per row scores all its events.

The task of `experiments/*/config.py:ranking` (docs/PROTOCOLS.md §2: each event a request
whose one candidate is its own item, label = rating >= 4, history = the user's events before
it), computed the way the retrieval encoders train. An encoder (SASRec, HSTU or the VISTA
retriever, `vista_jax.models.sequential`) reads a row of W events once; its output at
position p has read events <= p only (causal), and meets the candidate of event p + 1 in a
small head:

  u = encoder output at p (L2-normalized),  c = the candidate's row of the tied item table
  (L2-normalized),  logit = MLP(norm([u; c; u * c]))

Rows come from `vista_jax.data.sequences.event_ranking` (`target` = the candidate's item,
0 where a position scores nothing; `label`; the input events' `action` ids). So a scored
event costs its share of one pass over the row, not a pass over its own history: what makes
every event of ML-1M a request on a CPU. The loss is the mean binary cross-entropy over the
scored positions of the batch.

Dimension letters: B rows, L positions, D width.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vista_jax.models.seq_layers import l2_normalize
from vista_jax.retrieval import batch_inputs, fast_key, keyed_train_step, lifelong_inputs


class RankingHead(nnx.Module):
    """(user [B, L, D], candidate [B, L, D]) -> logits [B, L]."""

    def __init__(self, d_model: int, hidden: int, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(3 * d_model, rngs=rngs)
        self.hidden = nnx.Linear(3 * d_model, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, user_BxLxD, cand_BxLxD):
        x = self.norm(jnp.concatenate([user_BxLxD, cand_BxLxD, user_BxLxD * cand_BxLxD], -1))
        return self.out(jax.nn.gelu(self.hidden(x)))[..., 0]


class PositionRanker(nnx.Module):
    """A sequential encoder and a `RankingHead`: `batch` rows -> logits [B, L]."""

    def __init__(self, encoder: nnx.Module, rngs: nnx.Rngs, hidden: int = 0):
        self.encoder = encoder
        d = encoder.cfg.d_model
        self.head = RankingHead(d, hidden or 2 * d, rngs)

    def __call__(self, batch, dropout_key=None):
        user_BxLxD, _ = self.encoder(
            *batch_inputs(batch), dropout_key=dropout_key, **lifelong_inputs(batch)
        )
        cand_BxLxD = l2_normalize(self.encoder.items_table()[batch["target"]])
        return self.head(user_BxLxD, cand_BxLxD)


def bce_loss(logits_BxL, label_BxL, scored_BxL):
    """Mean binary cross-entropy over the scored positions (and their count)."""
    losses = optax.sigmoid_binary_cross_entropy(logits_BxL, label_BxL)
    weight = scored_BxL.astype(losses.dtype)
    count = jnp.sum(weight)
    return jnp.sum(losses * weight) / jnp.maximum(count, 1.0), count


def make_train_step(graphdef, tx: optax.GradientTransformation) -> Callable:
    """train_step(state, batch, key) -> (state, metrics): pure; jit it with donated state."""

    def loss_of(params, batch, key):
        model: PositionRanker = nnx.merge(graphdef, params)
        logits = model(batch, dropout_key=fast_key(key))
        loss, count = bce_loss(logits, batch["label"], batch["target"] > 0)
        return loss, {"loss": loss, "positions": count}

    return keyed_train_step(tx, loss_of)


def make_logits_fn(graphdef) -> Callable:
    """logits(params, batch) -> [B, L], deterministic (no dropout)."""

    def logits(params, batch):
        return nnx.merge(graphdef, params)(batch)

    return logits

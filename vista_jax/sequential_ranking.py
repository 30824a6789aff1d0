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

The request-form rankers (full target attention, SIM-hard, TWIN, recent-N:
`vista_jax.models.target_attention`) score the same rows through `PositionTargetRanker`:
`position_requests` turns a row into one request per position, whose history is the row's
`[prefix; window]` and whose candidate p reads only the span of it before event p + 1, so
each position's logit equals the request form's on that event's own history (tested).

VISTA's own stage 2 (`vista_jax.models.ranker.Ranker`: the candidate attends to `[summary
tokens; last R events]`) scores the rows through `PositionSummaryRanker`, reading the
summaries a source retriever exported to the summary store (`retrieval_cache.attach`):
position p reads the K tokens of snapshot (p + 1) // S, as the retriever does, and the last
R window events up to p; each position is the request form's `Ranker` on those inputs
(tested), the summary tokens' keys and values computed once per snapshot, not per position.

Dimension letters: B rows, L positions, D width, P prefix events, J snapshots, K summary
tokens, R recent events.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vista_jax.models.layers import attention_logits, masked_softmax
from vista_jax.models.seq_layers import from_snapshot_blocks, l2_normalize, snapshot_blocks
from vista_jax.retrieval import batch_inputs, extra_inputs, fast_key, keyed_train_step


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
            *batch_inputs(batch), dropout_key=dropout_key, **extra_inputs(batch)
        )
        cand_BxLxD = l2_normalize(self.encoder.items_table()[batch["target"]])
        return self.head(user_BxLxD, cand_BxLxD)


def right_aligned(x_BxP, count_B):
    """A left-aligned [B, P] array (count valid entries each) moved to its right end."""
    p = x_BxP.shape[1]
    shift_B = p - count_B
    index_BxP = (jnp.arange(p)[None] - shift_B[:, None]) % p  # Wraps onto the zero padding.
    return jnp.take_along_axis(x_BxP, index_BxP, axis=1)


def position_requests(batch) -> dict:
    """Request-form inputs of rows: candidate p (`target[p]`) with history `[prefix; window]`.

    The prefix moves to the right end of its P slots, so the valid history is one contiguous
    run; candidate p reads positions [P - its prefix count, P + p] (`cand_hist_begin/end`):
    the user's events before the event it scores, as far back as the row reaches.
    """
    names = ("item", "action", "gap", "category")
    b, length = batch["item"].shape
    prefix_len = batch["prefix"].shape[1] if "prefix" in batch else 0
    count_B = jnp.sum(batch["prefix"] > 0, axis=1) if prefix_len else jnp.zeros(b, jnp.int32)
    hist = {}
    for name in names:
        window = batch[name]
        if prefix_len:
            prefix = batch["prefix" if name == "item" else f"prefix_{name}"]
            window = jnp.concatenate([right_aligned(prefix, count_B), window], axis=1)
        hist[f"hist_{name}"] = window
    end_BxL = jnp.broadcast_to(prefix_len + jnp.arange(length, dtype=jnp.int32) + 1, (b, length))
    return hist | {
        "hist_len": prefix_len + jnp.sum(batch["item"] > 0, axis=1),
        "cand_item": batch["target"],
        "cand_category": batch["target_category"],
        "cand_hist_begin": jnp.broadcast_to((prefix_len - count_B)[:, None], (b, length)),
        "cand_hist_end": end_BxL,
    }


class PositionTargetRanker(nnx.Module):
    """A request-form ranker (`FullTargetAttentionRanker` or a subclass) over rows: -> [B, L]."""

    def __init__(self, ranker: nnx.Module):
        self.ranker = ranker

    def __call__(self, batch, dropout_key=None):
        del dropout_key  # The request-form rankers have no dropout.
        logits_BxL, _ = self.ranker(position_requests(batch))
        return logits_BxL


def position_recent(batch, num_recent: int) -> dict:
    """Per position p, the last R window events up to p, left aligned: `recent_*` [B, L, R]
    and `recent_len` [L] (the request form's `examples.recent_arrays`)."""
    length = batch["item"].shape[1]
    p_L = jnp.arange(length)
    len_L = jnp.minimum(p_L + 1, num_recent)
    slot_LxR = (p_L + 1 - len_L)[:, None] + jnp.arange(num_recent)[None]
    valid_LxR = jnp.arange(num_recent)[None] < len_L[:, None]
    out = {
        f"recent_{name}": jnp.where(valid_LxR, batch[name][:, jnp.minimum(slot_LxR, length - 1)], 0)
        for name in ("item", "action", "gap", "category")
    }
    return out | {"recent_len": len_L}


class PositionSummaryRanker(nnx.Module):
    """VISTA's stage 2 (`Ranker`) at every position of cache-fed rows: -> logits [B, L].

    Reads `summary_values` [, `summary_scale`] (the row's J snapshots, `retrieval.
    extra_inputs` dequantizes them), the window and the targets; never the prefix. A
    `Ranker` without summaries (`summary_dim` 0) is the recent-only baseline: it reads the
    last R events alone.

    Position p reads snapshot (p + 1) // S; with `summary_lag` L (the staleness ablation) the
    one L·S events older, max(0, (p + 1) // S - L). Snapshot 0 (the events before the row)
    is the oldest a row holds, so that is exact where the row starts at the user's first
    event (a summary older than the user is empty) or (p + 1) // S >= L, and fresher than
    asked elsewhere (`stale_inexact` counts those positions).
    """

    def __init__(self, ranker: nnx.Module, snapshot_every: int, summary_lag: int = 0):
        self.ranker, self.snapshot_every = ranker, snapshot_every
        self.summary_lag = summary_lag  # Snapshots behind the freshest (staleness ablation).

    def requests(self, batch) -> dict:
        """Every position of the rows as a request of the `Ranker` ([B * L] leading), its
        candidate and last R events; not its summary (`__call__` reads the snapshots)."""
        b, length = batch["item"].shape
        recent = position_recent(batch, self.ranker.cfg.num_recent)
        n = b * length
        requests = {
            k: v.reshape((n,) + v.shape[2:]) for k, v in recent.items() if k != "recent_len"
        }
        return requests | {
            "recent_len": jnp.broadcast_to(recent["recent_len"], (b, length)).reshape(n),
            "cand_item": batch["target"].reshape(n, 1),
            "cand_category": batch["target_category"].reshape(n, 1),
        }

    def __call__(self, batch, dropout_key=None):
        del dropout_key  # The ranker has no dropout.
        b, length = batch["item"].shape
        requests = self.requests(batch)
        if not self.ranker.cfg.use_summaries:
            logits, _ = self.ranker(requests)
            return logits.reshape(b, length)
        return self._with_summaries(batch, requests, b, length).reshape(b, length)

    def _with_summaries(self, batch, requests, b: int, length: int):
        """`Ranker` at every position, its summary tokens' keys and values computed once per
        snapshot, not once per position: positions p with (p + 1) // S = j all read snapshot
        j (minus the lag), so each such block of S positions meets its snapshot's K tokens in
        one batched product. One softmax over the null token, the R events and the K tokens,
        as the request form. Logits [B * L, 1]."""
        ranker, every = self.ranker, self.snapshot_every
        j = length // every + 1
        read_J = jnp.maximum(jnp.arange(j) - self.summary_lag, 0)
        summary = ranker.summary_tokens(extra_inputs(batch)["summary_BxJxKxD"][:, read_J])
        summary_BJxKxD = summary.reshape((b * j,) + summary.shape[2:])

        def blocks(x_BxLx):  # [B, L, ...] -> [B * J, S, ...]
            x = snapshot_blocks(x_BxLx, every, j)
            return x.reshape((b * j,) + x.shape[2:])

        def positions(x_BJxSx):  # `blocks` undone: -> [B * L, ...]
            x = from_snapshot_blocks(x_BJxSx.reshape((b, j) + x_BJxSx.shape[1:]), length)
            return x.reshape((b * length,) + x.shape[2:])

        cand_NxCxD = ranker.candidates(requests)  # N = B * L requests, C = 1 candidate each
        rest_NxMxD, rest_valid_NxM = ranker.recent_context(requests)  # M = 1 + R
        m, k_tokens = rest_valid_NxM.shape[1], summary.shape[2]
        valid = jnp.pad(rest_valid_NxM, [(0, 0), (0, k_tokens)], constant_values=True)
        x = cand_NxCxD
        for block in ranker.blocks:
            q_NxCxHxE = block.queries(x)
            k_NxMxHxE, v_NxMxHxE = block.keys_values(rest_NxMxD)
            k_BJxKxHxE, v_BJxKxHxE = block.keys_values(summary_BJxKxD)
            q_BJxSxHxE = blocks(q_NxCxHxE.reshape((b, length) + q_NxCxHxE.shape[2:]))
            summary_logits = attention_logits(q_BJxSxHxE, k_BJxKxHxE)  # [B * J, H, S, K]
            summary_logits_NxHxK = positions(jnp.swapaxes(summary_logits, 1, 2))
            logits_NxHxCxMK = jnp.concatenate(
                [attention_logits(q_NxCxHxE, k_NxMxHxE), summary_logits_NxHxK[:, :, None]], -1
            )
            weights = masked_softmax(logits_NxHxCxMK, valid[:, None, None, :])
            attended_NxCxHxE = jnp.einsum("bhqm,bmhe->bqhe", weights[..., :m], v_NxMxHxE)
            w_BxLxHxK = weights[:, :, 0, m:].reshape((b, length) + weights.shape[1:2] + (-1,))
            from_summary = jnp.einsum("bshk,bkhe->bshe", blocks(w_BxLxHxK), v_BJxKxHxE)
            attended_NxCxHxE += positions(from_summary)[:, None]
            x = block.finish(x, attended_NxCxHxE)
        return ranker.head(cand_NxCxD, x)


def stale_inexact(start_B, scored_BxL, snapshot_every: int, summary_lag: int) -> int:
    """How many scored positions `PositionSummaryRanker(summary_lag=...)` reads fresher than
    asked: rows that start after the user's first event where (p + 1) // S < the lag."""
    p = np.arange(scored_BxL.shape[1])
    short = (p + 1) // snapshot_every < summary_lag
    return int(np.sum(scored_BxL & short[None, :] & (np.asarray(start_B) > 0)[:, None]))


def bce_loss(logits_BxL, label_BxL, scored_BxL):
    """Mean binary cross-entropy over the scored positions (and their count)."""
    losses = optax.sigmoid_binary_cross_entropy(logits_BxL, label_BxL)
    weight = scored_BxL.astype(losses.dtype)
    count = jnp.sum(weight)
    return jnp.sum(losses * weight) / jnp.maximum(count, 1.0), count


def make_train_step(graphdef, tx: optax.GradientTransformation) -> Callable:
    """train_step(state, batch, key) -> (state, metrics): pure; jit it with donated state."""

    def loss_of(params, batch, key):
        model = nnx.merge(graphdef, params)  # PositionRanker or PositionTargetRanker
        logits = model(batch, dropout_key=fast_key(key))
        loss, count = bce_loss(logits, batch["label"], batch["target"] > 0)
        return loss, {"loss": loss, "positions": count}

    return keyed_train_step(tx, loss_of)


def make_logits_fn(graphdef) -> Callable:
    """logits(params, batch) -> [B, L], deterministic (no dropout)."""

    def logits(params, batch):
        return nnx.merge(graphdef, params)(batch)

    return logits

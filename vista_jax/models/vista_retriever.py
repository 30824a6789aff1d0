"""The VISTA retriever: every position reads its snapshot's summary plus the last R events.

Trained like SASRec/HSTU (every position supervised by the next item, sampled softmax over
L2-normalized tied item embeddings), in one pass over a left-aligned window of L events:

  stage 1  causal QLA layers scan the window in chunks of S events; the per-layer states
           after each chunk are the snapshots 0..L/S (snapshot j covers events [0, jS));
           learned seeds read each snapshot's states -> K summary tokens per snapshot.
  stage 2  position t (which predicts event t+1) attends to the K summary tokens of
           snapshot j(t) = (t+1) // S and to the raw events (t-R, t] (R >= S, so every event
           before t+1 is in the summary or in the raw window; none after): with SASRec blocks
           (softmax, position only; `stage2="sasrec"`) or HSTU blocks (point-wise SiLU with
           relative position and time biases on raw keys; `stage2="hstu"`).

So stage 2 reads K + R tokens per position, whatever the history length: with the summaries
cached, serving cost does not grow with history. With a lifelong `prefix` (the events before
the window), every snapshot also covers the whole prefix: the summarizer's states start from
the prefix's states instead of zero. The prefix pass is forward-only (stop-gradient; the same
layers learn from the window), so its training cost is one chunked QLA pass. The stage-2
mask is static (snapshots sit at fixed window positions), so one batched attention serves
every position.

Dimension letters: B batch, L positions, K seeds, J snapshots (L/S + 1), D width, H heads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vista_jax.config import SummarizerConfig
from vista_jax.models import hstu, qla
from vista_jax.models.layers import rms_norm
from vista_jax.models.sasrec import _LN_EPS, SASRecBlock
from vista_jax.models.seq_layers import (
    KeySplitter,
    dropout,
    from_snapshot_blocks,
    l2_normalize,
    layer_norm,
    param,
    snapshot_blocks,
)
from vista_jax.models.summarizer import SummarizerLayer
from vista_jax.quantize import dequantize_int8, quantize_int8


def stage2_mask(length: int, snapshot_every: int, num_seeds: int, num_recent: int) -> np.ndarray:
    """bool [L, J*K + L]: position t sees snapshot (t+1)//S's K tokens and events (t-R, t]."""
    t = np.arange(length)[:, None]
    num_snapshots = length // snapshot_every + 1
    snapshot_of_key = np.repeat(np.arange(num_snapshots), num_seeds)[None]
    summary = snapshot_of_key == (t + 1) // snapshot_every
    u = np.arange(length)[None]
    recent = (u <= t) & (u > t - num_recent)
    return np.concatenate([summary, recent], axis=1)


class SummaryAttentionBlock(SASRecBlock):
    """A SASRec block whose keys are [summary tokens; raw events] under `stage2_mask`."""

    def _heads_first(self, x):  # [B, N, D] -> [B, H, N, E]
        return self._heads(x).transpose(0, 2, 1, 3)

    def __call__(self, x_BxLxD, summary_BxNxD, mask_LxM, valid_BxL, keys):
        q_in = layer_norm(x_BxLxD, _LN_EPS)
        k, v = jnp.split(self.key_value(jnp.concatenate([summary_BxNxD, x_BxLxD], 1)), 2, -1)
        q, k, v = (self._heads_first(t) for t in (self.query(q_in), k, v))
        logits = jnp.einsum("bhle,bhme->bhlm", q / math.sqrt(q.shape[-1]), k)
        weights = jax.nn.softmax(jnp.where(mask_LxM, logits, -1e30), axis=-1)
        attended = jnp.einsum("bhlm,bhme->bhle", dropout(weights, self.attn_rate, keys()), v)
        attended = attended.transpose(0, 2, 1, 3).reshape(x_BxLxD.shape)
        y = layer_norm(q_in + self.out(attended), _LN_EPS)
        h = dropout(jax.nn.relu(self.ffn_in(y)), self.rate, keys())
        out = y + dropout(self.ffn_out(h), self.rate, keys())
        return out * valid_BxL[..., None].astype(out.dtype)


class SummaryHSTUBlock(hstu.HSTUBlock):
    """An HSTU block whose position t also reads the K summary tokens of snapshot (t+1)//S.

    Raw keys (t-R, t] keep HSTU's relative position and time biases; summary keys have one
    learned bias per seed slot (a summary has no single position or time). Both go through
    the same point-wise SiLU / n, their sum is gated by u, as in `HSTUBlock`. Queries are
    grouped by snapshot, so summary attention costs L x K scores, not L x J x K.
    """

    def __init__(self, cfg, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        self.num_recent, self.snapshot_every = cfg.num_recent, cfg.snapshot_every
        self.summary_bias = param(nnx.initializers.normal(0.02), (cfg.num_seeds,), (None,), rngs)

    def summary_attention(self, q_BxHxLxE, k_BxHxJxKxE, v_BxHxJxKxE) -> jax.Array:
        """Position t reads snapshot (t+1)//S: shift queries by one, cut into J blocks of S."""
        j, length = k_BxHxJxKxE.shape[2], q_BxHxLxE.shape[2]
        q_BxHxJxSxE = snapshot_blocks(q_BxHxLxE, self.snapshot_every, j, axis=2)
        scores = jnp.einsum("bhjse,bhjke->bhjsk", q_BxHxJxSxE, k_BxHxJxKxE)
        weights = jax.nn.silu(scores + self.summary_bias[...]) / self.max_len
        out = jnp.einsum("bhjsk,bhjke->bhjse", weights, v_BxHxJxKxE)
        return from_snapshot_blocks(out, length, axis=2)

    def __call__(self, x_BxLxD, summary_BxJxKxD, buckets_BxLxL, keys):
        u, v, q, k = self.split_projection(x_BxLxD)
        b, j, num_seeds, d = summary_BxJxKxD.shape
        _, v_s, _, k_s = self.split_projection(summary_BxJxKxD.reshape(b, j * num_seeds, d))
        per_snapshot = lambda t: self.heads(t).reshape(b, self.num_heads, j, num_seeds, -1)  # noqa: E731
        q_BxHxLxE = self.heads(q)
        recent = self.attention(
            q_BxHxLxE, self.heads(k), self.heads(v), buckets_BxLxL, self.num_recent
        )
        summary = self.summary_attention(q_BxHxLxE, per_snapshot(k_s), per_snapshot(v_s))
        return self.gate_and_project(u, recent + summary, x_BxLxD, keys)


class SnapshotSummarizer(nnx.Module):
    """Causal QLA layers over chunks of S events; K seed tokens read each snapshot."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        scfg = SummarizerConfig(
            num_items=cfg.num_items, d_model=cfg.d_model, num_heads=cfg.summary_heads,
            num_layers=cfg.summary_layers, num_seeds=cfg.num_seeds,
            sglu_hidden=2 * cfg.d_model,
        )  # fmt: skip
        self.cfg = scfg
        self.layers = nnx.List([SummarizerLayer(scfg, rngs) for _ in range(scfg.num_layers)])
        init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("seeds", "embed"))
        self.seeds = nnx.Param(init(rngs.params(), (scfg.num_seeds, scfg.d_model)))
        self.final_norm = rms_norm(scfg.d_model, rngs)

    def zero_states(self, batch: int) -> list[qla.QLAState]:
        e = self.cfg.d_model // self.cfg.num_heads
        return [qla.QLAState.zeros(batch, self.cfg.num_heads, e) for _ in self.layers]

    def _fold(self, h, valid, states) -> list[qla.QLAState]:
        """One chunk of events through every layer: the states after it."""
        new = []
        for layer, state in zip(self.layers[:-1], states[:-1], strict=True):
            h, state = layer.history(h, valid, state, "parallel")
            new.append(state)
        return new + [self.layers[-1].fold_state(h, valid, states[-1])]

    def prefix_states(self, x_BxPxD, valid_BxP, chunk: int = 128) -> list[qla.QLAState]:
        """States after a (long) prefix, scanning chunks of `chunk` events."""
        b, p, d = x_BxPxD.shape
        n = -(-p // chunk)
        pad = n * chunk - p
        x = jnp.pad(x_BxPxD, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d)
        valid = jnp.pad(valid_BxP, ((0, 0), (0, pad))).reshape(b, n, chunk)
        step = lambda states, xs: (self._fold(xs[0], xs[1], states), None)  # noqa: E731
        states, _ = jax.lax.scan(
            step, self.zero_states(b), (x.swapaxes(0, 1), valid.swapaxes(0, 1))
        )
        return states

    def snapshot_states(self, x_BxLxD, valid_BxL, every: int, states=None) -> list[qla.QLAState]:
        """Per layer, the states of snapshots 0..L/S stacked on a leading J axis."""
        states = self.zero_states(x_BxLxD.shape[0]) if states is None else states
        snaps = [states]
        for start in range(0, x_BxLxD.shape[1] - every + 1, every):
            h, valid = x_BxLxD[:, start : start + every], valid_BxL[:, start : start + every]
            states = self._fold(h, valid, states)
            snaps.append(states)
        return [jax.tree.map(lambda *s: jnp.stack(s), *per) for per in zip(*snaps, strict=True)]

    def __call__(self, x_BxLxD, valid_BxL, every: int, states=None) -> jax.Array:
        """Summary tokens of every snapshot: [B, J, K, D] (continuing `states` if given)."""
        stacked = self.snapshot_states(x_BxLxD, valid_BxL, every, states)
        j, b = stacked[0].count.shape
        flat = [jax.tree.map(lambda s: s.reshape((j * b,) + s.shape[2:]), s) for s in stacked]
        t = jnp.broadcast_to(self.seeds[...], (j * b,) + self.seeds.shape)
        for layer, state in zip(self.layers, flat, strict=True):
            t = layer.seeds(t, state)
        return self.final_norm(t).reshape((j, b) + t.shape[1:]).transpose(1, 0, 2, 3)


class VistaRetriever(nnx.Module):
    """item/time/valid [B, L] -> (L2-normalized user embeddings [B, L, D], aux).

    The same interface as `SequentialEncoder`, so the retrieval harness trains either.
    `quantize_summaries` runs stage 2 on int8 summaries (one scale per token), as a model
    reading the cache does. With `cfg.summary_source == "cached"` the model is a downstream
    retriever: it has no summarizer and reads every snapshot's summary tokens from its input
    (`summary_BxJxKxD`, read from a summary store), so it never sees the history beyond the
    window and its cost does not depend on it.
    """

    def __init__(self, cfg, rngs: nnx.Rngs):
        from vista_jax.models.sequential import InputEmbedding  # Avoids an import cycle.

        if cfg.max_len % cfg.snapshot_every or cfg.num_recent < cfg.snapshot_every:
            raise ValueError("need max_len % snapshot_every == 0 and num_recent >= snapshot_every")
        self.cfg = cfg
        self.embed = InputEmbedding(cfg, rngs)
        if cfg.summary_source == "live":
            self.summarizer = SnapshotSummarizer(cfg, rngs)
        block = SummaryHSTUBlock if cfg.stage2 == "hstu" else SummaryAttentionBlock
        self.blocks = nnx.List([block(cfg, rngs) for _ in range(cfg.num_blocks)])
        self.quantize_summaries = False

    def items_table(self) -> jax.Array:
        return self.embed.items[...]

    def normalized_items(self) -> jax.Array:
        return l2_normalize(self.items_table(), self.cfg.l2_eps)

    def snapshot_summaries(
        self, x_BxLxD, valid_BxL, prefix_BxP=None, prefix_action_BxP=None
    ) -> jax.Array:
        """Summary tokens of every snapshot of the window (and prefix): [B, J, K, D]."""
        if self.cfg.summary_source != "live":
            raise ValueError("a cached-summary VistaRetriever needs summary_BxJxKxD")
        states = self._prefix_states(prefix_BxP, prefix_action_BxP)
        return self.summarizer(x_BxLxD, valid_BxL, self.cfg.snapshot_every, states)

    def summaries(
        self, item_BxL, prefix_BxP=None, action_BxL=None, prefix_action_BxP=None
    ) -> jax.Array:
        """Deterministic summaries of a batch of windows: what a summary cache stores."""
        valid_BxL = item_BxL > 0
        x_BxLxD = self.embed(item_BxL, valid_BxL, None, action_BxL)
        return self.snapshot_summaries(x_BxLxD, valid_BxL, prefix_BxP, prefix_action_BxP)

    def _prefix_states(self, prefix_BxP, prefix_action_BxP=None):
        """Stop-gradient states of the events before the window (None without a prefix)."""
        if prefix_BxP is None or prefix_BxP.shape[1] == 0:
            return None
        x = self.embed.events(prefix_BxP, prefix_action_BxP)  # No window positions.
        valid = prefix_BxP > 0
        return jax.lax.stop_gradient(self.summarizer.prefix_states(x * valid[..., None], valid))

    def __call__(
        self,
        item_BxL,
        valid_BxL,
        time_BxL=None,
        next_time_BxL=None,
        dropout_key=None,
        prefix_BxP=None,
        summary_BxJxKxD=None,
        action_BxL=None,
        prefix_action_BxP=None,
    ):
        keys = KeySplitter(dropout_key)
        x_BxLxD = self.embed(item_BxL, valid_BxL, keys(), action_BxL)
        if summary_BxJxKxD is None:
            summary_BxJxKxD = self.snapshot_summaries(
                x_BxLxD, valid_BxL, prefix_BxP, prefix_action_BxP
            )
        elif self.cfg.summary_source == "live":
            raise ValueError("a live-summary VistaRetriever computes its own summaries")
        if self.quantize_summaries:
            q, scale = quantize_int8(summary_BxJxKxD)
            summary_BxJxKxD = dequantize_int8(q, scale)
        if self.cfg.stage2 == "hstu":  # Time-aware, as HSTU: time_BxL is then required.
            query_BxL = next_time_BxL if self.cfg.query_time == "next" else time_BxL
            buckets = hstu.time_buckets(query_BxL, time_BxL, self.cfg.num_time_buckets)
            for block in self.blocks:
                x_BxLxD = block(x_BxLxD, summary_BxJxKxD, buckets, keys)
        else:  # Position and order only, as SASRec.
            b, j, k, d = summary_BxJxKxD.shape
            summary_BxNxD = summary_BxJxKxD.reshape(b, j * k, d)
            mask = stage2_mask(item_BxL.shape[1], self.cfg.snapshot_every, k, self.cfg.num_recent)
            for block in self.blocks:
                x_BxLxD = block(x_BxLxD, summary_BxNxD, mask, valid_BxL, keys)
        return l2_normalize(x_BxLxD, self.cfg.l2_eps), {"summary": summary_BxJxKxD}

    def encode_last(
        self, item_BxL, valid_BxL, time_BxL=None, next_time_BxL=None, prefix_BxP=None,
        summary_BxJxKxD=None,
    ):  # fmt: skip
        from vista_jax.models.sequential import at_last_valid  # noqa: PLC0415 (import cycle)

        user_BxLxD, _ = self(
            item_BxL, valid_BxL, time_BxL, next_time_BxL, None, prefix_BxP, summary_BxJxKxD
        )
        return at_last_valid(user_BxLxD, valid_BxL)

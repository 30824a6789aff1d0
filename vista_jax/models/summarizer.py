"""Stage 1: K learned seeds in the target slot summarize a user's whole history.

History rows run causal QLA layers (each row reads its prefix only); the seeds read every
layer's final history state and themselves, never each other, and history rows never read
the seeds. The summary is therefore a function of the per-layer `QLAState`s alone, which is
what makes chunked training, cache builds and exact incremental updates possible:

  states  = summarizer.history_states(events)            # O(L), any form
  states' = summarizer.history_states(new_events, states) # continue a stored history
  summary = summarizer.readout(states)                   # O(K), independent of L

`attention="softmax"` swaps QLA for full softmax attention (the paper's baseline): same
parameters and seeds, O(L^2), no states.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vista_jax.config import SummarizerConfig
from vista_jax.models import qla
from vista_jax.models.layers import (
    SGLU,
    EventEmbedding,
    dense,
    masked_softmax_attention,
    rms_norm,
)

FORMS = ("parallel", "chunked", "recurrent")


class SummarizerLayer(nnx.Module):
    """Pre-norm attention + SGLU, shared by the history rows and the seeds."""

    def __init__(self, cfg: SummarizerConfig, rngs: nnx.Rngs):
        d = cfg.d_model
        self.num_heads = cfg.num_heads
        self.attn_norm = rms_norm(d, rngs)
        self.query = dense(d, d, ("embed", "heads"), rngs)
        self.key = dense(d, d, ("embed", "heads"), rngs)
        self.value = dense(d, d, ("embed", "heads"), rngs)
        self.out = dense(d, d, ("heads", "embed"), rngs)
        self.ffn_norm = rms_norm(d, rngs)
        self.ffn = SGLU(d, cfg.sglu_hidden, rngs)

    def _heads(self, x):
        return x.reshape(x.shape[:-1] + (self.num_heads, -1))

    def qkv(self, x, phi: bool = True):
        a = self.attn_norm(x)
        q, k, v = (self._heads(proj(a)) for proj in (self.query, self.key, self.value))
        return (jax.nn.silu(q), jax.nn.silu(k), v) if phi else (q, k, v)

    def kv(self, x):
        a = self.attn_norm(x)
        return jax.nn.silu(self._heads(self.key(a))), self._heads(self.value(a))

    def finish(self, x, attended):
        """Residual around attention, then residual around the SGLU."""
        x = x + self.out(attended.reshape(attended.shape[:-2] + (-1,)))
        return x + self.ffn(self.ffn_norm(x))

    def history(self, h, valid, state, form: str):
        """Causal QLA over history rows h [B,L,D]; returns (new rows, final state).

        `form` is "parallel", "recurrent", or "chunk_step" (one step of the chunked form: the
        summarizer scans chunks through all layers itself, see `_chunked_states`).
        """
        q, k, v = self.qkv(h)
        if form == "parallel":
            o, state = qla.qla_parallel(q, k, v, valid, state)
        elif form == "recurrent":
            o, state = qla.qla_recurrent(q, k, v, valid, state)
        else:
            o, state = qla.qla_chunk_step(state, q, k, v, valid)
        return self.finish(h, o), state

    def fold_state(self, h, valid, state: qla.QLAState) -> qla.QLAState:
        """Last layer: its history outputs are never read, only its state."""
        k, v = self.kv(h)
        w = valid.astype(jnp.float32)
        kv = jnp.einsum("blhe,blhf->bhef", k * w[..., None, None], v)
        return qla.QLAState(state.kv_sum + kv, state.count + w.sum(axis=1))

    def seeds(self, t, state: qla.QLAState):
        q, k, v = self.qkv(t)
        return self.finish(t, qla.seed_readout(q, k, v, state))

    def softmax(self, h, t, valid):
        """Softmax baseline: causal rows; seeds read all valid rows and themselves."""
        qh, kh, vh = self.qkv(h, phi=False)
        qt, kt, vt = self.qkv(t, phi=False)
        length = h.shape[1]
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        oh = masked_softmax_attention(qh, kh, vh, causal & valid[:, None, None, :])
        # Seeds: logits over history keys plus a diagonal self logit.
        scale = jnp.sqrt(qt.shape[-1]).astype(qt.dtype)
        hist_logits = jnp.einsum("bkhe,blhe->bhkl", qt, kh) / scale
        hist_logits = jnp.where(valid[:, None, None, :], hist_logits, -1e30)
        self_logit = jnp.einsum("bkhe,bkhe->bhk", qt, kt)[..., None] / scale
        weights = jax.nn.softmax(jnp.concatenate([hist_logits, self_logit], -1), axis=-1)
        ot = jnp.einsum("bhkl,blhe->bkhe", weights[..., :-1], vh)
        ot = ot + jnp.moveaxis(weights[..., -1], 1, 2)[..., None] * vt
        return self.finish(h, oh), self.finish(t, ot)


class Summarizer(nnx.Module):
    """Events -> per-layer states -> K summary tokens [B, K, D]."""

    def __init__(self, cfg: SummarizerConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.d_model
        self.embed = EventEmbedding(
            cfg.num_items, cfg.num_actions, cfg.num_gap_buckets, cfg.num_categories, d, rngs
        )
        self.layers = nnx.List([SummarizerLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("seeds", "embed"))
        self.seeds = nnx.Param(init(rngs.params(), (cfg.num_seeds, d)))
        self.final_norm = rms_norm(d, rngs)

    # -- states ------------------------------------------------------------------------------
    def initial_states(self, batch: int) -> list[qla.QLAState]:
        e = self.cfg.d_model // self.cfg.num_heads
        return [qla.QLAState.zeros(batch, self.cfg.num_heads, e) for _ in self.layers]

    def _stack(self, item, action, gap, valid, states, form, category=None):
        h = self.embed(item, action, gap, category)
        new_states = []
        for layer, state in zip(self.layers[:-1], states[:-1], strict=True):
            h, state = layer.history(h, valid, state, form)
            new_states.append(state)
        new_states.append(self.layers[-1].fold_state(h, valid, states[-1]))
        return new_states

    def history_states(
        self,
        item,
        action,
        gap,
        valid,
        states=None,
        form: str = "chunked",
        remat: bool = False,
        category=None,
    ) -> list[qla.QLAState]:
        """Per-layer states after the events `[B, L]` (continuing `states` if given).

        `chunked` scans chunks of `chunk_size` events through *all* layers, carrying every
        layer's state, so memory does not grow with L; `remat` recomputes each chunk in the
        backward pass instead of storing its activations.
        """
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if self.cfg.attention != "qla":
            raise ValueError("history states exist only for attention='qla'")
        states = self.initial_states(item.shape[0]) if states is None else list(states)
        if form != "chunked":
            return self._stack(item, action, gap, valid, states, form, category)
        return self._chunked_states(item, action, gap, valid, states, remat, category)

    def _chunked_states(self, item, action, gap, valid, states, remat, category=None):
        """Scans whole chunks, slicing the inputs in place (no padded or transposed copy of
        the history, so memory stays flat in L), then folds the remaining events in."""
        length = item.shape[1]
        if length == 0:
            return states
        t = min(self.cfg.chunk_size, length)
        n_full = length // t
        ids = (item, action, gap, valid, category)
        graphdef, params = nnx.split(self)

        def step(carry, xs):
            model = nnx.merge(graphdef, params)
            item, action, gap, valid, category = xs
            return model._stack(item, action, gap, valid, carry, "chunk_step", category)

        if remat:
            step = jax.checkpoint(step)

        def body(carry, i):
            xs = [None if x is None else jax.lax.dynamic_slice_in_dim(x, i * t, t, 1) for x in ids]
            return step(carry, xs), None

        carry, _ = jax.lax.scan(body, states, jnp.arange(n_full))
        if length > n_full * t:
            carry = step(carry, [None if x is None else x[:, n_full * t :] for x in ids])
        return carry

    # -- readout -----------------------------------------------------------------------------
    def readout(self, states: list[qla.QLAState]) -> jax.Array:
        """Seeds read each layer's history state: the summary [B, K, D]."""
        batch = states[0].count.shape[0]
        t = jnp.broadcast_to(self.seeds[...], (batch,) + self.seeds.shape)
        for layer, state in zip(self.layers, states, strict=True):
            t = layer.seeds(t, state)
        return self.final_norm(t)

    def __call__(
        self, item, action, gap, valid, form: str = "chunked", remat: bool = False, category=None
    ):
        """Summary tokens [B, K, D] and aux {"states"} (None for the softmax variant)."""
        if self.cfg.attention == "softmax":
            return self._softmax_summary(item, action, gap, valid, category), {"states": None}
        states = self.history_states(
            item, action, gap, valid, form=form, remat=remat, category=category
        )
        return self.readout(states), {"states": states}

    def _softmax_summary(self, item, action, gap, valid, category=None):
        h = self.embed(item, action, gap, category)
        t = jnp.broadcast_to(self.seeds[...], (h.shape[0],) + self.seeds.shape)
        for layer in self.layers:
            h, t = layer.softmax(h, t, valid)
        return self.final_norm(t)


class ReconstructionDecoder(nnx.Module):
    """Causal decoder over [s_1..s_K, u_1..u_M] regressing each next item embedding.

    Reads a bounded window (the last M events), so its cost does not grow with history.

    The head reads a normalized residual and starts at zero, so the first loss is the
    trivial 1 (unit-norm targets) and the task sets the early pace. Without the norm the
    residual carries the unit-RMS summaries, the first loss is about d + 1 and its gradient
    hundreds of times the task's; under global-norm clipping the early updates were then
    all reconstruction.
    """

    def __init__(self, cfg: SummarizerConfig, rngs: nnx.Rngs):
        d = cfg.d_model
        self.num_heads = cfg.num_heads
        init = nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "embed"))
        self.position = nnx.Param(init(rngs.params(), (cfg.num_seeds + cfg.recon_window, d)))
        self.norm = rms_norm(d, rngs)
        self.qkv = dense(d, 3 * d, ("embed", "heads"), rngs)
        self.out = dense(d, d, ("heads", "embed"), rngs)
        self.ffn_norm = rms_norm(d, rngs)
        self.ffn = SGLU(d, cfg.sglu_hidden, rngs)
        # All ones, yet nnx takes a key to build it; its own Rngs leaves the shared stream
        # (and so the initialization of every module built after the decoder) as it was.
        self.final_norm = rms_norm(d, nnx.Rngs(0))
        self.head = dense(d, d, ("embed", None), rngs, kernel_init=nnx.initializers.zeros_init())

    def __call__(self, summary_BxKxD, window_BxMxD, window_valid_BxM):
        k, m = summary_BxKxD.shape[1], window_BxMxD.shape[1]
        x = jnp.concatenate([summary_BxKxD, window_BxMxD], axis=1) + self.position[...]
        valid = jnp.concatenate([jnp.ones(summary_BxKxD.shape[:2], bool), window_valid_BxM], 1)
        q, kk, v = jnp.split(self.qkv(self.norm(x)), 3, axis=-1)
        heads = lambda z: z.reshape(z.shape[:-1] + (self.num_heads, -1))  # noqa: E731
        causal = jnp.tril(jnp.ones((k + m, k + m), bool))[None, None]
        o = masked_softmax_attention(heads(q), heads(kk), heads(v), causal & valid[:, None, None])
        x = x + self.out(o.reshape(x.shape))
        x = x + self.ffn(self.ffn_norm(x))
        # Position K-1+i (the last summary, then u_1..u_{M-1}) predicts u_{i+1}.
        return self.head(self.final_norm(x[:, k - 1 : k - 1 + m]))


def reconstruction_window(summarizer: Summarizer, item, valid, window: int):
    """(inputs [B,M,D], targets [B,M,D], valid [B,M]) of the last M events, left-padded.

    Padded slots have zero inputs: the slot before the first real event predicts it, and
    its residual stream must not carry that event (it would copy its own target).
    """
    length = jnp.sum(valid, axis=1)
    idx_BxM = length[:, None] - window + jnp.arange(window)[None]
    window_valid = idx_BxM >= 0
    window_item = jnp.take_along_axis(item, jnp.maximum(idx_BxM, 0), axis=1)
    embedded = summarizer.embed.item(window_item)
    # Unit-norm, stop-gradient targets: shrinking the embeddings cannot lower the loss.
    targets = jax.lax.stop_gradient(
        embedded / jnp.maximum(jnp.linalg.norm(embedded, axis=-1, keepdims=True), 1e-6)
    )
    inputs = jnp.where(window_valid[..., None], embedded, 0.0)
    return inputs, targets, window_valid


def reconstruction_loss(
    summarizer: Summarizer, decoder: ReconstructionDecoder, summary, item, valid
) -> jax.Array:
    """Mean squared error to stop-gradient next-item embeddings over the last M events."""
    window = decoder.position.shape[0] - summary.shape[1]
    inputs, targets, window_valid = reconstruction_window(summarizer, item, valid, window)
    preds = decoder(summary, inputs, window_valid)
    sq_err = jnp.sum(jnp.square(preds - targets), axis=-1)
    w = window_valid.astype(jnp.float32)
    return jnp.sum(sq_err * w) / jnp.maximum(jnp.sum(w), 1.0)

"""Full target attention over the raw history: the baseline whose cost VISTA removes.

Each candidate attends over every history event (multi-head softmax); candidates never attend
to each other. The chunked form scans the history in chunks with an online softmax, carrying
per candidate and head a running max `m`, denominator `l` and numerator `acc`:

  m' = max(m, max_j s_j),  l' = l e^{m - m'} + sum_j e^{s_j - m'},
  acc' = acc e^{m - m'} + sum_j e^{s_j - m'} v_j,           output = acc / l

so memory is O(C * chunk) however long the history (1M events fit), and the result equals
the plain softmax. `FullTargetAttentionRanker` embeds events inside the scan too, so not even
the [L, D] history embeddings are ever materialized.

Two-stage baselines (`sim.py`, `twin.py`) subclass it: a search stage keeps k history events
per candidate (`chunked_top_k`, the same scan), then `attend_gathered` attends to those k.
Each form has a dense reference here (`target_attention_reference` with a per-candidate mask,
`FullTargetAttentionRanker.attend_reference`) that the tests compare against.

What a candidate may read is its *history span*, positions [begin, end) of the history
arrays: [0, hist_len) for every candidate of a request, or its own span when the batch gives
`cand_hist_begin` / `cand_hist_end` [B, C] (the per-position form of
`vista_jax.sequential_ranking`: the candidate of event p + 1 reads events <= p). A ranker
built with `recent=N` keeps the last N positions of each span: recent-N target attention.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vista_jax.config import RankerConfig
from vista_jax.models.layers import EventEmbedding, dense, rms_norm

_NEG = -1e30


class SoftmaxCarry(NamedTuple):
    """Online-softmax state per (batch, head, candidate)."""

    max: jax.Array  # [B, H, C]
    denom: jax.Array  # [B, H, C]
    numer: jax.Array  # [B, H, C, E]


def empty_carry(q_BxCxHxE: jax.Array) -> SoftmaxCarry:
    """No keys seen yet: max -inf (finite), zero denominator and numerator."""
    b, c, h, e = q_BxCxHxE.shape
    return SoftmaxCarry(
        jnp.full((b, h, c), _NEG, jnp.float32),
        jnp.zeros((b, h, c), jnp.float32),
        jnp.zeros((b, h, c, e), jnp.float32),
    )


def fold_chunk(carry: SoftmaxCarry, q, k, v, valid) -> SoftmaxCarry:
    """Folds keys/values k, v [B,T,H,E] into the carry of queries q [B,C,H,E].

    `valid` is [B, T] (every query reads the same keys) or [B, C, T] (per query).
    """
    scale = 1.0 / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
    mask_Bx1xCxT = valid[:, None, None, :] if valid.ndim == 2 else valid[:, None]
    logits_BxHxCxT = jnp.einsum("bche,bthe->bhct", q, k) * scale
    logits_BxHxCxT = jnp.where(mask_Bx1xCxT, logits_BxHxCxT, _NEG)
    new_max = jnp.maximum(carry.max, logits_BxHxCxT.max(axis=-1))
    # Masked logits sit at -1e30; with every key masked so far new_max is -1e30 too, so zero
    # their weights explicitly rather than trusting exp(0) = 1.
    weights = jnp.exp(logits_BxHxCxT - new_max[..., None]) * mask_Bx1xCxT
    rescale = jnp.exp(carry.max - new_max)
    denom = carry.denom * rescale + weights.sum(axis=-1)
    numer = carry.numer * rescale[..., None] + jnp.einsum("bhct,bthe->bhce", weights, v)
    return SoftmaxCarry(new_max, denom, numer)


def finish(carry: SoftmaxCarry) -> jax.Array:
    """Attended values [B, C, H, E]; a candidate with no valid key gets zeros."""
    out = carry.numer / jnp.maximum(carry.denom, 1e-30)[..., None]
    return jnp.moveaxis(out, 1, 2)


def _chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """[B, L, ...] -> [L/T, B, T, ...], zero-padded at the end (padding is marked invalid)."""
    b, length = x.shape[:2]
    n = -(-length // chunk_size)
    x = jnp.pad(x, [(0, 0), (0, n * chunk_size - length)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, n, chunk_size) + x.shape[2:]), 1, 0)


def target_attention_chunked(q, k, v, valid, chunk_size: int = 1024) -> jax.Array:
    """Candidates q [B,C,H,E] over history k, v [B,L,H,E]: online softmax in chunks."""
    chunk_size = max(1, min(chunk_size, k.shape[1]))

    def body(carry, xs):
        return fold_chunk(carry, q, *xs), None

    xs = (_chunks(k, chunk_size), _chunks(v, chunk_size), _chunks(valid, chunk_size))
    carry, _ = jax.lax.scan(body, empty_carry(q), xs)
    return finish(carry)


def target_attention_reference(q, k, v, valid) -> jax.Array:
    """Plain masked softmax over all keys at once (O(C * L) memory): the reference.

    `valid` is [B, L] (every candidate reads the same keys) or [B, C, L] (per candidate).
    """
    mask_BxHxCxL = valid[:, None, None, :] if valid.ndim == 2 else valid[:, None, :, :]
    logits = jnp.einsum("bche,blhe->bhcl", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    logits = jnp.where(mask_BxHxCxL, logits, _NEG)
    any_key = jnp.any(mask_BxHxCxL, axis=-1, keepdims=True)
    weights = jax.nn.softmax(logits, axis=-1) * any_key
    return jnp.einsum("bhcl,blhe->bche", weights, v)


def chunked_top_k(score_fn, xs: tuple, k: int, chunk_size: int, num_cand: int):
    """Top-k history positions per candidate by `score_fn`, scanning the history in chunks.

    `xs` are [B, L, ...] history arrays (the last one the validity mask [B, L]);
    `score_fn(pos_T, *chunk_of_each_x) -> [B, C, T]` scores one chunk, -inf for an excluded
    event. Memory is O(C * (k + chunk)) at any L. Returns (scores [B, C, k], positions
    [B, C, k] int32); a slot with score -inf holds no event (fewer than k qualified). Ties go
    to the earlier position, as with one `lax.top_k` over the whole history.
    """
    b, length = xs[0].shape[:2]
    t = max(1, min(chunk_size, length))
    chunks = tuple(None if x is None else _chunks(x, t) for x in xs)
    starts = jnp.arange(-(-length // t), dtype=jnp.int32) * t
    init = (
        jnp.full((b, num_cand, k), -jnp.inf, jnp.float32),
        jnp.full((b, num_cand, k), -1, jnp.int32),
    )

    def body(carry, inp):
        start, *chunk = inp
        pos_T = start + jnp.arange(t, dtype=jnp.int32)
        scores = jnp.concatenate([carry[0], score_fn(pos_T, *chunk)], -1)
        positions = jnp.concatenate(
            [carry[1], jnp.broadcast_to(pos_T, scores.shape[:2] + (t,))], -1
        )
        top, which = jax.lax.top_k(scores, k)
        return (top, jnp.take_along_axis(positions, which, -1)), None

    (top, positions), _ = jax.lax.scan(body, init, (starts, *chunks))
    return top, positions


class FullTargetAttentionRanker(nnx.Module):
    """Candidates attend over the raw history (one layer), then an MLP scores each one.

    Reads the same batch keys as `Ranker` (`hist_item/hist_action/hist_gap/hist_len`,
    `cand_item`; `hist_category`/`cand_category` when present; the optional per-candidate
    spans `cand_hist_begin/cand_hist_end`). A learned null key/value starts every softmax, so
    an empty history still gives a well-defined score. `recent` > 0 reads only the last
    `recent` events of each span. Returns (logits [B, C], {"attended": [B, C, D]}).
    """

    def __init__(
        self,
        cfg: RankerConfig,
        rngs: nnx.Rngs,
        chunk_size: int = 4096,
        top_k: int = 0,
        recent: int = 0,
    ):
        d = cfg.d_model
        self.num_heads, self.chunk_size, self.top_k = cfg.num_heads, chunk_size, top_k
        self.recent = recent
        self.events = EventEmbedding(
            cfg.num_items, cfg.num_actions, cfg.num_gap_buckets, cfg.num_categories, d, rngs
        )
        init = nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "embed"))
        self.null = nnx.Param(init(rngs.params(), (2, d)))  # null key row, null value row
        self.q_norm, self.kv_norm = rms_norm(d, rngs), rms_norm(d, rngs)
        self.query = dense(d, d, ("embed", "heads"), rngs)
        self.key = dense(d, d, ("embed", "heads"), rngs)
        self.value = dense(d, d, ("embed", "heads"), rngs)
        self.out = dense(d, d, ("heads", "embed"), rngs)
        self.head_norm = rms_norm(2 * d, rngs)
        self.head_in = dense(2 * d, cfg.mlp_hidden, ("embed", "mlp"), rngs)
        self.head_out = dense(cfg.mlp_hidden, 1, ("mlp", None), rngs)

    def _heads(self, x):
        return x.reshape(x.shape[:-1] + (self.num_heads, -1))

    def _keys_values(self, item, action, gap, category):
        x = self.kv_norm(self.events(item, action, gap, category))
        return self._heads(self.key(x)), self._heads(self.value(x))

    def _null_kv(self, b: int, e_shape) -> tuple[jax.Array, jax.Array]:
        """The learned null key and value, [B, 1, H, E] each."""
        return tuple(jnp.broadcast_to(self._heads(n), (b, 1) + e_shape) for n in self.null[...])

    def _history_ids(self, batch) -> tuple:
        """(item, action, gap, category or None) [B, L] of the raw history."""
        return (batch["hist_item"], batch["hist_action"], batch["hist_gap"],
                batch.get("hist_category"))  # fmt: skip

    def history_span(self, batch, num_cand: int) -> tuple[jax.Array, jax.Array]:
        """(begin, end) [B, C] int32: candidate c reads history positions [begin, end)."""
        if "cand_hist_end" in batch:
            begin, end = batch["cand_hist_begin"], batch["cand_hist_end"]
        else:
            end = jnp.broadcast_to(batch["hist_len"][:, None], (len(batch["hist_len"]), num_cand))
            begin = jnp.zeros_like(end)
        if self.recent:
            begin = jnp.maximum(begin, end - self.recent)
        return begin.astype(jnp.int32), end.astype(jnp.int32)

    @staticmethod
    def visible(span, pos_T) -> jax.Array:
        """[B, C, T]: which of the history positions `pos_T` each candidate reads."""
        begin, end = (x[:, :, None] for x in span)
        return (pos_T[None, None] >= begin) & (pos_T[None, None] < end)

    def attend_gathered(self, q_BxCxHxE, batch, positions_BxCxK, selected_BxCxK) -> jax.Array:
        """Each candidate attends to [null; its own k history events] (the second stage).

        `positions` index the history; `selected` marks the slots that hold an event.
        """
        b = q_BxCxHxE.shape[0]

        def gather(x_BxL):
            x_BxCxL = jnp.broadcast_to(
                x_BxL[:, None], (b, positions_BxCxK.shape[1]) + x_BxL.shape[1:]
            )
            return jnp.take_along_axis(x_BxCxL, jnp.maximum(positions_BxCxK, 0), axis=2)

        ids = [None if x is None else gather(x) for x in self._history_ids(batch)]
        k, v = self._keys_values(*ids)  # [B, C, K, H, E]
        null_k, null_v = (x[:, :, None] for x in self._null_kv(b, q_BxCxHxE.shape[2:]))
        c = q_BxCxHxE.shape[1]
        k = jnp.concatenate([jnp.broadcast_to(null_k, (b, c) + null_k.shape[2:]), k], 2)
        v = jnp.concatenate([jnp.broadcast_to(null_v, (b, c) + null_v.shape[2:]), v], 2)
        valid = jnp.concatenate([jnp.ones((b, c, 1), bool), selected_BxCxK], 2)
        scale = 1.0 / jnp.sqrt(q_BxCxHxE.shape[-1]).astype(jnp.float32)
        logits = jnp.einsum("bche,bckhe->bhck", q_BxCxHxE, k) * scale
        logits = jnp.where(valid[:, None], logits, _NEG)
        weights = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bhck,bckhe->bche", weights, v)

    def attend_reference(self, q_BxCxHxE, batch, keep_BxCxL=None) -> jax.Array:
        """Dense softmax over [null; the history events `keep` marks] (all valid ones if None)."""
        k, v = self._keys_values(*self._history_ids(batch))
        b, c = q_BxCxHxE.shape[:2]
        null_k, null_v = self._null_kv(b, q_BxCxHxE.shape[2:])
        keep = self.visible(self.history_span(batch, c), jnp.arange(k.shape[1]))
        keep = keep if keep_BxCxL is None else keep & keep_BxCxL
        keep = jnp.concatenate([jnp.ones((b, c, 1), bool), keep], 2)
        k, v = jnp.concatenate([null_k, k], 1), jnp.concatenate([null_v, v], 1)
        return target_attention_reference(q_BxCxHxE, k, v, keep)

    def attend(self, q_BxCxHxE, batch) -> jax.Array:
        """Online softmax over [null; history], embedding each chunk inside the scan."""
        item = batch["hist_item"]
        b, length = item.shape
        t = max(1, min(self.chunk_size, length))
        span = self.history_span(batch, q_BxCxHxE.shape[1])
        null_valid = jnp.ones((b, 1), bool)
        null_k, null_v = self._null_kv(b, q_BxCxHxE.shape[2:])
        carry = fold_chunk(empty_carry(q_BxCxHxE), q_BxCxHxE, null_k, null_v, null_valid)

        def body(carry, xs):
            start, *ids = xs
            k, v = self._keys_values(*ids)
            valid = self.visible(span, start + jnp.arange(t, dtype=jnp.int32))
            return fold_chunk(carry, q_BxCxHxE, k, v, valid), None

        ids = self._history_ids(batch)
        starts = jnp.arange(-(-length // t), dtype=jnp.int32) * t
        xs = (starts,) + tuple(None if x is None else _chunks(x, t) for x in ids)
        carry, _ = jax.lax.scan(body, carry, xs)
        return finish(carry)

    def __call__(self, batch, cand_item=None):
        cand_item = batch["cand_item"] if cand_item is None else cand_item
        cand = self.events.items(cand_item, batch.get("cand_category"))
        q = self._heads(self.query(self.q_norm(cand)))
        o = self.attend(q, batch)
        x = cand + self.out(o.reshape(cand.shape))
        features = self.head_norm(jnp.concatenate([cand, x], axis=-1))
        logits = self.head_out(jax.nn.gelu(self.head_in(features)))[..., 0]
        return logits, {"attended": x}

"""Functional pieces shared by the SASRec and HSTU encoders (`sequential.py`).

Parameter-free LayerNorm, L2 normalization, explicit-key dropout and parameter helpers with
logical axis names (`vocab`, `embed`, `heads`, `mlp`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without learned scale or bias (the reference calls `F.layer_norm` bare)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / max(||x||, eps), with a finite gradient at x = 0 (padding rows)."""
    squared = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


def keep_mask(key: jax.Array, shape, keep_prob: float) -> jax.Array:
    """Bernoulli(keep_prob) mask from 16 random bits per element (two per 32-bit draw).

    Random bits dominate dropout's cost on CPU; 16 bits set the probability to within 1e-5.
    """
    size = math.prod(shape)
    words = jax.random.bits(key, ((size + 1) // 2,), jnp.uint32)
    halves = jnp.concatenate([words >> 16, words & 0xFFFF])[:size].reshape(shape)
    return halves < round(keep_prob * 65536)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; `key=None` means deterministic (evaluation)."""
    if key is None or rate == 0.0:
        return x
    return jnp.where(keep_mask(key, x.shape, 1.0 - rate), x / (1.0 - rate), 0.0)


class KeySplitter:
    """Hands out a fresh dropout key per call; None throughout when deterministic."""

    def __init__(self, key: jax.Array | None):
        self._key = key
        self._count = 0

    def __call__(self) -> jax.Array | None:
        if self._key is None:
            return None
        self._count += 1
        return jax.random.fold_in(self._key, self._count)


def causal_query_blocks(length: int, num_blocks: int) -> list[tuple[int, int]]:
    """[start, end) query blocks; block b only needs keys [0, end) under a causal mask, so
    n blocks compute (n + 1) / 2n of the L x L scores instead of all of them."""
    size = -(-length // max(1, num_blocks))
    return [(start, min(length, start + size)) for start in range(0, length, size)]


def snapshot_blocks(x: jax.Array, every: int, num_snapshots: int, axis: int = 1) -> jax.Array:
    """Positions (along `axis`) grouped by the snapshot they read: position t reads snapshot
    (t + 1) // S, so it sits at slot t + 1 of J zero-padded blocks of S; `axis` becomes two
    axes [J, S]. A reader of snapshot summaries then meets each snapshot's K tokens with the
    S positions that read them in one batched product (L x K scores, not L x J x K)."""
    length = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, num_snapshots * every - length - 1)
    x = jnp.pad(x, pad)
    return x.reshape(x.shape[:axis] + (num_snapshots, every) + x.shape[axis + 1 :])


def from_snapshot_blocks(x: jax.Array, length: int, axis: int = 1) -> jax.Array:
    """`snapshot_blocks` undone: the [J, S] axes at `axis` back to L positions."""
    x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])
    return jax.lax.slice_in_dim(x, 1, length + 1, axis=axis)


def segment_positions(segment_BxL: jax.Array) -> jax.Array:
    """Each slot's index within its segment (packed rows, `sequences.pack_rows`): [B, L]."""
    t_L = jnp.arange(segment_BxL.shape[1])
    starts_BxL = jnp.concatenate(
        [jnp.ones_like(segment_BxL[:, :1], bool), segment_BxL[:, 1:] != segment_BxL[:, :-1]], 1
    )
    return t_L - jax.lax.cummax(jnp.where(starts_BxL, t_L, 0), axis=1)


def same_segment(segment_BxL, start: int, end: int, lo: int = 0):
    """Queries start..end-1 against keys lo..end-1 of the same segment: bool [B, 1, T, M]
    (all True without segments)."""
    if segment_BxL is None:
        return True
    return (segment_BxL[:, start:end, None] == segment_BxL[:, None, lo:end])[:, None]


def xavier_normal():
    return nnx.initializers.variance_scaling(1.0, "fan_avg", "normal")


def param(init, shape, axes, rngs: nnx.Rngs) -> nnx.Param:
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape))


def linear(d_in, d_out, axes, rngs, kernel_init=None, use_bias=True) -> nnx.Linear:
    """`nnx.Linear` with logical axes; xavier-normal kernel and zero bias by default."""
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=use_bias,
        kernel_init=nnx.with_partitioning(kernel_init or xavier_normal(), axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )

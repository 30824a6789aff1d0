"""Causal quasi-linear attention (QLA) over a count-normalized state.

For one head, with phi = SiLU already applied to queries and keys:

  S_i  = sum_{j <= i, valid} k_j v_j^T          (E x E)
  n_i  = #{j <= i, valid}
  o_i  = q_i S_i / max(n_i, 1)

Every history row reads the running *mean* of k v^T over its prefix (the paper's 1/N
scaling, kept exact under streaming by storing the sum and the count). Three forms compute
the same thing:

  * `qla_parallel`  -- the O(L^2) reference: masked q k^T, then times v.
  * `qla_chunked`   -- a scan over chunks of T events carrying (S, n); memory O(T^2 + E^2).
  * `qla_recurrent` -- a scan over single events; the streaming definition.

All take an optional initial `QLAState`, so a history can be continued from a stored state,
and all return the final state. Shapes: q, k, v are [B, L, H, E]; `valid` is [B, L] bool.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class QLAState(NamedTuple):
    """Per-layer running state: sum of k v^T over valid events, and their count."""

    kv_sum: jax.Array  # [B, H, E, E] f32
    count: jax.Array  # [B] f32

    @classmethod
    def zeros(cls, batch: int, heads: int, head_dim: int) -> QLAState:
        return cls(
            jnp.zeros((batch, heads, head_dim, head_dim), jnp.float32),
            jnp.zeros((batch,), jnp.float32),
        )

    def mean(self) -> jax.Array:
        """Running mean of k v^T: [B, H, E, E]; zero for an empty history."""
        return self.kv_sum / jnp.maximum(self.count, 1.0)[:, None, None, None]


def _init(state: QLAState | None, q: jax.Array) -> QLAState:
    b, _, h, e = q.shape
    return QLAState.zeros(b, h, e) if state is None else state


def _normalize(out_BxLxHxE: jax.Array, count_BxL: jax.Array) -> jax.Array:
    return out_BxLxHxE / jnp.maximum(count_BxL, 1.0)[:, :, None, None]


def qla_parallel(q, k, v, valid, state: QLAState | None = None):
    """Reference form: explicit causal mask over all pairs. O(L^2) memory."""
    state = _init(state, q)
    validf_BxL = valid.astype(jnp.float32)
    length = q.shape[1]
    causal_LxL = jnp.tril(jnp.ones((length, length), jnp.float32))
    scores_BxHxLxL = jnp.einsum("blhe,bmhe->bhlm", q, k) * causal_LxL
    scores_BxHxLxL = scores_BxHxLxL * validf_BxL[:, None, None, :]
    intra = jnp.einsum("bhlm,bmhe->blhe", scores_BxHxLxL, v)
    inter = jnp.einsum("blhe,bhef->blhf", q, state.kv_sum)
    count_BxL = state.count[:, None] + jnp.cumsum(validf_BxL, axis=1)
    out = _normalize(intra + inter, count_BxL)
    kv_sum = state.kv_sum + jnp.einsum("blhe,blhf->bhef", k * validf_BxL[..., None, None], v)
    return out, QLAState(kv_sum, count_BxL[:, -1] if length else state.count)


INTRA_BLOCK = 64  # Events per causal block inside a chunk step (measured fastest on CPU).


def qla_chunk_step(state: QLAState, q, k, v, valid, block: int = INTRA_BLOCK):
    """One chunk of T events continued from `state`: the body of the chunked form.

    Chunkwise-parallel: the chunk is cut into blocks of `block` events; each block reads the
    state before it (the carried state plus an exclusive prefix sum of the blocks' k v^T) and
    its own causal block. Equal to `qla_parallel`, but O(T * block) instead of O(T^2), and
    with large matmuls, so one scan step can hold thousands of events.
    """
    b, t, h, e = q.shape
    c = max(1, min(block, t))
    n = -(-t // c)
    if n == 1:
        return qla_parallel(q, k, v, valid, state)
    w_BxL = valid.astype(jnp.float32)

    def blocks(x):  # [B, T, ...] -> [B, N, C, ...], zero-padded
        x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((b, n, c) + x.shape[2:])

    q_b, k_b, v_b = blocks(q), blocks(k * w_BxL[..., None, None]), blocks(v)
    kv_BxNxHxExE = jnp.einsum("bnche,bnchf->bnhef", k_b, v_b)
    kv_before = state.kv_sum[:, None] + jnp.cumsum(kv_BxNxHxExE, axis=1) - kv_BxNxHxExE
    causal_CxC = jnp.tril(jnp.ones((c, c), jnp.float32))
    scores = jnp.einsum("bnlhe,bnmhe->bnhlm", q_b, k_b) * causal_CxC
    out = jnp.einsum("bnhlm,bnmhe->bnlhe", scores, v_b)
    out = out + jnp.einsum("bnlhe,bnhef->bnlhf", q_b, kv_before)
    count_BxL = state.count[:, None] + jnp.cumsum(w_BxL, axis=1)
    out = _normalize(out.reshape(b, n * c, h, e)[:, :t], count_BxL)
    return out, QLAState(state.kv_sum + kv_BxNxHxExE.sum(axis=1), count_BxL[:, -1])


def qla_chunked(q, k, v, valid, state: QLAState | None = None, chunk_size: int = 256):
    """Scan over chunks of `chunk_size` events; equal to `qla_parallel` up to float error."""
    state = _init(state, q)
    b, length, h, e = q.shape
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length

    def to_chunks(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((b, num_chunks, chunk_size) + x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    def body(carry, xs):
        out, carry = qla_chunk_step(carry, *xs)
        return carry, out

    state, out = jax.lax.scan(body, state, tuple(map(to_chunks, (q, k, v, valid))))
    out = jnp.moveaxis(out, 0, 1).reshape(b, num_chunks * chunk_size, h, e)
    return out[:, :length], state


def qla_recurrent(q, k, v, valid, state: QLAState | None = None):
    """Scan over single events: fold each valid k v^T into the state, then read it."""
    state = _init(state, q)

    def step(carry: QLAState, xs):
        q_t, k_t, v_t, valid_t = xs  # [B, H, E] x3, [B]
        w = valid_t.astype(jnp.float32)
        kv_sum = carry.kv_sum + jnp.einsum("bhe,bhf->bhef", k_t * w[:, None, None], v_t)
        carry = QLAState(kv_sum, carry.count + w)
        out = jnp.einsum("bhe,bhef->bhf", q_t, carry.mean())
        return carry, out

    xs = (jnp.moveaxis(q, 1, 0), jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0), valid.T)
    state, out = jax.lax.scan(step, state, xs)
    return jnp.moveaxis(out, 0, 1), state


def seed_readout(q_seed, k_seed, v_seed, state: QLAState) -> jax.Array:
    """Seeds in the target slot: read phi(mean state) of the whole history, plus themselves.

    O_T = phi(Q_T) phi(S / n) + diag(phi(Q_T) phi(K_T)^T) V_T / E   (seeds never read each
    other). q_seed, k_seed: [B, K, H, E] with phi applied; v_seed: [B, K, H, E].
    """
    head_dim = q_seed.shape[-1]
    history = jnp.einsum("bkhe,bhef->bkhf", q_seed, jax.nn.silu(state.mean()))
    self_weight = jnp.sum(q_seed * k_seed, axis=-1, keepdims=True) / head_dim
    return history + self_weight * v_seed

"""HSTU block as in generative-recommenders `research/modeling/sequential/hstu.py`.

Per block (`SequentialTransductionUnitJagged`, linear_config "uvqk", normalization "rel_bias"):

  u, v, q, k = split(SiLU(LN(x) @ W_uvqk))       # one fused projection, no bias
  A          = SiLU(q k^T + rab_p(i - j) + rab_t(bucket(t_query_i - t_j))) / n, causal
  x'         = x + W_o Dropout(u * LN(A v)) + b_o

No softmax and no 1/sqrt(d) scale: attention is point-wise SiLU divided by the sequence
length n, a constant: the reference's padded length (211), here `max_len` (so padding never
changes an output; the LayerNorm that follows removes the constant up to its eps). The
relative attention bias has one weight per relative position and one per log-bucket of the
time gap, shared by the heads, learned per block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from vista_jax.models.seq_layers import (
    causal_query_blocks,
    dropout,
    layer_norm,
    linear,
    param,
    same_segment,
)

if TYPE_CHECKING:
    from vista_jax.models.sequential import SequentialConfig

_LN_EPS = 1e-6
_LOG_BUCKET_DIVISOR = 0.301  # The reference's bucketization: int(ln(max(|dt|, 1)) / 0.301).


def time_buckets(query_time_BxL, time_BxL, num_buckets: int) -> jax.Array:
    """bucket[b, i, j] = clip(floor(ln(max(|q_i - t_j|, 1)) / 0.301), 0, num_buckets), int32.

    Times are integer seconds; computed in float32 like the reference (`torch.log` of int64).
    """
    dt_BxLxL = query_time_BxL[:, :, None] - time_BxL[:, None, :]
    dt_BxLxL = jnp.maximum(jnp.abs(dt_BxLxL), 1).astype(jnp.float32)
    bucket_BxLxL = jnp.floor(jnp.log(dt_BxLxL) / _LOG_BUCKET_DIVISOR).astype(jnp.int32)
    return jnp.clip(bucket_BxLxL, 0, num_buckets)


class HSTUBlock(nnx.Module):
    def __init__(self, cfg: SequentialConfig, rngs: nnx.Rngs):
        d, h = cfg.d_model, cfg.num_heads
        self.num_heads, self.rate, self.max_len = h, cfg.dropout, cfg.max_len
        self.attention_chunks = cfg.attention_chunks
        self.split_sizes = (h * cfg.linear_dim, h * cfg.linear_dim, h * cfg.attn_dim)
        width = 2 * h * (cfg.linear_dim + cfg.attn_dim)
        self.uvqk = param(nnx.initializers.normal(0.02), (d, width), ("embed", "heads"), rngs)
        xavier_uniform = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
        self.out = linear(h * cfg.linear_dim, d, ("heads", "embed"), rngs, xavier_uniform)
        normal = nnx.initializers.normal(0.02)
        self.time_bias = param(normal, (cfg.num_time_buckets + 1,), (None,), rngs)
        # Only causal offsets i - j in [0, max_len) are ever used.
        self.position_bias = param(normal, (cfg.max_len,), (None,), rngs)

    def relative_bias(self, buckets_BxTxM, start: int, key_start: int = 0) -> jax.Array:
        """Bias of queries start..start+T-1 against keys key_start..key_start+M-1: [B, T, M]."""
        rows, cols = buckets_BxTxM.shape[1:]
        offset_TxM = (start - key_start) + jnp.arange(rows)[:, None] - jnp.arange(cols)[None, :]
        position_TxM = self.position_bias[...][jnp.clip(offset_TxM, 0, self.max_len - 1)]
        return self.time_bias[...][buckets_BxTxM] + position_TxM

    def attention(
        self, q_BxHxLxE, k_BxHxLxE, v_BxHxLxE, buckets_BxLxL, window=None, segment_BxL=None
    ) -> jax.Array:
        """Causal SiLU attention, query block by query block: a block of queries ending at
        `end` reads keys [0, end) only, which skips most of the masked upper triangle. With a
        `window` R, query t reads only keys (t - R, t], and a block only the keys it may use;
        with `segment_BxL` (packed rows), only keys of its own segment."""
        outputs = []
        for start, end in causal_query_blocks(q_BxHxLxE.shape[2], self.attention_chunks):
            lo = 0 if window is None else max(0, start - window + 1)
            scores = jnp.einsum(
                "bhte,bhme->bhtm", q_BxHxLxE[:, :, start:end], k_BxHxLxE[:, :, lo:end]
            )
            bias = self.relative_bias(buckets_BxLxL[:, start:end, lo:end], start, lo)
            scores = scores + bias[:, None]
            offset_TxM = jnp.arange(start, end)[:, None] - jnp.arange(lo, end)[None, :]
            allowed_TxM = (offset_TxM >= 0) & (offset_TxM < (window or end))
            allowed = allowed_TxM & same_segment(segment_BxL, start, end, lo)
            weights = jnp.where(allowed, jax.nn.silu(scores) / self.max_len, 0.0)
            outputs.append(jnp.einsum("bhtm,bhme->bhte", weights, v_BxHxLxE[:, :, lo:end]))
        return jnp.concatenate(outputs, axis=2)

    def split_projection(self, x_BxNxD):
        """u, v, q, k of SiLU(LN(x) W_uvqk), each [B, N, H*width]."""
        proj = jax.nn.silu(layer_norm(x_BxNxD, _LN_EPS) @ self.uvqk[...])
        i1, i2, i3 = (sum(self.split_sizes[:n]) for n in (1, 2, 3))
        return proj[..., :i1], proj[..., i1:i2], proj[..., i2:i3], proj[..., i3:]

    def heads(self, t_BxNxF):  # [B, N, H*E] -> [B, H, N, E]
        batch, length = t_BxNxF.shape[:2]
        return t_BxNxF.reshape(batch, length, self.num_heads, -1).transpose(0, 2, 1, 3)

    def gate_and_project(self, u_BxLxV, attended_BxHxLxE, x_BxLxD, keys) -> jax.Array:
        """x + W_o Dropout(u * LN(attention output)) + b_o."""
        attended = attended_BxHxLxE.transpose(0, 2, 1, 3).reshape(u_BxLxV.shape[:2] + (-1,))
        gated_BxLxV = u_BxLxV * layer_norm(attended, _LN_EPS)
        return x_BxLxD + self.out(dropout(gated_BxLxV, self.rate, keys()))

    def __call__(self, x_BxLxD, valid_BxL, buckets_BxLxL, keys, segment_BxL=None):
        del valid_BxL  # Left-aligned padding is after every valid row: causality hides it.
        u, v, q, k = self.split_projection(x_BxLxD)
        # [B, H, L, E] layout: batch dims lead, which XLA:CPU multiplies much faster.
        q, k, v = self.heads(q), self.heads(k), self.heads(v)
        attended = self.attention(q, k, v, buckets_BxLxL, segment_BxL=segment_BxL)
        return self.gate_and_project(u, attended, x_BxLxD, keys)

"""SASRec block as in generative-recommenders `research/modeling/sequential/sasrec.py`.

Per block (the reference's ordering, which differs from a textbook pre-norm transformer):

  q_in = LN(x)                                   # queries read the normalized input
  a    = causal softmax MHA(query=q_in, key=x, value=x), attention-weight dropout
  y    = LN(q_in + a)                            # the residual is q_in, not x
  x'   = (y + Dropout(W2 Dropout(ReLU(W1 y)))) * valid

LayerNorms have no learned parameters (eps 1e-8); weights are xavier normal, biases zero.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from vista_jax.models.seq_layers import (
    causal_query_blocks,
    dropout,
    layer_norm,
    linear,
    same_segment,
)

if TYPE_CHECKING:
    from vista_jax.models.sequential import SequentialConfig

_LN_EPS = 1e-8


def causal_softmax_attention(
    q_BxLxHxE, k_BxLxHxE, v_BxLxHxE, rate: float, key, chunks: int = 1, segment_BxL=None
):
    """Softmax(q k^T / sqrt(E)) over keys <= query, with dropout on the weights when training;
    with `segment_BxL` (packed rows), over the keys of the query's own segment only.

    Training computes query blocks that read only the keys before their end (`chunks`).
    """
    if key is None or rate == 0.0:
        mask = None if segment_BxL is None else same_segment(segment_BxL, 0, q_BxLxHxE.shape[1])
        return jax.nn.dot_product_attention(
            q_BxLxHxE, k_BxLxHxE, v_BxLxHxE, mask=mask, is_causal=True
        )
    # [B, H, L, E] layout: batch dims lead, which XLA:CPU multiplies much faster.
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q_BxLxHxE, k_BxLxHxE, v_BxLxHxE))
    q = q / math.sqrt(q.shape[-1])
    outputs = []
    for block, (start, end) in enumerate(causal_query_blocks(q.shape[2], chunks)):
        logits_BxHxTxM = jnp.einsum("bhte,bhme->bhtm", q[:, :, start:end], k[:, :, :end])
        causal_TxM = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
        allowed = causal_TxM & same_segment(segment_BxL, start, end)
        logits_BxHxTxM = jnp.where(allowed, logits_BxHxTxM, -1e30)
        weights = jax.nn.softmax(logits_BxHxTxM, axis=-1)
        weights = dropout(weights, rate, jax.random.fold_in(key, block))
        outputs.append(jnp.einsum("bhtm,bhme->bhte", weights, v[:, :, :end]))
    return jnp.concatenate(outputs, axis=2).transpose(0, 2, 1, 3)


class SASRecBlock(nnx.Module):
    def __init__(self, cfg: SequentialConfig, rngs: nnx.Rngs):
        d = cfg.d_model
        self.num_heads = cfg.num_heads
        self.rate, self.attn_rate = cfg.dropout, cfg.attn_dropout
        self.chunks = cfg.attention_chunks
        # torch MHA's packed in_proj [3D, D] gets xavier normal: std sqrt(2 / 4D) for q, k, v.
        in_proj = nnx.initializers.normal(math.sqrt(2.0 / (4 * d)))
        self.query = linear(d, d, ("embed", "heads"), rngs, kernel_init=in_proj)
        self.key_value = linear(d, 2 * d, ("embed", "heads"), rngs, kernel_init=in_proj)
        self.out = linear(d, d, ("heads", "embed"), rngs)
        self.ffn_in = linear(d, cfg.ffn_hidden, ("embed", "mlp"), rngs)
        self.ffn_out = linear(cfg.ffn_hidden, d, ("mlp", "embed"), rngs)

    def _heads(self, x_BxLxD):
        return x_BxLxD.reshape(x_BxLxD.shape[:-1] + (self.num_heads, -1))

    def __call__(self, x_BxLxD, valid_BxL, context, keys, segment_BxL=None):
        del context  # SASRec has no time features.
        q_in_BxLxD = layer_norm(x_BxLxD, _LN_EPS)
        k_BxLxD, v_BxLxD = jnp.split(self.key_value(x_BxLxD), 2, axis=-1)
        q, k, v = (self._heads(t) for t in (self.query(q_in_BxLxD), k_BxLxD, v_BxLxD))
        attended = causal_softmax_attention(
            q, k, v, self.attn_rate, keys(), self.chunks, segment_BxL
        )
        y_BxLxD = layer_norm(q_in_BxLxD + self.out(attended.reshape(x_BxLxD.shape)), _LN_EPS)
        h_BxLxF = dropout(jax.nn.relu(self.ffn_in(y_BxLxD)), self.rate, keys())
        out_BxLxD = y_BxLxD + dropout(self.ffn_out(h_BxLxF), self.rate, keys())
        return out_BxLxD * valid_BxL[..., None].astype(out_BxLxD.dtype)

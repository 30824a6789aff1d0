"""SASRec and HSTU sequential encoders for retrieval (the baselines of docs/PROTOCOLS.md §1, §4).

Both follow meta-recsys/generative-recommenders (`generative_recommenders/research/`), see
docs/RETRIEVAL_BASELINES.md for each detail and where it comes from. Shared parts live here:

  input  = item_emb * sqrt(D) + learned absolute position emb -> dropout -> * valid
  blocks = SASRec (`sasrec.py`) or HSTU (`hstu.py`), causal
  output = L2-normalized per-position user embeddings [B, L, D]

Sequences are LEFT aligned (oldest event at position 0, padding after the last event), as in
the reference: padding then sits strictly after every valid position, so the causal mask alone
keeps it out of every valid output. The item table is tied: the same rows embed the inputs and
(L2-normalized, `normalized_items`) score the targets. Item id 0 is padding.

Dimension letters: B batch, L positions, D model width, H heads, I items (+1 with padding).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from vista_jax.models import hstu, sasrec
from vista_jax.models.seq_layers import (
    KeySplitter,
    dropout,
    l2_normalize,
    param,
    segment_positions,
    xavier_normal,
)

KINDS = ("sasrec", "hstu", "vista")


@dataclasses.dataclass(frozen=True)
class SequentialConfig:
    kind: str = "sasrec"  # "sasrec" | "hstu"
    num_items: int = 3706  # Real items 1..num_items; the table has num_items + 1 rows.
    d_model: int = 50  # Reference item_embedding_dim for ML-1M.
    num_blocks: int = 2
    num_heads: int = 1
    max_len: int = 200  # Input positions (history window).
    dropout: float = 0.2  # Input embeddings, SASRec FFN, HSTU linear (reference 0.2).
    attn_dropout: float = 0.2  # SASRec attention weights (torch MHA dropout); HSTU uses none.
    ffn_hidden: int = 50  # SASRec point-wise FFN width.
    attn_dim: int = 50  # HSTU d_qk per head.
    linear_dim: int = 50  # HSTU d_v per head.
    num_time_buckets: int = 128  # HSTU log-bucketed relative time bias (129 weights).
    # HSTU: "next" = position t's time bias uses the time of the event it predicts (the
    # reference; at evaluation that is the target's timestamp); "current" = its own time.
    query_time: str = "next"
    l2_eps: float = 1e-6
    # Ranking (`vista_jax.sequential_ranking`): each input event also embeds its action id
    # (its rating), 0 = off (retrieval reads items only, as the reference).
    num_actions: int = 0
    # VISTA retriever (`vista_retriever.py`): K seeds read a snapshot every S events; stage 2
    # reads the K summary tokens of its snapshot plus the last R raw events.
    num_seeds: int = 32
    snapshot_every: int = 40
    num_recent: int = 64
    summary_layers: int = 2
    summary_heads: int = 1
    stage2: str = "sasrec"  # VISTA stage-2 blocks: "sasrec" (softmax) or "hstu" (time-aware).
    # "live": the retriever runs its summarizer; "cached": a downstream retriever that reads
    # frozen summaries (from a source retriever, through a summary store) as input.
    summary_source: str = "live"
    # Causal attention is computed in this many query blocks, each reading only the keys
    # before its end (a speed knob: 4 blocks compute 5/8 of the L x L scores; same result).
    attention_chunks: int = 4

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"SequentialConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.query_time not in ("next", "current"):
            raise ValueError(f"query_time must be 'next' or 'current', got {self.query_time!r}")
        if self.stage2 not in ("sasrec", "hstu"):
            raise ValueError(f"stage2 must be 'sasrec' or 'hstu', got {self.stage2!r}")
        if self.summary_source not in ("live", "cached"):
            raise ValueError(
                f"summary_source must be 'live' or 'cached', got {self.summary_source!r}"
            )


def preset(name: str, num_items: int, **overrides) -> SequentialConfig:
    """The three ML-1M configs of the reference (`configs/ml-1m/*-final.gin`)."""
    presets = {
        "sasrec": dict(kind="sasrec", num_blocks=2, num_heads=1, ffn_hidden=50),
        "hstu": dict(kind="hstu", num_blocks=2, num_heads=1, attn_dim=50, linear_dim=50),
        "hstu_large": dict(kind="hstu", num_blocks=8, num_heads=2, attn_dim=25, linear_dim=25),
        # SASRec-sized stage 2 over [K summary tokens; last R events] per position.
        "vista": dict(kind="vista", num_blocks=2, num_heads=1, ffn_hidden=50),
        # HSTU-sized stage 2 (relative position and time biases) over the same tokens.
        "vista_hstu": dict(kind="vista", stage2="hstu", num_blocks=2, num_heads=1),
    }
    if name not in presets:
        raise ValueError(f"unknown model {name!r}; use one of {sorted(presets)}")
    return SequentialConfig(num_items=num_items, **(presets[name] | overrides))


def build_encoder(cfg: SequentialConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The encoder a config names: `SequentialEncoder` (SASRec, HSTU) or `VistaRetriever`."""
    if cfg.kind == "vista":
        from vista_jax.models.vista_retriever import VistaRetriever  # noqa: PLC0415

        return VistaRetriever(cfg, rngs)
    return SequentialEncoder(cfg, rngs)


# -- encoder ---------------------------------------------------------------------------------
class InputEmbedding(nnx.Module):
    """(item [+ action]) * sqrt(D) + position, dropout, zero at padding."""

    def __init__(self, cfg: SequentialConfig, rngs: nnx.Rngs):
        d = cfg.d_model
        # truncated normal(0.02) on the item table, as LocalEmbeddingModule does.
        self.items = param(
            nnx.initializers.truncated_normal(0.02),
            (cfg.num_items + 1, d),
            ("vocab", "embed"),
            rngs,
        )
        # SASRec keeps the preprocessor's truncated normal(sqrt(1/D)); HSTU's reset_params
        # re-initializes the position table with xavier normal.
        pos_init = (
            nnx.initializers.truncated_normal(math.sqrt(1.0 / d))
            if cfg.kind == "sasrec"
            else xavier_normal()
        )
        self.positions = param(pos_init, (cfg.max_len, d), (None, "embed"), rngs)
        if cfg.num_actions:
            init = nnx.initializers.truncated_normal(0.02)
            self.actions = param(init, (cfg.num_actions, d), (None, "embed"), rngs)
        self.scale = math.sqrt(d)
        self.rate = cfg.dropout

    def events(self, item, action=None) -> jax.Array:
        """(item [+ action]) * sqrt(D), without positions: [..., D]."""
        x = self.items[...][item]
        if action is not None and hasattr(self, "actions"):
            x = x + self.actions[...][action]
        return x * self.scale

    def __call__(self, item_BxL, valid_BxL, key, action_BxL=None, segment_BxL=None):
        length = item_BxL.shape[1]
        if segment_BxL is None:
            position_BxLxD = self.positions[...][:length]
        else:  # Packed rows: each user's positions count from its segment's start.
            position_BxLxD = self.positions[...][segment_positions(segment_BxL)]
        x_BxLxD = self.events(item_BxL, action_BxL) + position_BxLxD
        x_BxLxD = dropout(x_BxLxD, self.rate, key)
        return x_BxLxD * valid_BxL[..., None].astype(x_BxLxD.dtype)


class SequentialEncoder(nnx.Module):
    """item/time/valid [B, L] -> (L2-normalized user embeddings [B, L, D], aux)."""

    def __init__(self, cfg: SequentialConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = InputEmbedding(cfg, rngs)
        block = sasrec.SASRecBlock if cfg.kind == "sasrec" else hstu.HSTUBlock
        self.blocks = nnx.List([block(cfg, rngs) for _ in range(cfg.num_blocks)])

    def normalized_items(self) -> jax.Array:
        """The tied item table, L2-normalized: [I + 1, D] (row 0 is padding)."""
        return l2_normalize(self.items_table(), self.cfg.l2_eps)

    def items_table(self) -> jax.Array:
        return self.embed.items[...]

    def __call__(
        self, item_BxL, valid_BxL, time_BxL=None, next_time_BxL=None, dropout_key=None,
        action_BxL=None, segment_BxL=None,
    ):  # fmt: skip
        """`segment_BxL`: rows packed by `sequences.pack_rows` (attention stays within a
        segment, positions count from its start); None for one user per row."""
        keys = KeySplitter(dropout_key)
        x_BxLxD = self.embed(item_BxL, valid_BxL, keys(), action_BxL, segment_BxL)
        context = None
        if self.cfg.kind == "hstu":
            query_BxL = next_time_BxL if self.cfg.query_time == "next" else time_BxL
            context = hstu.time_buckets(query_BxL, time_BxL, self.cfg.num_time_buckets)
        for block in self.blocks:
            x_BxLxD = block(x_BxLxD, valid_BxL, context, keys, segment_BxL)
        return l2_normalize(x_BxLxD, self.cfg.l2_eps), {"encoded": x_BxLxD}

    def encode_last(self, item_BxL, valid_BxL, time_BxL=None, next_time_BxL=None):
        """Deterministic embedding at each row's last valid position: [B, D]."""
        user_BxLxD, _ = self(item_BxL, valid_BxL, time_BxL, next_time_BxL)
        return at_last_valid(user_BxLxD, valid_BxL)


def at_last_valid(x_BxLxD, valid_BxL) -> jax.Array:
    """Each row's vector at its last valid (left-aligned) position: [B, D]."""
    last_B = jnp.maximum(jnp.sum(valid_BxL, axis=1) - 1, 0)
    return jnp.take_along_axis(x_BxLxD, last_B[:, None, None], axis=1)[:, 0]

"""Typed, frozen model configuration: the one boundary where ConfigDicts become dataclasses.

Dimension letters used across the code base:
  B batch, L history, R recent events, C candidates, K seeds, D model width,
  H heads, E head width (D // H), T chunk length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import ml_collections

from vista_jax.data.eventlog import NUM_ACTIONS, NUM_GAP_BUCKETS


@dataclasses.dataclass(frozen=True)
class SummarizerConfig:
    """Stage 1: learned seeds summarize the whole history."""

    num_items: int  # Dense item ids are 1..num_items; 0 is padding.
    num_actions: int = NUM_ACTIONS
    num_gap_buckets: int = NUM_GAP_BUCKETS
    num_categories: int = 0  # Dense category ids 1..num_categories; 0 = unknown.
    d_model: int = 32
    num_heads: int = 2
    num_layers: int = 2
    num_seeds: int = 16
    sglu_hidden: int = 64
    attention: str = "qla"  # "qla" (linear, chunked/recurrent capable) or "softmax" (baseline).
    chunk_size: int = 256  # Events per scan step of the chunked form.
    recon_window: int = 64  # Events the reconstruction decoder reads (bounded at any length).
    recon_weight: float = 1.0

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}"
            )
        if self.attention not in ("qla", "softmax"):
            raise ValueError(f"attention must be 'qla' or 'softmax', got {self.attention!r}")


@dataclasses.dataclass(frozen=True)
class RankerConfig:
    """Stage 2: candidates attend to [summary tokens; last R events]."""

    num_items: int
    num_actions: int = NUM_ACTIONS
    num_gap_buckets: int = NUM_GAP_BUCKETS
    num_categories: int = 0  # Dense category ids 1..num_categories; 0 = unknown.
    d_model: int = 32
    num_heads: int = 2
    num_layers: int = 2
    mlp_hidden: int = 64
    num_recent: int = 32
    summary_dim: int = 32  # Width of the summary tokens it reads; 0 = no summaries (recent only).

    @property
    def use_summaries(self) -> bool:
        return self.summary_dim > 0


def summarizer_config(
    cfg: ml_collections.ConfigDict, num_items: int, num_categories: int = 0
) -> SummarizerConfig:
    return SummarizerConfig(
        num_items=num_items, num_categories=num_categories, **cfg.summarizer.to_dict()
    )


def ranker_config(
    cfg: ml_collections.ConfigDict, num_items: int, *, summary_dim: int, num_categories: int = 0
) -> RankerConfig:
    return RankerConfig(
        num_items=num_items,
        num_categories=num_categories,
        num_recent=cfg.data.num_recent,
        summary_dim=summary_dim,
        **cfg.ranker.to_dict(),
    )


def config_hash(obj: Any) -> str:
    """Stable short hash of a dataclass or dict (names a summarizer in the cache manifest)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

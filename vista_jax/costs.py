"""Analytic FLOP counts: what each model costs per user, per request and per training run.

Deterministic and backend-free, so a sweep's cost axis does not depend on how loaded the
machine was (measured seconds go beside them, never instead). Every count is the necessary
multiply-adds of the matmuls, at 2 FLOPs each; norms, activations, embedding gathers and the
padding an implementation also computes are not counted.

Letters: L history events, W summary window, C candidates, K seeds, R recent events,
D width, E head width, F hidden width of the feed-forward layers.
"""

from __future__ import annotations

import dataclasses

from vista_jax.config import RankerConfig, SummarizerConfig
from vista_jax.models import qla

TRAIN_OVER_FORWARD = 3.0  # Forward + backward (two matmuls per forward one), the usual rule.


def summarizer_flops(length: int, cfg: SummarizerConfig) -> float:
    """FLOPs of the chunked summarizer over `length` events of one user (forward).

    Per event in each of the first N-1 layers: q/k/v/out projections 4 D^2; SGLU 3 D F;
    state update k v^T and inter-block readout q S, D E each; causal attention inside a
    block of T = min(chunk, qla.INTRA_BLOCK) events over on average (T+1)/2 keys, scores and
    values, (T+1) D. The last layer's history outputs are never read: k/v projections 2 D^2
    and the state update D E. Seeds: K rows through every layer (projections, SGLU,
    readout q phi(S) D E), a constant.
    """
    d, f, n_layers = cfg.d_model, cfg.sglu_hidden, cfg.num_layers
    t = min(cfg.chunk_size, qla.INTRA_BLOCK)
    e = d // cfg.num_heads
    full_layer = 4 * d * d + 3 * d * f + 2 * d * e + (t + 1) * d
    last_layer = 2 * d * d + d * e
    per_event = (n_layers - 1) * full_layer + last_layer
    seeds = cfg.num_seeds * n_layers * (4 * d * d + 3 * d * f + d * e + d)
    return 2.0 * (length * per_event + seeds)


def decoder_flops(cfg: SummarizerConfig) -> float:
    """FLOPs of the reconstruction decoder (training only) over K + M tokens, M its window."""
    d, f, n = cfg.d_model, cfg.sglu_hidden, cfg.num_seeds + cfg.recon_window
    per_token = 3 * d * d + d * d + 3 * d * f + d * d  # qkv, out, SGLU, head
    return 2.0 * (n * per_token + n * n * d)  # + full attention scores and values (causal)


def _head_flops(cfg: RankerConfig, num_candidates: int) -> float:
    """The scoring MLP over [candidate; attended] per candidate (2D -> F -> 1)."""
    return num_candidates * (2 * cfg.d_model * cfg.mlp_hidden + cfg.mlp_hidden)


def ranker_flops(cfg: RankerConfig, num_candidates: int, num_summary_tokens: int) -> float:
    """FLOPs of stage 2 scoring one request: C candidates over [null; K summaries; R events].

    Per block: queries and output C D^2 each, keys and values 2 N D^2 over the N context
    tokens, scores and values 2 C N D, the MLP 2 C D F. With `cfg.summary_dim == 0` (the
    recent-only ranker) there are no summary tokens.
    """
    d, c = cfg.d_model, num_candidates
    k = num_summary_tokens if cfg.use_summaries else 0
    n = 1 + k + cfg.num_recent
    block = 2 * c * d * d + 2 * n * d * d + 2 * c * n * d + 2 * c * d * cfg.mlp_hidden
    proj = k * cfg.summary_dim * d
    return 2.0 * (cfg.num_layers * block + proj + _head_flops(cfg, c))


def full_target_attention_flops(length: int, cfg: RankerConfig, num_candidates: int) -> float:
    """FLOPs of `FullTargetAttentionRanker` (one layer) scoring one request over L raw events."""
    d, c = cfg.d_model, num_candidates
    # Queries and output C D^2 each; keys and values 2 L D^2 (the learned null key/value is
    # not projected); scores and values over the null and the L events 2 C (L + 1) D.
    attend = 2 * c * d * d + 2 * length * d * d + 2 * c * (length + 1) * d
    return 2.0 * (attend + _head_flops(cfg, c))


def per_request(
    scfg: SummarizerConfig, rcfg: RankerConfig, window: int, num_candidates: int
) -> dict[str, float]:
    """FLOPs per request of each way to score: with summaries (live or cached), recent only,
    full target attention over the raw window; and the summarizer pass per user (offline)."""
    with_summaries = ranker_flops(rcfg, num_candidates, scfg.num_seeds)
    recent = ranker_flops(_without_summaries(rcfg), num_candidates, 0)
    summarize = summarizer_flops(window, scfg)
    return {
        "summarizer": summarize,
        "vista_source": summarize + with_summaries,  # Summarizer run live, then stage 2.
        "vista_source_on_cache": with_summaries,
        "vista_downstream": with_summaries,
        "recent_only": recent,
        "full_target_attention": full_target_attention_flops(window, rcfg, num_candidates),
    }


def training(
    scfg: SummarizerConfig,
    rcfg: RankerConfig,
    window: int,
    num_candidates: int,
    source_examples: int,
    downstream_examples: int,
) -> dict[str, float]:
    """Training FLOPs of the source model and of each downstream ranker (3 x forward)."""
    source = (
        summarizer_flops(window, scfg)
        + decoder_flops(scfg)
        + ranker_flops(rcfg, num_candidates, scfg.num_seeds)
    )
    cached = ranker_flops(rcfg, num_candidates, scfg.num_seeds)
    recent = ranker_flops(_without_summaries(rcfg), num_candidates, 0)
    return {
        "vista_source": TRAIN_OVER_FORWARD * source * source_examples,
        "vista_downstream": TRAIN_OVER_FORWARD * cached * downstream_examples,
        "recent_only": TRAIN_OVER_FORWARD * recent * downstream_examples,
    }


def _without_summaries(cfg: RankerConfig) -> RankerConfig:
    return dataclasses.replace(cfg, summary_dim=0)

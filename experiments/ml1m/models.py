"""The models of the ML-1M harness (`train_sequential --model`): what each is and what it
can honour.

Adding a model is its module under `vista_jax/models/` plus a row here: `CAPABILITIES` says
its family (how the harness builds and trains it), its tasks, whether it reads the events
before the window (`--prefix_len`) and the VISTA summary cache; `check_flags` refuses a
command the model cannot honour before any data is read.
"""

from __future__ import annotations

import dataclasses

from absl import app

from vista_jax.models.sim import SimHardRanker
from vista_jax.models.target_attention import FullTargetAttentionRanker
from vista_jax.models.twin import TwinRanker

# Ranking only: the request-form rankers of the long-history comparison (name -> class, its
# keyword arguments from the parsed flags), scored at every position
# (`vista_jax.sequential_ranking.PositionTargetRanker`).
TARGET_ATTENTION = {
    "full_attention": (FullTargetAttentionRanker, lambda f: {}),
    "sim_hard": (SimHardRanker, lambda f: {"top_k": f.top_k}),
    "twin": (TwinRanker, lambda f: {"top_k": f.top_k}),
    "recent_attention": (FullTargetAttentionRanker, lambda f: {"recent": f.num_recent}),
}
# Ranking only: VISTA's stage 2 (`Ranker`), the candidate attending to [its snapshot's summary
# tokens (from a --from_cache of vista_hstu summaries); the last --num_recent events], and the
# same `Ranker` without summaries (recent_only).
SUMMARY_RANKER, RECENT_ONLY = "vista_ranker", "recent_only"


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a --model can honour, checked before any data is read (`check_flags`).

    family: "encoder" (a sequential encoder: retrieval, or ranking with a position head),
    "request" (a `TARGET_ATTENTION` ranker) or "ranker" (VISTA's stage-2 `Ranker`).
    ranking_only: it has no retrieval head. prefix: it reads the events before the window
    (--prefix_len). cache: the VISTA summary cache, "none", "either" (a source that may
    --export_cache, or a downstream that reads --from_cache) or "required" (--from_cache).
    """

    family: str
    ranking_only: bool = False
    prefix: bool = False
    cache: str = "none"
    packs: bool = False  # Its retrieval training reads packed rows (--pack_rows).


CAPABILITIES = {
    "sasrec": Capabilities("encoder", packs=True),
    "hstu": Capabilities("encoder", packs=True),
    "hstu_large": Capabilities("encoder", packs=True),
    "vista": Capabilities("encoder", prefix=True, cache="either"),
    "vista_hstu": Capabilities("encoder", prefix=True, cache="either"),
    **{name: Capabilities("request", True, prefix=True) for name in TARGET_ATTENTION},
    SUMMARY_RANKER: Capabilities("ranker", True, prefix=True, cache="required"),
    RECENT_ONLY: Capabilities("ranker", True),
}
MODELS = list(CAPABILITIES)
# The flags `check_flags` reads besides --model and --task (its keyword arguments).
CHECKED_FLAGS = (
    "prefix_len", "from_cache", "export_cache", "score_caches", "score_lags", "snapshot_every",
)  # fmt: skip


def check_flags(
    model: str,
    task: str,
    *,
    prefix_len: int = 0,
    from_cache: str = "",
    export_cache: str = "",
    score_caches: list[str] = (),
    score_lags: list[str] = (),
    snapshot_every: int = 1,
):
    """Refuses (app.UsageError, naming the fix) flags `model` cannot honour."""
    can = CAPABILITIES[model]
    if can.ranking_only and task != "ranking":
        raise app.UsageError(f"--model={model} ranks: use it with --task=ranking")
    if prefix_len and not can.prefix:
        raise app.UsageError(
            f"--prefix_len is for the VISTA and request-form models; --model={model} reads the "
            "window only. Fix: drop --prefix_len"
        )
    if from_cache and can.cache == "none":
        raise app.UsageError(
            f"--from_cache holds VISTA summaries; --model={model} reads none. Fix: use "
            f"--model=vista or vista_hstu (the settings of the run that exported it) or "
            f"--model={SUMMARY_RANKER}"
        )
    if not from_cache and can.cache == "required":
        raise app.UsageError(
            f"--model={model} reads summaries: pass --from_cache=DIR (a --task=ranking "
            "--model=vista_hstu run's --export_cache)"
        )
    if export_cache and (can.cache != "either" or from_cache):
        raise app.UsageError(
            f"--export_cache needs a source VISTA model (--model=vista or vista_hstu without "
            f"--from_cache); --model={model}{' --from_cache' if from_cache else ''} has no "
            "summarizer of its own"
        )
    if score_caches and not (from_cache and task == "ranking"):
        raise app.UsageError(
            "--score_caches scores a ranking model that reads --from_cache on other caches; "
            f"--model={model} --task={task}{' --from_cache' if from_cache else ''} does not. "
            "Fix: add --from_cache=DIR (and --task=ranking) or drop --score_caches"
        )
    if score_lags and not (can.cache == "required" and from_cache and task == "ranking"):
        raise app.UsageError(
            f"--score_lags makes the summaries of --model={SUMMARY_RANKER} stale; "
            f"--model={model} does not read them per position. Fix: drop --score_lags"
        )
    bad = [lag for lag in score_lags if not str(lag).isdigit() or int(lag) % snapshot_every]
    if bad:
        raise app.UsageError(
            f"--score_lags={','.join(map(str, score_lags))}: {bad} are not multiples of "
            f"--snapshot_every={snapshot_every} (a stale summary is an older snapshot). Fix: "
            f"use lags like {snapshot_every},{2 * snapshot_every}"
        )

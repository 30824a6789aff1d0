"""Synthetic lifelong user histories with planted long-range structure (docs/PROTOCOLS.md §3).

Each user is generated independently from ``np.random.default_rng([seed, user])``, so any
user can be produced alone, in any order, reproducibly, and nothing of shape
``users x history`` is ever materialized. Generation is vectorized per user (1M events in
well under a second).

Structure
---------
Items belong to topics: item id ``1 + topic * items_per_topic + j`` (``j`` in
``0..items_per_topic-1``), category id ``topic + 1``; 0 is padding for both.

Each user draws a random permutation of the topics and takes from it:

* ``dormant`` topics (``num_dormant``): interests only in the first ``dormant_frac`` of the
  history and never again (not in the later history, not in the recent events);
* ``active`` topics (``num_active``): interests throughout, including the recent events;
* ``returning`` topics (``num_returning``): interests in two windows of the history separated
  by a long gap, absent from the end of the history and from the recent events;
* ``decoy`` topics (``num_decoy``): NOT interests (noise level in the history), but drawn as
  candidates as often as dormant topics, so that a model that only sees the candidate set
  and the recent events cannot tell a dormant topic from a decoy by its frequency among the
  candidates; only the early history separates them.

Every event is background noise with probability ``noise_frac`` (uniformly random topic,
mostly disliked: action 1), else an event on one of the interest topics in phase at that
position (mostly liked: action 2). Times are int64 seconds: a per-user random start plus
cumulative floor-exponential gaps (mean ``mean_gap_s``), so they are non-decreasing.

After the ``history_len`` history events come ``num_recent`` recent events (same process as the
end of the history: active topics + noise), then the request with ``num_candidates``
candidates. A candidate of topic ``t`` and item ``i`` has the exact label probability

    p = sigmoid(bias + w_dormant*[t in dormant] + w_returning*[t in returning]
                + w_active*[t in active or t in recent topics] + item_effect[i])

where "recent topics" are the topics of the ``num_recent`` recent events and ``item_effect``
is a fixed per-item ``N(0, item_effect_std)`` effect (seeded by ``seed`` only). Labels are
Bernoulli(p). :func:`oracle_auc` ranks by ``p``; :func:`recent_only_oracle_auc` ranks by
the best probability a model can form knowing only the recent events and the item effect.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator

import numpy as np

from vista_jax import metrics
from vista_jax.data import features

# Event actions are those of binary labels (vista_jax.data.features): disliked 1, liked 2.
DISLIKE, LIKE = (int(a) for a in features.label_actions(np.array([0, 1])))
# Extra words for the item-effect seed sequence; user streams use [seed, user] (2 words).
_ITEM_STREAM = (0, 0, 0, 0x17E3EFF)
_TIME_BASE = 1_500_000_000
# Recent-only predictor: count of the candidate's topic among the recent events, capped.
_MAX_RECENT_COUNT_BUCKET = 4


# The shortest history with every phase non-empty: a dormant phase and two returning windows.
MIN_HISTORY_LEN = 20


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    num_users: int = 1000
    history_len: int = 2000
    num_topics: int = 16
    items_per_topic: int = 64
    num_candidates: int = 32
    num_recent: int = 32
    seed: int = 0
    # --- interests per user
    num_dormant: int = 2
    num_active: int = 2
    num_returning: int = 1
    num_decoy: int = 2
    # --- phases, as fractions of history_len
    dormant_frac: float = 0.3  # dormant topics live in [0, dormant_frac)
    returning_windows: tuple[tuple[float, float], ...] = ((0.35, 0.5), (0.75, 0.9))
    # relative weight of each interest group among interest events while in phase
    dormant_weight: float = 3.0
    active_weight: float = 1.0
    returning_weight: float = 1.0
    noise_frac: float = 0.35
    # --- actions
    p_like_interest: float = 0.85
    p_like_noise: float = 0.15
    # --- times
    mean_gap_s: float = 3600.0
    max_start_offset_s: int = 100_000_000
    # --- candidates: source fractions (dormant, decoy, active+returning, uniform)
    cand_frac_dormant: float = 0.3
    cand_frac_decoy: float = 0.3
    cand_frac_active: float = 0.25
    cand_frac_uniform: float = 0.15
    # --- labels
    bias: float = -2.5
    w_dormant: float = 3.0
    w_returning: float = 2.5
    w_active: float = 2.0
    item_effect_std: float = 0.5

    def __post_init__(self):
        if not MIN_HISTORY_LEN <= self.history_len <= 1_000_000:
            raise ValueError(
                f"history_len must be in [{MIN_HISTORY_LEN}, 1_000_000], got {self.history_len}"
            )
        need = self.num_dormant + self.num_active + self.num_returning + self.num_decoy
        if need > self.num_topics:
            raise ValueError(f"num_topics={self.num_topics} < {need} topics needed per user")
        if self.num_dormant < 1 or self.num_active < 1:
            raise ValueError("need at least one dormant and one active topic")
        if min(self.num_users, self.items_per_topic, self.num_candidates, self.num_recent) < 1:
            raise ValueError("num_users, items_per_topic, num_candidates, num_recent must be >= 1")
        if not 0.0 < self.dormant_frac < 1.0 or not 0.0 <= self.noise_frac < 1.0:
            raise ValueError("dormant_frac must be in (0, 1) and noise_frac in [0, 1)")
        for a, b in self.returning_windows:
            if not 0.0 <= a < b <= 1.0:
                raise ValueError(f"bad returning window {(a, b)}")
        fr = self._cand_fracs()
        if np.any(fr < 0) or not np.isclose(fr.sum(), 1.0):
            raise ValueError(f"candidate source fractions must be >= 0 and sum to 1, got {fr}")
        if self.num_decoy == 0 and self.cand_frac_decoy > 0:
            raise ValueError("cand_frac_decoy > 0 needs num_decoy >= 1")

    def _cand_fracs(self) -> np.ndarray:
        return np.array(
            [
                self.cand_frac_dormant,
                self.cand_frac_decoy,
                self.cand_frac_active,
                self.cand_frac_uniform,
            ],
            np.float64,
        )


@dataclasses.dataclass(frozen=True)
class UserInterests:
    """Planted per-user structure (0-based topic ids; category id = topic + 1)."""

    dormant: np.ndarray
    active: np.ndarray
    returning: np.ndarray
    decoy: np.ndarray
    dormant_end: int  # dormant topics occur only in history events [0, dormant_end)
    returning_windows: tuple[tuple[int, int], ...]  # event-index windows of returning topics


def num_items(config: SyntheticConfig) -> int:
    return config.num_topics * config.items_per_topic


def num_categories(config: SyntheticConfig) -> int:
    return config.num_topics


def item_topic(config: SyntheticConfig, item: np.ndarray) -> np.ndarray:
    """0-based topic of dense item ids (1..num_items)."""
    return (np.asarray(item) - 1) // config.items_per_topic


@functools.lru_cache(maxsize=16)
def _item_effects_cached(seed: int, n: int, std: float) -> np.ndarray:
    rng = np.random.default_rng([seed, *_ITEM_STREAM])
    eff = rng.normal(0.0, std, size=n)
    eff.setflags(write=False)
    return eff


def item_effects(config: SyntheticConfig) -> np.ndarray:
    """Fixed per-item logit effect, float64 [num_items]; entry i-1 belongs to item id i."""
    return _item_effects_cached(int(config.seed), num_items(config), float(config.item_effect_std))


def _draw_interests(config: SyntheticConfig, rng: np.random.Generator) -> UserInterests:
    perm = rng.permutation(config.num_topics)
    sizes = [config.num_dormant, config.num_active, config.num_returning, config.num_decoy]
    parts = np.split(perm[: sum(sizes)], np.cumsum(sizes)[:-1])
    n = config.history_len
    dormant_end = max(1, int(round(config.dormant_frac * n)))
    windows = tuple((int(round(a * n)), int(round(b * n))) for a, b in config.returning_windows)
    return UserInterests(
        dormant=parts[0],
        active=parts[1],
        returning=parts[2],
        decoy=parts[3],
        dormant_end=dormant_end,
        returning_windows=windows,
    )


def interests(config: SyntheticConfig, user: int) -> UserInterests:
    """The planted interests of ``user`` (cheap: draws only the first values of its stream)."""
    return _draw_interests(config, np.random.default_rng([config.seed, int(user)]))


def _segments(config: SyntheticConfig, ui: UserInterests):
    """Piecewise-constant phases: [(start, stop, topics, probs)] covering history + recent."""
    n, total = config.history_len, config.history_len + config.num_recent
    cuts = {0, n, total, ui.dormant_end}
    for a, b in ui.returning_windows:
        cuts.update((a, b))
    cuts = sorted(c for c in cuts if 0 <= c <= total)
    segs = []
    for s, e in zip(cuts[:-1], cuts[1:], strict=True):
        if e <= s:
            continue
        topics, weights = [ui.active], [config.active_weight]
        if s < ui.dormant_end:
            topics.append(ui.dormant)
            weights.append(config.dormant_weight)
        if e <= n and any(a <= s and e <= b for a, b in ui.returning_windows):
            if len(ui.returning):
                topics.append(ui.returning)
                weights.append(config.returning_weight)
        # each group's weight is spread evenly over its topics
        t = np.concatenate(topics)
        w = np.concatenate(
            [np.full(len(g), wt / len(g)) for g, wt in zip(topics, weights, strict=True)]
        )
        segs.append((s, e, t, w / w.sum()))
    return segs


def _events(config: SyntheticConfig, ui: UserInterests, rng: np.random.Generator):
    """(topic, item, action, time) of the history plus the recent events."""
    total = config.history_len + config.num_recent
    T, ipt = config.num_topics, config.items_per_topic
    # Topic per event, segment by segment (vectorized within a segment).
    topic = np.empty(total, np.int64)
    is_noise = rng.random(total) < config.noise_frac
    for s, e, t, w in _segments(config, ui):
        topic[s:e] = t[np.searchsorted(np.cumsum(w)[:-1], rng.random(e - s), side="right")]
    n_noise = int(is_noise.sum())
    topic[is_noise] = rng.integers(0, T, size=n_noise)
    item = (1 + topic * ipt + rng.integers(0, ipt, size=total)).astype(np.int32)
    p_like = np.where(is_noise, config.p_like_noise, config.p_like_interest)
    action = np.where(rng.random(total) < p_like, LIKE, DISLIKE).astype(np.int32)
    gaps = np.floor(rng.exponential(config.mean_gap_s, size=total)).astype(np.int64)
    gaps[0] = 0
    start = _TIME_BASE + int(rng.integers(0, config.max_start_offset_s + 1))
    return topic, item, action, start + np.cumsum(gaps)


def _candidates(config: SyntheticConfig, ui: UserInterests, rng, topic: np.ndarray):
    """(cand_item, label, prob, meta) of the request; labels drawn from known probabilities."""
    C, T, ipt = config.num_candidates, config.num_topics, config.items_per_topic
    src = rng.choice(4, size=C, p=config._cand_fracs())
    u = rng.random(C)
    pools = [ui.dormant, ui.decoy, np.concatenate([ui.active, ui.returning]), np.arange(T)]
    cand_topic = np.empty(C, np.int64)
    for k, pool in enumerate(pools):
        m = src == k
        cand_topic[m] = pool[np.minimum((u[m] * len(pool)).astype(np.int64), len(pool) - 1)]
    cand_item = (1 + cand_topic * ipt + rng.integers(0, ipt, size=C)).astype(np.int32)

    recent_count = np.bincount(topic[config.history_len :], minlength=T)[cand_topic]
    in_dormant = np.isin(cand_topic, ui.dormant)
    in_returning = np.isin(cand_topic, ui.returning)
    in_active = np.isin(cand_topic, ui.active)
    eff = item_effects(config)[cand_item - 1]
    logit = (
        config.bias
        + config.w_dormant * in_dormant
        + config.w_returning * in_returning
        + config.w_active * (in_active | (recent_count > 0))
        + eff
    )
    prob = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(C) < prob).astype(np.float32)
    # class: 0 other, 1 dormant, 2 returning, 3 active (disjoint sets)
    cls = np.where(in_dormant, 1, np.where(in_returning, 2, np.where(in_active, 3, 0)))
    meta = {"cls": cls, "recent_count": recent_count, "effect": eff}
    return cand_item, label, prob, meta


def _generate(config: SyntheticConfig, user: int):
    """Returns (record, meta); meta has per-candidate info for the oracle diagnostics."""
    rng = np.random.default_rng([config.seed, int(user)])
    ui = _draw_interests(config, rng)
    topic, item, action, time = _events(config, ui, rng)
    cand_item, label, prob, meta = _candidates(config, ui, rng, topic)
    record = {
        "user": np.int64(user),
        "item": item,
        "action": action,
        "time": time,
        "category": (topic + 1).astype(np.int32),
        "cand_item": cand_item,
        "cand_label": label,
        "cand_prob": prob.astype(np.float32),
    }
    return record, meta


def generate_user(config: SyntheticConfig, user: int) -> dict[str, np.ndarray]:
    """One per-user record (ARCHITECTURE.md): history followed by the num_recent events."""
    return _generate(config, user)[0]


def iter_users(
    config: SyntheticConfig, start: int = 0, stop: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Streams the records of users ``start..stop-1`` (default: all ``num_users``)."""
    stop = config.num_users if stop is None else stop
    for user in range(start, stop):
        yield generate_user(config, user)


def _collect(config: SyntheticConfig, users: Iterable[int] | None):
    users = range(config.num_users) if users is None else users
    cols = {"prob": [], "label": [], "cls": [], "rc": [], "hc": [], "eff": []}
    for user in users:
        rec, meta = _generate(config, user)
        cols["prob"].append(rec["cand_prob"])
        cols["label"].append(rec["cand_label"])
        cols["cls"].append(meta["cls"])
        cols["rc"].append(meta["recent_count"])
        cols["hc"].append(_liked_history_count(config, rec))
        cols["eff"].append(meta["effect"])
    return {k: np.concatenate(v) for k, v in cols.items()}


def _liked_history_count(config: SyntheticConfig, rec) -> np.ndarray:
    """Per candidate: liked history events (recent events excluded) of the candidate's topic."""
    n = config.history_len
    liked = rec["action"][:n] == LIKE
    counts = np.bincount(rec["category"][:n][liked] - 1, minlength=config.num_topics)
    return counts[item_topic(config, rec["cand_item"])]


def _class_posterior_prob(config: SyntheticConfig, d, key: np.ndarray) -> np.ndarray:
    """E[p | key, item effect]: the candidate topic's class (other/dormant/returning/active)
    given a discrete `key` that includes the recent-count bucket, as a plug-in estimate from
    the same candidates (in-sample: a slight advantage to the predictor, so the gaps it
    yields are conservative)."""
    bucket = np.minimum(d["rc"], _MAX_RECENT_COUNT_BUCKET)
    counts = np.zeros((int(key.max()) + 1, 4))
    np.add.at(counts, (key, d["cls"]), 1.0)
    post = counts / np.maximum(counts.sum(1, keepdims=True), 1.0)  # [key, class]
    w_cls = np.array([0.0, config.w_dormant, config.w_returning, 0.0])
    out = np.zeros(bucket.size)
    for c in range(4):
        act = (c == 3) | (bucket > 0)
        logit = config.bias + w_cls[c] + config.w_active * act + d["eff"]
        out += post[key, c] / (1.0 + np.exp(-logit))
    return out


def _recent_only_prob(config: SyntheticConfig, d) -> np.ndarray:
    """E[p | count bucket of the candidate topic among recent events, item effect]."""
    return _class_posterior_prob(config, d, np.minimum(d["rc"], _MAX_RECENT_COUNT_BUCKET))


def _history_count_prob(config: SyntheticConfig, d) -> np.ndarray:
    """E[p | recent-count bucket, half-log2 bucket of the topic's liked history events, item
    effect]: what per-topic counts over the whole history tell, the evidence a summary can
    carry. Its AUC rises with the history length when long-range interests are sparse."""
    history_bucket = np.floor(2 * np.log2(1.0 + d["hc"])).astype(np.int64)
    recent_bucket = np.minimum(d["rc"], _MAX_RECENT_COUNT_BUCKET)
    return _class_posterior_prob(
        config, d, history_bucket * (_MAX_RECENT_COUNT_BUCKET + 1) + recent_bucket
    )


def history_count_auc(config: SyntheticConfig, users: Iterable[int] | None = None) -> float:
    """AUC of the history-count predictor (`_history_count_prob`), pooled over ``users``."""
    d = _collect(config, users)
    return metrics.auc(d["label"], _history_count_prob(config, d))


def auc_report(config: SyntheticConfig, users: Iterable[int] | None = None) -> dict[str, float]:
    """Oracle AUC, recent-only and history-count predictor AUCs and base rate over ``users``
    (pooled candidates)."""
    d = _collect(config, users)
    return {
        "oracle_auc": metrics.auc(d["label"], d["prob"]),
        "recent_only_auc": metrics.auc(d["label"], _recent_only_prob(config, d)),
        "history_count_auc": metrics.auc(d["label"], _history_count_prob(config, d)),
        "base_rate": float(d["label"].mean()),
        "num_candidates": int(d["label"].size),
    }


def oracle_auc(config: SyntheticConfig, users: Iterable[int] | None = None) -> float:
    """AUC of the true probability ``cand_prob`` vs ``cand_label``, pooled over ``users``."""
    d = _collect(config, users)
    return metrics.auc(d["label"], d["prob"])


def recent_only_oracle_auc(config: SyntheticConfig, users: Iterable[int] | None = None) -> float:
    """AUC of the best predictor that knows only the last ``num_recent`` events' topics and the
    candidate's item effect (dormant/returning membership replaced by its conditional
    expectation). The gap to :func:`oracle_auc` measures the long-range signal."""
    d = _collect(config, users)
    return metrics.auc(d["label"], _recent_only_prob(config, d))

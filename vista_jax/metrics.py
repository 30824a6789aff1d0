"""Evaluation metrics in numpy (evaluation runs on host, in float64).

Binary (CTR-style): `auc`, `log_loss`, `normalized_entropy`, `binary_metrics`, and
`paired_auc_bootstrap` (is one model's AUC above another's on the same candidates?) and its
many-model forms, `paired_auc_bootstraps` and `paired_auc_tests`.
Retrieval (one target among N scored items): `seen_mask`, `rank_of_target`, `ranking_metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

_EPS = 1e-7


def _masked(mask, *arrays) -> list[np.ndarray]:
    """Flattened float64 copies of `arrays`, keeping entries where `mask` is true."""
    flat = [np.asarray(a, np.float64).reshape(-1) for a in arrays]
    if mask is None:
        return flat
    keep = np.asarray(mask, bool).reshape(-1)
    return [a[keep] for a in flat]


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (so AUC counts a tie as 1/2)."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Start index of each run of equal values, and each element's run.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    run = np.cumsum(np.r_[True, sorted_values[1:] != sorted_values[:-1]]) - 1
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values))
    ranks[order] = mean_rank[run]
    return ranks


def auc(labels, scores, mask=None) -> float:
    """Exact ROC AUC (Mann-Whitney U via ranks, ties count 1/2), O(n log n).

    Labels are 0/1 (a label > 0.5 is positive). Returns nan when a class is missing.
    """
    labels, scores = _masked(mask, labels, scores)
    if np.isnan(scores).any():
        raise ValueError("auc: scores contain NaN")
    positive = labels > 0.5
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = _average_ranks(scores)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def weighted_auc_fn(labels, scores) -> Callable[[np.ndarray], float]:
    """`auc(weights)`: the AUC of the candidates repeated `weights` times (ties count 1/2).

    Sorts once; each call is O(n), so a bootstrap's thousands of resamples cost little. With
    all weights 1 it equals `auc(labels, scores)`.
    """
    labels, scores = np.asarray(labels, np.float64), np.asarray(scores, np.float64)
    if np.isnan(scores).any():
        raise ValueError("weighted_auc_fn: scores contain NaN")
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    positive = labels[order] > 0.5
    tie_group = np.concatenate([[0], np.cumsum(ranked[1:] != ranked[:-1])]).astype(np.int64)
    num_groups = int(tie_group[-1]) + 1 if len(ranked) else 0

    def weighted_auc(weights) -> float:
        w = np.asarray(weights, np.float64)[order]
        pos = np.bincount(tie_group, w * positive, num_groups)
        neg = np.bincount(tie_group, w * ~positive, num_groups)
        total = pos.sum() * neg.sum()
        if total == 0:
            return float("nan")
        below = np.cumsum(neg) - neg  # Negative weight strictly below each tie group.
        return float(pos @ (below + 0.5 * neg) / total)

    return weighted_auc


def paired_auc_bootstrap(
    labels, scores_a, scores_b, groups, num_samples: int = 1000, seed: int = 0
) -> dict[str, float]:
    """AUC(a) - AUC(b) on the same candidates, with a bootstrap over `groups` (e.g. users).

    A resample draws as many groups as there are, with replacement, and keeps each drawn
    group's candidates together (one user's candidates are correlated, so candidates are not
    the independent unit); both models are scored on the same resample, so the test is paired.
    Returns `diff` (on the data as is), `ci95` (percentile interval of the resampled
    differences), `p_value` (two-sided: twice the share of resamples on the far side of 0,
    at least 1 / num_samples) and the counts.
    """
    return paired_auc_bootstraps(labels, scores_a, {"b": scores_b}, groups, num_samples, seed)["b"]


def paired_auc_bootstraps(
    labels, scores_a, others: dict, groups, num_samples: int = 1000, seed: int = 0
) -> dict[str, dict]:
    """`paired_auc_bootstrap(labels, scores_a, b, ...)` for every b in `others`, sharing the
    resamples and model a's resampled AUCs (drawn and computed once, not once per b)."""
    resamples = GroupResamples(groups, num_samples, seed)
    a = resamples.aucs(labels, scores_a)
    return {name: resamples.test(a, resamples.aucs(labels, b)) for name, b in others.items()}


def paired_auc_tests(
    labels, pairs: dict[str, tuple], groups, num_samples: int = 1000, seed: int = 0
) -> dict[str, dict]:
    """`paired_auc_bootstrap` of every named (scores_a, scores_b) pair on the same candidates,
    all on one set of resamples (e.g. each model of two runs against itself)."""
    resamples = GroupResamples(groups, num_samples, seed)
    return {
        name: resamples.test(resamples.aucs(labels, a), resamples.aucs(labels, b))
        for name, (a, b) in pairs.items()
    }


class GroupResamples:
    """Bootstrap resamples over groups: each draws as many groups as there are, with
    replacement, and weighs every candidate by how often its group was drawn."""

    def __init__(self, groups, num_samples: int, seed: int):
        _, self.group_of = np.unique(np.asarray(groups), return_inverse=True)
        self.num_groups = int(self.group_of.max()) + 1 if len(self.group_of) else 0
        self.num_samples = int(num_samples)
        rng = np.random.default_rng(seed)
        # Per resample, how often each group was drawn ([S, G]: small; expanded per use).
        self.draws = [
            np.bincount(
                rng.integers(0, self.num_groups, self.num_groups), minlength=self.num_groups
            )
            for _ in range(num_samples)
        ]

    def aucs(self, labels, scores) -> tuple[float, np.ndarray]:
        """The AUC on the data as is, and on every resample."""
        auc_of = weighted_auc_fn(labels, scores)
        resampled = np.array([auc_of(d[self.group_of]) for d in self.draws])
        return auc_of(np.ones(len(self.group_of))), resampled

    def test(self, a: tuple[float, np.ndarray], b: tuple[float, np.ndarray]) -> dict:
        """AUC(a) − AUC(b) from two `aucs` results: diff, ci95, two-sided p, counts."""
        resampled = a[1] - b[1]
        far_side = min(np.mean(resampled <= 0.0), np.mean(resampled >= 0.0))
        return {
            "diff": float(a[0] - b[0]),
            "ci95": [float(np.quantile(resampled, 0.025)), float(np.quantile(resampled, 0.975))],
            "p_value": float(min(1.0, max(2.0 * far_side, 1.0 / self.num_samples))),
            "num_samples": self.num_samples,
            "num_groups": self.num_groups,
        }


def _binary_entropy(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    probs = np.clip(probs, _EPS, 1.0 - _EPS)
    return -(labels * np.log(probs) + (1.0 - labels) * np.log1p(-probs))


def log_loss(labels, probs, mask=None) -> float:
    """Mean binary cross-entropy; probabilities clipped to [1e-7, 1 - 1e-7]."""
    labels, probs = _masked(mask, labels, probs)
    return float(_binary_entropy(labels, probs).mean()) if len(labels) else float("nan")


def _base_entropy(labels: np.ndarray) -> float:
    """Log loss of always predicting the base rate; nan when it is 0 or 1 (NE undefined)."""
    base_rate = labels.mean() if len(labels) else np.nan
    if not 0.0 < base_rate < 1.0:
        return float("nan")
    return float(_binary_entropy(labels, np.full_like(labels, base_rate)).mean())


def normalized_entropy(labels, probs, mask=None) -> float:
    """Log loss / entropy of the base rate: 1.0 for the base-rate predictor, lower is better."""
    labels, probs = _masked(mask, labels, probs)
    return log_loss(labels, probs) / _base_entropy(labels)


def binary_metrics(labels, logits, mask=None) -> dict[str, float]:
    """AUC, log loss, NE, base rate and count of a binary task scored by logits.

    Log loss comes from the logits directly (log-sigmoid), so confident logits are not clipped.
    """
    labels, logits = _masked(mask, labels, logits)
    # -log sigmoid(z) = softplus(-z); softplus(x) = logaddexp(0, x) is stable for large |x|.
    losses = labels * np.logaddexp(0.0, -logits) + (1.0 - labels) * np.logaddexp(0.0, logits)
    logloss = float(losses.mean()) if len(labels) else float("nan")
    return {
        "auc": auc(labels, logits),
        "logloss": logloss,
        "ne": logloss / _base_entropy(labels),
        "base_rate": float(labels.mean()) if len(labels) else float("nan"),
        "count": int(len(labels)),
    }


def seen_mask(history_BxW, num_columns: int) -> np.ndarray:
    """bool [B, num_columns]: column j is set when item id j is in the row's history window.

    Columns are item ids, so column 0 (the padding id, also what a short window is padded
    with) is always set. The protocols' exclusion mask: passed to `rank_of_target`, seen
    items never outrank the target, and the target itself is ranked even when it was seen.
    """
    history_BxW = np.asarray(history_BxW)
    mask = np.zeros((len(history_BxW), num_columns), bool)
    mask[np.arange(len(history_BxW))[:, None], history_BxW] = True
    mask[:, 0] = True
    return mask


def rank_of_target(scores, target, exclude_mask=None) -> np.ndarray:
    """0-based rank of each row's target column among its scored items, [B, N] -> [B] int64.

    Excluded items (e.g. padding column 0, already-seen items) never outrank the target; the
    target's own exclusion bit is ignored. Ties are pessimistic: every other item scoring
    exactly the target's score counts as above it.
    """
    scores = np.asarray(scores)
    target = np.asarray(target, np.int64)
    rows = np.arange(len(scores))
    target_score = scores[rows, target]
    if np.isnan(target_score).any():
        raise ValueError("rank_of_target: a target has a NaN score")
    above = scores >= target_score[:, None]  # NaN scores compare False: they never outrank
    above[rows, target] = False
    if exclude_mask is not None:
        above &= ~np.asarray(exclude_mask, bool)
    return above.sum(axis=1).astype(np.int64)


def ranking_metrics(target_ranks, ks: Sequence[int] = (10, 50, 200)) -> dict[str, float]:
    """HR@K, NDCG@K (one relevant item: 1/log2(rank+2) inside the top K) and MRR."""
    ranks = np.asarray(target_ranks, np.float64).reshape(-1)
    metrics = {}
    for k in ks:
        hit = ranks < k
        metrics[f"hr@{k}"] = float(hit.mean())
        metrics[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    metrics["mrr"] = float((1.0 / (ranks + 1.0)).mean())
    return metrics

"""Tests for vista_jax.metrics against brute force and hand-computed values."""

import math

import numpy as np
import pytest

from vista_jax import metrics


def _pairwise_auc(labels, scores) -> float:
    """Brute force: P(score_pos > score_neg) + 1/2 P(tie) over all pairs."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 12, 300).astype(np.float32)  # few distinct values: many ties
    assert metrics.auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores))


def test_auc_known_values_and_mask():
    assert metrics.auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert metrics.auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert metrics.auc([0, 1, 1], [0.2, 0.1, 0.3]) == 0.5
    # The masked-out pair would make it perfect.
    mask = [True, True, True, False, False]
    assert metrics.auc([1, 0, 1, 0, 1], [0.1, 0.5, 0.9, 0.0, 1.0], mask) == 0.5
    assert math.isnan(metrics.auc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_log_loss_and_ne_of_base_rate_predictor():
    labels = np.array([1, 0, 0, 0, 1, 0, 0, 0])
    assert metrics.log_loss(labels, np.full(8, 0.25)) == pytest.approx(
        -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    )
    assert metrics.normalized_entropy(labels, np.full(8, 0.25)) == pytest.approx(1.0)
    assert metrics.normalized_entropy(labels, labels * 0.9 + 0.05) < 0.3
    assert math.isfinite(metrics.log_loss([1, 0], [0.0, 1.0]))  # clipped, not inf
    assert math.isnan(metrics.normalized_entropy([1, 1], [0.5, 0.5]))


def test_binary_metrics_from_logits():
    labels = np.array([1, 0, 0, 0, 1, 0, 0, 0, 1, 1])
    mask = np.array([True] * 8 + [False] * 2)
    base_logit = math.log(0.25 / 0.75)
    out = metrics.binary_metrics(labels, np.full(10, base_logit), mask)
    assert out["count"] == 8 and out["base_rate"] == pytest.approx(0.25)
    assert out["ne"] == pytest.approx(1.0, abs=1e-6) and out["auc"] == 0.5
    # Confident logits: log loss from logits stays exact where clipping would distort it.
    out = metrics.binary_metrics([1, 0], [40.0, -40.0])
    assert out["logloss"] == pytest.approx(math.exp(-40.0), rel=1e-6) and out["auc"] == 1.0


def test_rank_of_target_ties_and_exclusion():
    scores = np.array(
        [
            [0.0, 0.9, 0.5, 0.5, 0.1],  # target 2 (0.5): 0.9 above, tie 0.5 above -> 2
            [0.0, 0.9, 0.5, 0.5, 0.1],  # same, with the 0.9 item excluded -> 1
            [9.0, 0.1, 0.2, 0.3, 0.4],  # target 4 is best once padding column 0 is excluded
            [0.0, 0.7, 0.7, 0.7, 0.7],  # target excluded itself: its bit is ignored; ties -> 3
        ]
    )
    target = np.array([2, 2, 4, 1])
    exclude = np.zeros_like(scores, bool)
    exclude[1, 1] = True
    exclude[:, 0] = True
    exclude[3, 1] = True
    np.testing.assert_array_equal(metrics.rank_of_target(scores, target, exclude), [2, 1, 0, 3])
    np.testing.assert_array_equal(metrics.rank_of_target(scores, target), [2, 2, 1, 3])


def test_ranking_metrics_hand_computed():
    out = metrics.ranking_metrics(np.array([0, 1, 9, 10, 60]), ks=(1, 10, 50))
    assert out["hr@1"] == pytest.approx(1 / 5)
    assert out["hr@10"] == pytest.approx(3 / 5)
    assert out["hr@50"] == pytest.approx(4 / 5)
    assert out["ndcg@1"] == pytest.approx(1 / 5)
    expected_ndcg10 = (1.0 + 1 / math.log2(3) + 1 / math.log2(11)) / 5
    assert out["ndcg@10"] == pytest.approx(expected_ndcg10)
    assert out["ndcg@50"] == pytest.approx(expected_ndcg10 + 1 / math.log2(12) / 5)
    assert out["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 61) / 5)
    assert set(metrics.ranking_metrics([0])) == {
        "hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr"
    }  # fmt: skip


@pytest.mark.parametrize("seed", range(3))
def test_weighted_auc_equals_auc_of_the_repeated_candidates(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300).astype(float)
    scores = rng.integers(0, 20, 300).astype(float)  # Many ties.
    weights = rng.integers(0, 4, 300)
    auc_of = metrics.weighted_auc_fn(labels, scores)
    assert auc_of(np.ones(300)) == pytest.approx(metrics.auc(labels, scores), abs=1e-12)
    repeated = np.repeat(np.arange(300), weights)
    expected = _pairwise_auc(labels[repeated], scores[repeated])
    assert auc_of(weights) == pytest.approx(expected, abs=1e-12)


def _two_models(gap, num_users=200, per_user=20, seed=0):
    """Labels and two scorings; model a sees the label signal `gap` more strongly than b."""
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(num_users), per_user)
    labels = rng.integers(0, 2, len(user)).astype(float)
    noise = rng.normal(size=(2, len(user)))
    return labels, labels * (0.5 + gap) + noise[0], labels * 0.5 + noise[1], user


def test_paired_bootstrap_finds_a_real_gap_and_not_a_null_one():
    labels, a, b, user = _two_models(gap=0.5)
    out = metrics.paired_auc_bootstrap(labels, a, b, user, num_samples=300)
    assert out["diff"] == pytest.approx(metrics.auc(labels, a) - metrics.auc(labels, b))
    assert out["ci95"][0] > 0 and out["p_value"] < 0.01 and out["num_groups"] == 200
    # Two scorings of the same model quality: no significant gap, and the sign flips b <-> a.
    labels, a, b, user = _two_models(gap=0.0, seed=1)
    out = metrics.paired_auc_bootstrap(labels, a, b, user, num_samples=300)
    assert out["ci95"][0] < 0 < out["ci95"][1] and out["p_value"] > 0.05
    back = metrics.paired_auc_bootstrap(labels, b, a, user, num_samples=300)
    assert back["diff"] == pytest.approx(-out["diff"])


def test_many_pairs_on_one_set_of_resamples_equal_each_pair_alone():
    labels, a, b, user = _two_models(gap=0.5)
    _, c, d, _ = _two_models(gap=0.2, seed=3)
    tests = metrics.paired_auc_tests(labels, {"ab": (a, b), "cd": (c, d)}, user, num_samples=200)
    for name, (x, y) in {"ab": (a, b), "cd": (c, d)}.items():
        alone = metrics.paired_auc_bootstrap(labels, x, y, user, num_samples=200)
        assert tests[name] == pytest.approx(alone)
    shared = metrics.paired_auc_bootstraps(labels, a, {"b": b, "c": c}, user, num_samples=200)
    assert shared["b"] == pytest.approx(tests["ab"])


def test_paired_bootstrap_resamples_users_not_candidates():
    # One user's candidates share a large per-user offset in model a's scores only: the
    # candidate-level spread understates the noise; clustering by user widens the interval.
    rng = np.random.default_rng(0)
    user = np.repeat(np.arange(40), 50)
    labels = rng.integers(0, 2, len(user)).astype(float)
    a = labels + rng.normal(size=len(user)) + 3 * rng.normal(size=40)[user] * labels
    b = labels + rng.normal(size=len(user))
    by_user = metrics.paired_auc_bootstrap(labels, a, b, user, num_samples=300)
    by_candidate = metrics.paired_auc_bootstrap(labels, a, b, np.arange(len(user)), num_samples=300)
    width = lambda r: r["ci95"][1] - r["ci95"][0]  # noqa: E731
    assert width(by_user) > 1.5 * width(by_candidate)

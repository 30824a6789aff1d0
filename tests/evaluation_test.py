"""Catalog scoring for retrieval: every item with its features, history excluded, target kept."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vista_jax import evaluation, metrics

NUM_ITEMS = 10
# Even items are category 1, odd items category 2.
ITEM_CATEGORY = np.array([0] + [2 if i % 2 else 1 for i in range(1, NUM_ITEMS + 1)], np.int32)


class CategoryFirst(nnx.Module):
    """Scores category 2 above category 1, then lower ids first: 1, 3, 5, 7, 9, 2, 4, ..."""

    def __call__(self, batch):
        return batch["cand_category"] * 100.0 - batch["cand_item"].astype(jnp.float32), {}


def _data():
    spec = types.SimpleNamespace(task="retrieval")
    return types.SimpleNamespace(spec=spec, num_items=NUM_ITEMS, item_category=ITEM_CATEGORY)


def _batch(targets, seen):
    return {
        "user": np.arange(len(targets), dtype=np.int32),
        "target_item": np.array(targets, np.int32),
        "seen_item": np.array(seen, np.int32),
    }


def test_history_is_excluded_but_the_target_is_not():
    # Request 0: target 5 is in its own history (re-included); 1 and 3 are excluded -> rank 0.
    # Request 1: target 2; 9 excluded -> 1, 3, 5, 7 outrank it -> rank 4.
    batch = _batch([5, 2], [[1, 3, 5, 0], [9, 0, 0, 0]])
    got = evaluation.score_retrieval(_data(), CategoryFirst(), [batch], lambda b: {})
    assert got["hr@10"] == 1.0
    assert got["mrr"] == pytest.approx((1.0 + 1.0 / 5) / 2)
    assert got["ndcg@10"] == pytest.approx((1.0 + 1.0 / np.log2(6)) / 2)


def test_catalog_candidates_carry_their_categories():
    seen = {}

    class Recorder(nnx.Module):
        def __call__(self, batch):
            keys = ("cand_item", "cand_category")
            record = lambda *v: seen.update(zip(keys, v, strict=True))  # noqa: E731
            jax.debug.callback(record, *(batch[k] for k in keys))
            return jnp.zeros(batch["cand_item"].shape), {}

    evaluation.score_retrieval(_data(), Recorder(), [_batch([1], [[0]])], lambda b: {})
    np.testing.assert_array_equal(seen["cand_item"][0], np.arange(1, NUM_ITEMS + 1))
    np.testing.assert_array_equal(seen["cand_category"][0], ITEM_CATEGORY[1:])


def test_seen_mask_excludes_history_but_the_target_is_still_ranked():
    # Catalog columns 1..5 (padding column dropped); history 2, 4; target 4 (seen before).
    mask = metrics.seen_mask(np.array([[2, 4, 0]]), 6)[:, 1:]
    np.testing.assert_array_equal(mask, [[False, True, False, True, False]])
    scores = np.array([[0.1, 0.9, 0.5, 0.3, 0.7]])  # Items 1..5.
    # Target item 4 (column 3): 2 (seen) does not count; 3 and 5 score higher.
    assert metrics.rank_of_target(scores, np.array([3]), mask)[0] == 2


def test_predictions_round_trip_and_must_share_their_candidates(tmp_path):
    label, user = np.array([1.0, 0.0, 1.0]), np.array([4, 4, 7])
    predictions = {m: evaluation.Predictions(label, logit, user, 2, 1.0)
                   for m, logit in (("a", np.array([0.5, -1.0, 2.0])),
                                    ("b", np.array([0.0, 0.1, 0.2])))}  # fmt: skip
    scored = evaluation.shared_candidates(predictions)
    evaluation.write_predictions(tmp_path / "p.npz", scored)
    back = evaluation.read_predictions(tmp_path / "p.npz")
    np.testing.assert_array_equal(back.label, label)
    np.testing.assert_array_equal(back.user, user)
    assert {m: list(x) for m, x in back.logits.items()} == {
        m: list(p.logit) for m, p in predictions.items()
    }
    shuffled = evaluation.Predictions(label, label, user[::-1], 2, 1.0)
    with pytest.raises(ValueError, match="c was not scored on the same candidates"):
        evaluation.shared_candidates(predictions | {"c": shuffled})

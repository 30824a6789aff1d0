"""Point-in-time examples: a summary never covers the request or anything after it."""

import dataclasses

import numpy as np
import pytest

from vista_jax import cache
from vista_jax.data import examples as ex
from vista_jax.errors import DataError


def _record(n=50, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "user": np.int64(3),
        "item": rng.integers(1, 20, n).astype(np.int32),
        "action": np.ones(n, np.int32),
        "time": np.cumsum(rng.integers(1, 100, n)).astype(np.int64),
        "category": rng.integers(1, 4, n).astype(np.int32),
    }


SPEC = ex.ExampleSpec(
    task="retrieval",
    history_window=8,
    num_recent=4,
    snapshot_every=5,
    num_negatives=6,
    num_items=19,
)
ITEM_CATEGORY = np.arange(20) % 4


def test_retrieval_summary_covers_only_events_before_the_request():
    record = _record()
    for t in range(1, 50):
        e = ex.retrieval_example(record, SPEC, t, 0, ITEM_CATEGORY, np.random.default_rng(t))
        s = int(e["snapshot"])
        assert s <= t
        n_hist = int(e["hist_len"])
        np.testing.assert_array_equal(e["hist_item"][:n_hist], record["item"][s - n_hist : s])
        n_rec = int(e["recent_len"])
        np.testing.assert_array_equal(e["recent_item"][:n_rec], record["item"][t - n_rec : t])
        assert e["cand_item"][0] == record["item"][t] and e["cand_label"][0] == 1
        # The recent events reach back to the snapshot: nothing between is lost.
        assert t - n_rec <= s or n_rec == SPEC.num_recent


def test_snapshot_rows_are_newest_at_or_before_request():
    positions = ex.snapshot_positions(50, SPEC)
    assert positions[0] == 0 and positions[-1] == 48
    for t in range(50):
        idx = ex.snapshot_for(t, positions)
        assert positions[idx] <= t and (idx + 1 == len(positions) or positions[idx + 1] > t)


def test_leave_one_out_splits():
    lengths = np.array([5, 3, 2])  # A user with < 3 events cannot be split: left out.
    train = ex.retrieval_requests(lengths, "train")
    assert train.tolist() == [[0, 1], [0, 2]]
    assert ex.retrieval_requests(lengths, "valid").tolist() == [[0, 3], [1, 1]]
    assert ex.retrieval_requests(lengths, "test").tolist() == [[0, 4], [1, 2]]


def test_short_users_are_left_out_of_every_split_and_pairs_name_their_user():
    lengths = np.array([5, 2, 6])  # User 1 has too few events for leave-one-out.
    train = ex.retrieval_requests(lengths, "train")
    assert train.tolist() == [[0, 1], [0, 2], [2, 1], [2, 2], [2, 3]]
    valid, test = ex.retrieval_requests(lengths, "valid"), ex.retrieval_requests(lengths, "test")
    # (user, t) pairs, not one row per user: row 1 is user 2, and user 1 appears nowhere.
    assert valid.tolist() == [[0, 3], [2, 4]] and test.tolist() == [[0, 4], [2, 5]]
    for pairs in (train, valid, test):
        assert 1 not in pairs[:, 0] and pairs.dtype == np.int64


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_no_user_long_enough_is_a_data_error(split):
    with pytest.raises(DataError, match=r"3 user\(s\) but none with at least 3 events") as error:
        ex.retrieval_requests(np.array([2, 1, 2]), split)
    assert "Fix:" in str(error.value)
    with pytest.raises(DataError, match="0 user"):
        ex.retrieval_requests(np.array([], np.int64), split)


def test_no_training_request_is_a_data_error():
    lengths = np.array([3, 3, 1])  # Valid and test exist, but t in [1, n-3] is empty.
    assert ex.retrieval_requests(lengths, "test").tolist() == [[0, 2], [1, 2]]
    with pytest.raises(DataError, match=r"no training request.*>= 4 events"):
        ex.retrieval_requests(lengths, "train")


def test_ranking_example_samples_candidates_only_when_training():
    record = _record() | {
        "cand_item": np.arange(1, 17, dtype=np.int32),
        "cand_label": np.ones(16, np.float32),
        "cand_prob": np.full(16, 0.5, np.float32),
    }
    spec = ex.ExampleSpec(task="ranking", history_window=100, num_recent=4, train_candidates=5)
    full = ex.ranking_example(record, spec, 0, ITEM_CATEGORY)
    assert len(full["cand_item"]) == 16 and full["snapshot"] == 46 and full["hist_len"] == 46
    sampled = ex.ranking_example(record, spec, 0, ITEM_CATEGORY, np.random.default_rng(0))
    assert len(set(sampled["cand_item"].tolist())) == 5


def test_window_gaps_equal_the_users_gaps_sliced():
    record = _record(n=40)
    full = ex.user_gaps(record, 8)  # Few buckets: clipping is exercised too.
    for start, end in [(0, 0), (0, 5), (1, 9), (17, 40), (39, 40), (40, 40)]:
        np.testing.assert_array_equal(ex.window_gaps(record, start, end, 8), full[start:end])


def test_recent_arrays_need_only_the_last_r_plus_one_events():
    record = _record(n=30)
    for t in (0, 2, 4, 5, 30):
        tail = {k: v[max(0, t - SPEC.num_recent - 1) : t] for k, v in record.items() if k != "user"}
        full, short = (
            ex.recent_arrays(record, t, SPEC),
            ex.recent_arrays(tail, len(tail["item"]), SPEC),
        )
        for key, value in full.items():
            np.testing.assert_array_equal(short[key], value, err_msg=key)


def test_examples_without_history_are_the_same_examples_minus_the_window():
    record = _record() | {
        "cand_item": np.arange(1, 17, dtype=np.int32),
        "cand_label": np.ones(16, np.float32),
    }
    ranking = ex.ExampleSpec(task="ranking", history_window=20, num_recent=4, train_candidates=5)

    events = ex.dataclasses.replace(ranking, requests="every_event", snapshot_every=8)
    labelled = record | {"label": np.ones(len(record["item"]), np.float32)}

    def examples(with_history):  # Same seeds: the same sampled candidates and negatives.
        rng = np.random.default_rng
        return [
            ex.ranking_example(record, ranking, 0, ITEM_CATEGORY, rng(1), with_history),
            ex.retrieval_example(record, SPEC, 7, 3, ITEM_CATEGORY, rng(2), with_history),
            ex.event_example(labelled, events, 29, 5, ITEM_CATEGORY, with_history),
        ]

    for full, cache_fed in zip(examples(True), examples(False), strict=True):
        expected = {k: v for k, v in full.items() if not k.startswith("hist_")}
        assert cache_fed.keys() == expected.keys() and len(expected) < len(full)
        for key, value in expected.items():
            np.testing.assert_array_equal(cache_fed[key], value, err_msg=key)
    # Only evaluation requests carry the protocol's history window (for exclusion).
    assert "seen_item" in ex.retrieval_example(record, SPEC, 7, 3, ITEM_CATEGORY, None, False)
    assert "seen_item" not in examples(True)[1]


@pytest.mark.parametrize("lag", [0, 3, 17, 500])
def test_a_stale_summary_lags_the_recent_window_by_summary_lag_events(lag):
    record = _record() | {"cand_item": np.array([1, 2]), "cand_label": np.array([0.0, 1.0])}
    spec = ex.ExampleSpec(task="ranking", history_window=8, num_recent=4, summary_lag=lag)
    e = ex.ranking_example(record, spec, 0, ITEM_CATEGORY)
    s = max(0, 50 - 4 - lag)
    assert int(e["snapshot"]) == s and ex.snapshot_positions(50, spec).tolist() == [s]
    n_hist = int(e["hist_len"])
    assert n_hist == min(8, s)
    np.testing.assert_array_equal(e["hist_item"][:n_hist], record["item"][s - n_hist : s])
    np.testing.assert_array_equal(e["recent_item"], record["item"][46:])  # Never stale.
    # Retrieval (and every-event) requests join the newest snapshot at or before t - lag.
    stale = dataclasses.replace(SPEC, summary_lag=lag)
    positions = ex.snapshot_positions(50, stale)
    for t in range(1, 50):
        got = int(ex.retrieval_example(record, stale, t, 0, ITEM_CATEGORY, None)["snapshot"])
        older = positions[positions <= t - lag]
        assert got == (older[-1] if len(older) else positions[0])


def test_every_spec_field_is_in_the_cache_name():
    """A cache read under another spec (e.g. a summary lag) must not pass as this one."""
    spec = ex.ExampleSpec(task="ranking", history_window=8, num_recent=4)

    def named(s):
        return cache.cache_hash("s", type("Data", (), {"fingerprint": "f", "spec": s}))

    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        other = {str: lambda v: v + "x", bool: lambda v: not v, int: lambda v: v + 1}
        other = other[type(value)](value)
        assert named(dataclasses.replace(spec, **{field.name: other})) != named(spec), field.name

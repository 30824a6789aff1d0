"""Tests for vista_jax.data.tfds_builders: round trips, reuse, fingerprints, atomic writes."""

import numpy as np
import pytest
from data_env import real_data_dir

from vista_jax.data import eventlog as el
from vista_jax.data import loaders
from vista_jax.data import tfds_builders as tb
from vista_jax.errors import DataError


def _small_log() -> el.EventLog:
    return el.from_columns(
        user=[7, 3, 7, 3, 9, 7],
        item=[1, 2, 2, 3, 1, 4],
        time=[10, 5, 10, 6, 1, 3],
        rating=[5, 4, 3, 2, 1, 4],
        category=["a", "b", "b", "", "a", "c"],
    )


def _assert_matches_log(source, log):
    assert len(source) == log.num_users
    for user in range(log.num_users):
        record, events = source[user], log.user_slice(user)
        assert record["user"] == user and record["user"].dtype == np.int64
        for key in ("item", "action", "time", "category"):
            expected = getattr(log, key)[events]
            np.testing.assert_array_equal(record[key], expected)
            assert record[key].dtype == expected.dtype, key


def test_event_log_round_trip(tmp_path):
    log = _small_log()
    path = tb.build_sequence_dataset(
        "toy_seq",
        lambda: tb.event_log_records(log),
        tmp_path,
        fingerprint=tb.event_log_fingerprint(log),
        metadata={"num_items": log.num_items, "category_names": list(log.category_names)},
    )
    assert path.parent.name == tb.event_log_fingerprint(log) and path.name == tb.DEFAULT_VERSION
    source = tb.read_sequence_dataset(path)
    _assert_matches_log(source, log)
    assert source.metadata == {"num_items": 4, "category_names": ["<unknown>", "a", "b", "c"]}
    assert tb.read_sequence_metadata(path)["num_items"] == 4
    assert [r["user"] for r in source.__getitems__([2, 0])] == [2, 0]


def _synthetic_records():
    rng = np.random.default_rng(0)
    for user, (n, c) in enumerate([(3, 2), (1, 0), (5, 4)]):
        yield {
            "user": user,
            "item": rng.integers(1, 50, n),
            "action": rng.integers(1, 3, n),
            "time": np.cumsum(rng.integers(0, 10**6, n)) + 2**40,  # Needs int64.
            "category": rng.integers(0, 5, n),
            "cand_item": rng.integers(1, 50, c),
            "cand_label": rng.integers(0, 2, c).astype(np.float32),
            "cand_prob": rng.random(c).astype(np.float32),
        }


def test_synthetic_round_trip_with_candidates(tmp_path):
    path = tb.build_sequence_dataset(
        "synthetic_seq", _synthetic_records, tmp_path, fingerprint="seed0", with_candidates=True
    )
    source = tb.read_sequence_dataset(path)
    assert len(source) == 3
    for user, expected in enumerate(_synthetic_records()):
        record = source[user]
        assert sorted(record) == sorted(expected)
        for key, dtype in {**tb.EVENT_FIELDS, **tb.CANDIDATE_FIELDS}.items():
            np.testing.assert_array_equal(record[key], expected[key].astype(dtype))
            assert record[key].dtype == dtype, key


def test_same_fingerprint_reuses_and_other_fingerprint_gets_its_own_dir(tmp_path):
    log = _small_log()
    fingerprint = tb.event_log_fingerprint(log)
    first = tb.build_sequence_dataset(
        "toy_seq", lambda: tb.event_log_records(log), tmp_path, fingerprint=fingerprint
    )

    def must_not_run():
        raise AssertionError("an existing dataset must be reused, not rebuilt")

    again = tb.build_sequence_dataset("toy_seq", must_not_run, tmp_path, fingerprint=fingerprint)
    assert again == first

    other_log = el.from_columns(user=[1], item=[1], time=[1])
    other_fingerprint = tb.event_log_fingerprint(other_log)
    assert other_fingerprint != fingerprint
    assert tb.event_log_fingerprint(log, max_len=50) != fingerprint  # Settings count too.
    other = tb.build_sequence_dataset(
        "toy_seq", lambda: tb.event_log_records(other_log), tmp_path, fingerprint=other_fingerprint
    )
    assert other != first
    _assert_matches_log(tb.read_sequence_dataset(first), log)
    _assert_matches_log(tb.read_sequence_dataset(other), other_log)


def test_interrupted_build_leaves_nothing_that_reads_as_complete(tmp_path):
    log = _small_log()

    def failing_records():
        records = tb.event_log_records(log)
        yield next(records)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        tb.build_sequence_dataset("toy_seq", failing_records, tmp_path, fingerprint="fp")
    config_dir = tmp_path / "toy_seq" / "fp"
    assert not (config_dir / tb.DEFAULT_VERSION).exists()
    assert not any("incomplete" in p.name for p in config_dir.iterdir())
    with pytest.raises(tb.SequenceDatasetError, match="no complete sequence dataset"):
        tb.read_sequence_dataset(config_dir / tb.DEFAULT_VERSION)
    # A later build with the same fingerprint writes it from scratch.
    path = tb.build_sequence_dataset(
        "toy_seq", lambda: tb.event_log_records(log), tmp_path, fingerprint="fp"
    )
    _assert_matches_log(tb.read_sequence_dataset(path), log)


@pytest.mark.parametrize(
    "record, message",
    [
        (dict(user=0, item=[1], action=[1], time=[1]), "keys"),
        (dict(user=0, item=[1, 2], action=[1], time=[1], category=[0]), "one length"),
        (dict(user=0, item=[[1]], action=[[1]], time=[[1]], category=[[0]]), "1-D"),
    ],
)
def test_bad_records_are_rejected(tmp_path, record, message):
    with pytest.raises(tb.SequenceDatasetError, match=message):
        tb.build_sequence_dataset("bad_seq", lambda: [record], tmp_path, fingerprint="fp")


def test_sequence_dataset_error_is_a_data_error():
    # run.py prints a UserError as one line and exits 2; a bad dataset request is one.
    assert issubclass(tb.SequenceDatasetError, DataError)
    assert issubclass(tb.SequenceDatasetError, ValueError)


def test_bad_names_are_rejected(tmp_path):
    with pytest.raises(tb.SequenceDatasetError, match="snake_case"):
        tb.build_sequence_dataset("Bad-Name", list, tmp_path, fingerprint="fp")
    with pytest.raises(tb.SequenceDatasetError, match="fingerprint"):
        tb.build_sequence_dataset("ok_name", list, tmp_path, fingerprint="a/b")


def test_real_movielens_100k_round_trip(tmp_path):
    log = loaders.load_event_log("recbole_atomic", real_data_dir("ml-100k"))
    path = tb.build_sequence_dataset(
        "ml100k_seq",
        lambda: tb.event_log_records(log),
        tmp_path,
        fingerprint=tb.event_log_fingerprint(log),
    )
    _assert_matches_log(tb.read_sequence_dataset(path), log)

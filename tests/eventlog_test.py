"""Tests for vista_jax.data.eventlog, .loaders and .features: validation, dense ids, stable sort,
loaders, options, errors. The catalogue of bad input files is tests/bad_inputs_test.py."""

import datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_env import real_data_dir

from vista_jax.data import eventlog as el
from vista_jax.data import features, loaders
from vista_jax.data.eventlog import EventLogError, EventLogOptions
from vista_jax.errors import ConfigError, DataError

# --- from_columns ----------------------------------------------------------------------------


def test_dense_ids_and_stable_sort_keep_file_order_on_ties():
    log = el.from_columns(
        user=[10, 2, 10, 2, 10],
        item=["b", "a", "c", "a", "b"],
        time=[5, 3, 5, 1, 4],
    )
    # Users ranked numerically (2 -> 0, 10 -> 1); items lexicographically (a, b, c -> 1, 2, 3).
    np.testing.assert_array_equal(log.raw_user_ids, [2, 10])
    np.testing.assert_array_equal(log.raw_item_ids, [el.PAD_ITEM, "a", "b", "c"])
    # User 0: rows 3 (t=1), 1 (t=3). User 1: row 4 (t=4), then rows 0, 2 tie at t=5 in file order.
    np.testing.assert_array_equal(log.user, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(log.time, [1, 3, 4, 5, 5])
    np.testing.assert_array_equal(log.item, [1, 1, 2, 2, 3])
    assert (log.user.dtype, log.item.dtype, log.time.dtype) == (np.int32, np.int32, np.int64)
    assert (log.num_users, log.num_items, log.num_events, log.num_categories) == (2, 3, 5, 0)
    np.testing.assert_array_equal(log.user_offsets, [0, 2, 5])
    assert log.user_slice(1) == slice(2, 5)


def test_ties_keep_file_order_with_many_ties():
    rng = np.random.default_rng(0)
    user = rng.integers(0, 5, 2000)
    time = rng.integers(0, 3, 2000)  # Mostly ties.
    log = el.from_columns(user, item=np.arange(2000) + 1, time=time)
    # Raw item = file row + 1, so within (user, time) items must stay increasing.
    expected = sorted(range(2000), key=lambda row: (user[row], time[row]))
    np.testing.assert_array_equal(log.raw_item_ids[log.item], np.array(expected) + 1)


def test_numeric_string_ids_sort_numerically_and_padded_ones_lexicographically():
    log = el.from_columns(user=["10", "9", "100"], item=["007", "7", "10"], time=[1, 2, 3])
    np.testing.assert_array_equal(log.raw_user_ids, [9, 10, 100])
    np.testing.assert_array_equal(log.raw_item_ids[1:], ["007", "10", "7"])


def test_actions_from_ratings_labels_or_neither():
    rating_log = el.from_columns([1, 1, 1, 1], [1, 2, 3, 4], [1, 2, 3, 4], rating=[1, 4.5, 5, 3])
    np.testing.assert_array_equal(rating_log.action, [1, 5, 5, 3])
    assert rating_log.rating.dtype == np.float32 and rating_log.label is None
    label_log = el.from_columns([1, 1], [1, 2], [1, 2], label=[0, 1])
    np.testing.assert_array_equal(label_log.action, [1, 2])
    assert label_log.label.dtype == np.float32
    np.testing.assert_array_equal(el.from_columns([1], [1], [1]).action, [1])


def test_categories_are_dense_with_unknown_zero():
    log = el.from_columns(
        user=[1, 1, 1, 2], item=[5, 6, 5, 7], time=[1, 2, 3, 1], category=["b", "a", "b", ""]
    )
    assert log.category_names == (el.UNKNOWN_CATEGORY, "a", "b")
    np.testing.assert_array_equal(log.category, [2, 1, 2, 0])
    np.testing.assert_array_equal(log.item_category, [0, 2, 1, 0])


@pytest.mark.parametrize(
    "columns, message",
    [
        (dict(user=[], item=[], time=[]), "no events"),
        (dict(user=[1, 2], item=[1], time=[1, 2]), "differ in length"),
        (dict(user=[1, 2], item=[1, 2], time=[1, 2.5]), "row 2: timestamp 2.5"),
        (dict(user=[1, 2], item=[1, 2], time=[1, np.nan]), "row 2: timestamp nan"),
        (dict(user=[1, 2], item=[1, 2], time=[1, "x"]), "row 2: timestamp 'x'"),
        (dict(user=[1, 2], item=[1, 2], time=[1, 2], rating=[1, np.inf]), "row 2: rating inf"),
        (dict(user=[1, 2], item=[1, 2], time=[1, 2], label=[1, 2]), "row 2: label 2.0"),
        (dict(user=[1], item=[1], time=[1], label=[1], rating=[1]), "both rating and label"),
        (dict(user=[1, None], item=[1, 2], time=[1, 2]), "row 2: empty user"),
        (dict(user=[1, 1], item=[3, 3], time=[1, 2], category=["a", "b"]), "row 2: item 3"),
        (dict(user=[1, 2], item=[1, 2], time=[1, -2]), "row 2: timestamp -2 is negative"),
        (dict(user=[1], item=[1], time=[1_600_000_000_000]), "looks like milliseconds"),
        (dict(user=[1, 2], item=[1, 2], time=[1, 2], rating=[1, 9]), "row 2: rating 9 is outside"),
        (dict(user=[1, 2], item=[1, 2], time=[1, 2], rating=[True, False]), "holds booleans"),
        (dict(user=[1, 2], item=["item_2", "2"], time=[1, 2]), "'item_2' (row 1) and '2' (row 2)"),
        (dict(user=[1, 1], item=[1, 1], time=[1, 1], label=[1, 1]), "row 2, a copy of row 1"),
    ],
)
def test_from_columns_rejects_bad_input(columns, message):
    with pytest.raises(EventLogError, match="<arrays>") as error:
        el.from_columns(**columns, options=EventLogOptions(duplicates="error"))
    assert message in str(error.value) and "Fix: " in str(error.value)


def test_event_log_error_is_a_data_error():
    assert issubclass(EventLogError, DataError) and issubclass(EventLogError, ValueError)


def test_time_unit_ms_converts_to_seconds_and_sorts_at_full_resolution():
    ms = EventLogOptions(time_unit="ms")
    log = el.from_columns(
        [1, 1, 1], [1, 2, 3], [1_600_000_000_900, 1_600_000_000_100, 5], options=ms
    )
    np.testing.assert_array_equal(log.time, [0, 1_600_000_000, 1_600_000_000])
    np.testing.assert_array_equal(log.raw_item_ids[log.item], [3, 2, 1])  # 100 ms before 900 ms.


def test_rating_scale_maps_linearly_onto_actions():
    default = el.from_columns(
        [1] * 5, [1, 2, 3, 4, 5], [1, 2, 3, 4, 5], rating=[1, 1.5, 2.4, 4.5, 5]
    )
    np.testing.assert_array_equal(default.action, [1, 2, 2, 5, 5])  # Half up, as before.
    half_stars = EventLogOptions(rating_scale=(0.5, 5))
    log = el.from_columns([1] * 3, [1, 2, 3], [1, 2, 3], rating=[0.5, 2.75, 5], options=half_stars)
    np.testing.assert_array_equal(log.action, [1, 3, 5])
    np.testing.assert_array_equal(log.rating, [0.5, 2.75, 5])


def test_duplicates_are_dropped_and_reported_kept_or_refused(capsys):
    columns = dict(user=[1, 1, 1, 2, 1], item=[5, 6, 5, 5, 5], time=[3, 3, 3, 3, 3])
    dropped = el.from_columns(**columns, rating=[4, 4, 4, 4, 2])  # Row 5 differs in rating.
    assert dropped.num_events == 4
    np.testing.assert_array_equal(dropped.raw_item_ids[dropped.item], [5, 6, 5, 5])
    err = capsys.readouterr().err
    assert "dropped 1 exact duplicate event(s)" in err and "row 3, a copy of row 1" in err
    keep = el.from_columns(**columns, options=EventLogOptions(duplicates="keep"))
    assert keep.num_events == 5 and capsys.readouterr().err == ""
    with pytest.raises(EventLogError, match="2 exact duplicate event"):
        el.from_columns(**columns, options=EventLogOptions(duplicates="error"))


def test_mixed_id_forms_are_accepted_on_request():
    options = EventLogOptions(allow_mixed_ids=True)
    log = el.from_columns([1, 2], ["B00X", "0439"], [1, 2], options=options)
    np.testing.assert_array_equal(log.raw_item_ids[1:], ["0439", "B00X"])


@pytest.mark.parametrize(
    "options, key",
    [
        (dict(time_unit="h"), "data.time_unit"),
        (dict(duplicates="first"), "data.duplicates"),
        (dict(rating_scale=(5, 1)), "data.rating_scale"),
        (dict(rating_scale=(1, 2, 3)), "data.rating_scale"),
    ],
)
def test_bad_options_are_config_errors(options, key):
    with pytest.raises(ConfigError, match=key):
        EventLogOptions(**options)


# --- gap buckets -----------------------------------------------------------------------------


def test_gap_buckets_known_values():
    time = np.array([100, 100, 101, 104, 1100, 5], np.int64)
    offsets = np.array([0, 5, 6])
    # Gaps 0, 1, 3, 996 -> 1 + floor(log2(1 + gap)) = 1, 2, 3, 10; first events -> 0.
    np.testing.assert_array_equal(features.gap_buckets(time, offsets), [0, 1, 2, 3, 10, 0])
    np.testing.assert_array_equal(
        features.gap_buckets(time, offsets, num_buckets=4), [0, 1, 2, 3, 3, 0]
    )


def test_gap_buckets_match_scalar_reference():
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 20, 50)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    time = np.concatenate([np.sort(rng.integers(0, 10**9, c)) for c in counts])
    expected = []
    for u in range(len(counts)):
        times = time[offsets[u] : offsets[u + 1]].tolist()
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        expected += [0] + [min(1 + (1 + g).bit_length() - 1, 15) for g in gaps]
    np.testing.assert_array_equal(features.gap_buckets(time, offsets), expected)


# --- loaders ---------------------------------------------------------------------------------


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def test_load_movielens_1m(tmp_path):
    _write(tmp_path / "ratings.dat", "2::20::5::300\n1::10::3::200\n1::30::4::100\n1::20::1::200\n")
    movies = "10::Amélie (2001)::Comedy|Romance\n20::Alien: Resurrection::Sci-Fi\n"
    _write(tmp_path / "movies.dat", movies, encoding="latin-1")
    log = loaders.load_movielens_1m(tmp_path)
    np.testing.assert_array_equal(log.raw_user_ids, [1, 2])
    np.testing.assert_array_equal(log.raw_item_ids, [el.PAD_ITEM_NUMERIC, 10, 20, 30])
    np.testing.assert_array_equal(log.raw_item_ids[log.item], [30, 10, 20, 20])  # Tie: file order.
    np.testing.assert_array_equal(log.action, [4, 3, 1, 5])
    assert log.category_names == (el.UNKNOWN_CATEGORY, "Comedy", "Sci-Fi")
    np.testing.assert_array_equal(log.category, [0, 1, 2, 2])  # Movie 30 is not in movies.dat.


def test_load_movielens_1m_without_movies(tmp_path):
    _write(tmp_path / "ratings.dat", "1::10::3::200\n")
    log = loaders.load_event_log("movielens_1m", tmp_path)
    assert log.num_categories == 0 and log.category.tolist() == [0]


RECBOLE_INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "u2\t10\t3\t881250949\n"
    "u1\t9\t5\t881250950\n"
    "u1\t10\t4\t881250949.0\n"
)
RECBOLE_ITEM = (
    "item_id:token\tmovie_title:token_seq\tclass:token_seq\n9\tA Film\tDrama War\n10\tB\t\n"
)


def test_load_recbole_atomic(tmp_path):
    _write(tmp_path / "toy.inter", RECBOLE_INTER)
    _write(tmp_path / "toy.item", RECBOLE_ITEM)
    log = loaders.load_event_log("recbole_atomic", tmp_path / "toy.inter")
    np.testing.assert_array_equal(log.raw_user_ids, ["u1", "u2"])
    np.testing.assert_array_equal(log.raw_item_ids[1:], [9, 10])  # Numeric tokens: by value.
    np.testing.assert_array_equal(log.raw_item_ids[log.item], [10, 9, 10])
    np.testing.assert_array_equal(log.time, [881250949, 881250950, 881250949])
    np.testing.assert_array_equal(log.action, [4, 5, 3])
    assert log.category_names == (el.UNKNOWN_CATEGORY, "Drama")
    np.testing.assert_array_equal(log.category, [0, 1, 0])


def test_load_csv_table_with_labels_and_categories(tmp_path):
    text = (
        "user,item,timestamp,label,category,extra\n"
        "a,x,2,1,News|Sport,?\n"
        "a,y,1,0,,?\n"
        "b,x,1,0,News,?\n"
    )
    log = loaders.load_table(_write(tmp_path / "events.csv", text))
    np.testing.assert_array_equal(log.raw_item_ids[log.item], ["y", "x", "x"])
    np.testing.assert_array_equal(log.action, [1, 2, 1])
    np.testing.assert_array_equal(log.label, [0, 1, 0])
    assert log.category_names == (el.UNKNOWN_CATEGORY, "News")
    # Item y has no category; "News|Sport" is read as its first part.
    np.testing.assert_array_equal(log.category, [0, 1, 1])


def test_load_parquet_table(tmp_path):
    table = pa.table(
        {"user": [3, 1, 3], "item": [7, 7, 8], "timestamp": [5, 6, 4], "rating": [1.0, 2.0, 3.0]}
    )
    pq.write_table(table, tmp_path / "events.parquet")
    log = loaders.load_event_log("table", tmp_path / "events.parquet")
    np.testing.assert_array_equal(log.raw_user_ids[log.user], [1, 3, 3])
    np.testing.assert_array_equal(log.time, [6, 4, 5])
    np.testing.assert_array_equal(log.action, [2, 3, 1])


# --- malformed files -------------------------------------------------------------------------

MALFORMED = [
    ("ratings.dat", "1::10::3::200\n1::11::3\n", "ratings.dat line 2: expected 4 fields"),
    ("ratings.dat", "1::10::3::200\n\n1::11::3::20x\n", "ratings.dat line 3: timestamp '20x'"),
    ("ratings.dat", "1::10::3::200\n1::::3::201\n", "ratings.dat line 2: empty item field"),
    ("ratings.dat", "", "ratings.dat is empty"),
    ("toy.inter", RECBOLE_INTER + "u3\t1\t2\tsoon\n", "toy.inter line 5: timestamp 'soon'"),
    ("toy.inter", RECBOLE_INTER + "u3\t1\t2\t1.5\n", "toy.inter line 5: timestamp 1.5"),
    (
        "toy.inter",
        "user_id:token\titem_id:token\n1\t2\n",
        "line 1: missing column(s) ['timestamp']",
    ),
    ("toy.inter", "", "toy.inter is empty"),
    ("e.csv", "user,item,timestamp\n1,2,3\n1,2\n", "e.csv line 3: expected 3 fields"),
    ("e.csv", "user,item,timestamp\n1,2,3\n1,2,noon\n", "e.csv line 3: timestamp 'noon'"),
    ("e.csv", "user,item,timestamp,label\n1,2,3,1\n\n1,2,4,7\n", "e.csv line 4: label 7.0"),
    ("e.csv", "user,item,timestamp\n1,,3\n", "e.csv line 2: empty item field"),
    ("e.csv", "user,time,item\n1,2,3\n", "missing column(s) ['timestamp']; found ['user', 'time'"),
    ("e.csv", "", "e.csv is empty"),
    ("e.csv", "user,item,timestamp\n", "has a header but no events"),
]


@pytest.mark.parametrize("filename, text, message", MALFORMED)
def test_malformed_files_name_file_and_line(tmp_path, filename, text, message):
    path = _write(tmp_path / filename, text)
    kind = {".dat": "movielens_1m", ".inter": "recbole_atomic", ".csv": "table"}[path.suffix]
    with pytest.raises(EventLogError) as error:
        loaders.load_event_log(kind, path if kind != "movielens_1m" else tmp_path)
    assert message in str(error.value)


def test_csv_byte_order_mark_is_accepted(tmp_path):
    path = _write(tmp_path / "e.csv", "\ufeffuser,item,timestamp\nu1,x,2\nu1,y,1\n")
    log = loaders.load_table(path)
    np.testing.assert_array_equal(log.raw_user_ids, ["u1"])
    np.testing.assert_array_equal(log.raw_item_ids[log.item], ["y", "x"])


def _parquet(path, **columns):
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_parquet_timestamp_columns_become_seconds(tmp_path, unit):
    per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[unit]
    raw = [1_600_000_001 * per_second + per_second // 2, 1_600_000_001 * per_second]
    stamps = pa.array(raw, pa.timestamp(unit, tz="UTC" if unit == "ms" else None))
    path = _parquet(tmp_path / "e.parquet", user=[1, 1], item=[1, 2], timestamp=stamps)
    log = loaders.load_table(path)
    np.testing.assert_array_equal(log.time, [1_600_000_001] * 2)
    # Sorted at full resolution: the earlier sub-second event first.
    expected = [2, 1] if unit != "s" else [1, 2]
    np.testing.assert_array_equal(log.raw_item_ids[log.item], expected)


def test_parquet_dates_dictionary_strings_bool_labels_and_numeric_strings(tmp_path):
    dates = pa.array([datetime.date(2020, 1, 2), datetime.date(2020, 1, 1)], pa.date32())
    users = pa.array(["a", "b"]).dictionary_encode()  # E.g. a pandas categorical.
    path = _parquet(tmp_path / "d.parquet", user=users, item=[1, 2], timestamp=dates,
                    label=[True, False])  # fmt: skip
    log = loaders.load_table(path)
    np.testing.assert_array_equal(log.raw_user_ids, ["a", "b"])
    np.testing.assert_array_equal(log.time, [1577923200, 1577836800])
    np.testing.assert_array_equal(log.label, [1, 0])
    path = _parquet(tmp_path / "s.parquet", user=[1], item=[1], timestamp=["881250949"])
    np.testing.assert_array_equal(loaders.load_table(path).time, [881250949])


def test_load_event_log_takes_options(tmp_path):
    path = _write(tmp_path / "e.csv", "user,item,timestamp\n1,2,1600000000000\n")
    with pytest.raises(EventLogError, match="time_unit=ms"):
        loaders.load_event_log("table", path)
    for options in (EventLogOptions(time_unit="ms"), None):
        if options is None:
            path = _write(tmp_path / "e.csv", "user,item,timestamp\n1,2,1600000000\n")
        assert loaders.load_event_log("table", path, options).time.tolist() == [1_600_000_000]
    assert set(loaders.LOADERS) == {"movielens_1m", "recbole_atomic", "table"}


def test_missing_files_and_unknown_kinds_are_explained(tmp_path):
    with pytest.raises(EventLogError, match="ratings.dat not found"):
        loaders.load_movielens_1m(tmp_path)
    with pytest.raises(EventLogError, match="unknown table suffix '.json'"):
        loaders.load_table(_write(tmp_path / "e.json", "{}"))
    with pytest.raises(EventLogError, match="unknown event log kind 'avro'"):
        loaders.load_event_log("avro", tmp_path)
    pq.write_table(pa.table({"user": [1], "item": [2]}), tmp_path / "e.parquet")
    with pytest.raises(EventLogError, match=r"missing column\(s\) \['timestamp'\]"):
        loaders.load_table(tmp_path / "e.parquet")


# --- real data -------------------------------------------------------------------------------


def _check_sorted(log):
    assert np.all(np.diff(log.user) >= 0)
    same_user = log.user[1:] == log.user[:-1]
    assert np.all(np.diff(log.time)[same_user] >= 0)
    assert log.item.min() == 1 and log.item.max() == log.num_items


def test_real_movielens_1m():
    log = loaders.load_movielens_1m(real_data_dir("ml-1m"))
    assert (log.num_events, log.num_users, log.num_items) == (1_000_209, 6_040, 3_706)
    assert log.num_categories == 18 and np.all(log.category > 0)
    assert np.bincount(log.action).tolist() == [0, 56_174, 107_557, 261_197, 348_971, 226_310]
    _check_sorted(log)


def test_real_movielens_100k():
    log = loaders.load_event_log("recbole_atomic", real_data_dir("ml-100k"))
    assert (log.num_events, log.num_users, log.num_items) == (100_000, 943, 1_682)
    _check_sorted(log)

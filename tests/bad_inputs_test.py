"""The catalogue of bad inputs: every one fails with a `UserError` that says where and how to fix.

Each table below is a list of cases run by one parametrized test. A case builds its input in
`tmp_path`, runs the code that must refuse it, and `check_message` asserts that the error

  * is an instance of the case's error class (a subclass of `vista_jax.errors.UserError`;
    `DataError` for data),
  * names the place: the file (as its full path), and the line, row or column where there is
    one (the case's `names`, with `{tmp}` standing for `tmp_path`),
  * says how to fix it: it holds `HINT` ("Fix: ") followed by the remedy, on one line (run.py
    prints a UserError as one line).

Tables so far: `EVENT_LOG_FILES` (event-log files through `vista_jax.data.loaders`, plus the
leave-one-out protocol on a log whose users are all too short). Further tables (config flags,
checkpoints, ...) are appended at the end of this module as their own case lists and
parametrized tests, reusing `check_message`. Keep every case fast and deterministic.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vista_jax.data import examples, loaders
from vista_jax.data.eventlog import EventLogError, EventLogOptions
from vista_jax.errors import DataError, UserError

HINT = "Fix: "


def check_message(error: BaseException, expected: type[UserError], names: list[str]) -> None:
    """The error is of the expected class, names every place in `names`, and gives a fix."""
    assert isinstance(error, expected), f"{type(error).__name__} is not a {expected.__name__}"
    assert isinstance(error, UserError)
    message = str(error)
    assert "\n" not in message, f"not one line: {message!r}"
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    hint = message.find(HINT)
    assert hint >= 0 and message[hint + len(HINT) :].strip(), f"no fix in {message!r}"


# ---------------------------------------------------------------------------------------------
# Event-log files
# ---------------------------------------------------------------------------------------------

Content = str | bytes | pa.Table


@dataclasses.dataclass(frozen=True)
class FileCase:
    """Files written under tmp_path, then `load_event_log(kind, path, options)` must refuse."""

    id: str
    kind: str  # A key of loaders.LOADERS.
    files: dict[str, Content]  # File name -> text, bytes or a Parquet table.
    names: tuple[str, ...]  # Substrings the message must hold; "{tmp}" is tmp_path.
    path: str | None = None  # Relative to tmp_path; None = the first file; "" = no path.
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    then: Callable[[Any], Any] | None = None  # Run on the loaded log (protocol cases).
    error: type[UserError] = EventLogError


def _lengths(log) -> np.ndarray:
    return np.diff(log.user_offsets)


CSV_HEADER = "user,item,timestamp"
RECBOLE_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"

EVENT_LOG_FILES = [
    # --- timestamps
    FileCase(
        "csv_timestamps_in_milliseconds",
        "table",
        {"e.csv": f"{CSV_HEADER}\n1,1,1600000000000\n1,2,1600000001000\n"},
        ("{tmp}/e.csv", "line 2", "looks like milliseconds", "--config.data.time_unit=ms"),
    ),
    FileCase(
        "csv_non_numeric_timestamp",
        "table",
        {"e.csv": f"{CSV_HEADER}\n1,2,3\n1,2,noon\n"},
        ("{tmp}/e.csv line 3: timestamp 'noon' is not a number",),
    ),
    FileCase(
        "csv_negative_timestamp",
        "table",
        {"e.csv": f"{CSV_HEADER}\n1,2,-5\n"},
        ("{tmp}/e.csv line 2: timestamp -5 is negative",),
    ),
    FileCase(
        "recbole_fractional_timestamp",
        "recbole_atomic",
        {"toy.inter": RECBOLE_HEADER + "u1\t9\t5\t881250950\nu3\t1\t2\t1.5\n"},
        ("{tmp}/toy.inter line 3: timestamp 1.5 is not a whole number",),
    ),
    FileCase(
        "parquet_non_numeric_string_timestamp",
        "table",
        {"e.parquet": pa.table({"user": [1, 1], "item": [1, 2], "timestamp": ["5", "yesterday"]})},
        (
            "{tmp}/e.parquet",
            "column 'timestamp' has type string",
            "row 2",
            "'yesterday'",
            "expected integer seconds",
        ),
    ),  # fmt: skip
    # --- ratings and labels
    FileCase(
        "csv_rating_outside_scale",
        "table",
        {"e.csv": f"{CSV_HEADER},rating\n1,1,1,4\n1,2,2,7\n"},
        ("{tmp}/e.csv line 3: rating 7 is outside the rating scale 1..5", "rating_scale"),
    ),
    FileCase(
        "csv_nan_rating",
        "table",
        {"e.csv": f"{CSV_HEADER},rating\n1,1,1,4\n1,2,2,nan\n"},
        ("{tmp}/e.csv line 3: rating nan is not finite",),
    ),
    FileCase(
        "csv_boolean_rating",
        "table",
        {"e.csv": f"{CSV_HEADER},rating\n1,1,1,true\n1,2,2,false\n"},
        ("{tmp}/e.csv line 2: rating 'true' is a boolean", "`label` column"),
    ),
    FileCase(
        "parquet_boolean_rating",
        "table",
        {"e.parquet": pa.table({"user": [1], "item": [1], "timestamp": [1], "rating": [True]})},
        ("{tmp}/e.parquet", "column 'rating' has type bool", "`label` column"),
    ),
    FileCase(
        "csv_label_not_binary",
        "table",
        {"e.csv": f"{CSV_HEADER},label\n1,2,3,1\n\n1,2,4,7\n"},
        ("{tmp}/e.csv line 4: label 7.0 is not 0 or 1",),
    ),
    # --- ids, duplicates, categories
    FileCase(
        "csv_item_ids_mix_numbers_and_names",
        "table",
        {"e.csv": f"{CSV_HEADER}\n1,item_242,1\n1,242,2\n"},
        ("{tmp}/e.csv", "'item_242' (line 2) and '242' (line 3)", "allow_mixed_ids"),
    ),
    FileCase(
        "csv_exact_duplicate_rows",
        "table",
        {"e.csv": f"{CSV_HEADER},rating\n1,1,1,4\n1,2,2,3\n1,1,1,4\n"},
        ("{tmp}/e.csv", "1 exact duplicate event(s)", "line 4, a copy of line 2", "duplicates"),
        options={"duplicates": "error"},
    ),
    FileCase(
        "csv_empty_item_field",
        "table",
        {"e.csv": f"{CSV_HEADER}\n1,,3\n"},
        ("{tmp}/e.csv line 2: empty item field",),
    ),
    FileCase(
        "csv_item_with_two_categories",
        "table",
        {"e.csv": f"{CSV_HEADER},category\n1,7,1,Drama\n2,7,2,Comedy\n"},
        ("{tmp}/e.csv line 3: item 7 has category 'Comedy'",),
    ),
    FileCase(
        "parquet_list_typed_user",
        "table",
        {"e.parquet": pa.table({"user": [[1, 2]], "item": [1], "timestamp": [1]})},
        (
            "{tmp}/e.parquet",
            "column 'user' has type list<",
            "expected integer or string ids",
            "explode",
        ),
    ),  # fmt: skip
    # --- layout: delimiters, columns, malformed lines
    FileCase(
        "csv_semicolon_separated",
        "table",
        {"e.csv": "user;item;timestamp\n1;2;3\n"},
        ("{tmp}/e.csv line 1", "looks ';'-separated", "must be ','-separated"),
    ),
    FileCase(
        "csv_tab_separated",
        "table",
        {"e.csv": "user\titem\ttimestamp\n1\t2\t3\n"},
        ("{tmp}/e.csv line 1", "looks tab-separated", "must be ','-separated"),
    ),
    FileCase(
        "recbole_comma_separated",
        "recbole_atomic",
        {"toy.inter": "user_id:token,item_id:token,timestamp:float\n1,2,3\n"},
        ("{tmp}/toy.inter line 1", "looks ','-separated", "must be tab-separated"),
    ),
    FileCase(
        "csv_missing_timestamp_column",
        "table",
        {"e.csv": "user,time,item\n1,2,3\n"},
        ("{tmp}/e.csv line 1: missing column(s) ['timestamp']",),
    ),
    FileCase(
        "recbole_missing_timestamp_column",
        "recbole_atomic",
        {"toy.inter": "user_id:token\titem_id:token\n1\t2\n"},
        ("{tmp}/toy.inter line 1: missing column(s) ['timestamp']",),
    ),
    FileCase(
        "csv_short_line",
        "table",
        {"e.csv": f"{CSV_HEADER}\n1,2,3\n1,2\n"},
        ("{tmp}/e.csv line 3: expected 3 fields",),
    ),
    FileCase(
        "ml1m_short_line",
        "movielens_1m",
        {"ratings.dat": "1::10::3::200\n1::11::3\n"},
        ("{tmp}/ratings.dat line 2: expected 4 fields",),
        path=".",
    ),
    # --- empty files
    FileCase("csv_empty", "table", {"e.csv": ""}, ("{tmp}/e.csv is empty",)),
    FileCase(
        "csv_header_only",
        "table",
        {"e.csv": f"{CSV_HEADER}\n"},
        ("{tmp}/e.csv has a header but no events",),
    ),
    FileCase(
        "parquet_no_rows",
        "table",
        {"e.parquet": pa.table({"user": pa.array([], pa.int64()), "item": [], "timestamp": []})},
        ("{tmp}/e.parquet has a header but no events",),
    ),
    FileCase("parquet_zero_bytes", "table", {"e.parquet": b""}, ("{tmp}/e.parquet is empty",)),
    FileCase(
        "ml1m_empty_ratings",
        "movielens_1m",
        {"ratings.dat": ""},
        ("{tmp}/ratings.dat is empty",),
        path=".",
    ),
    # --- paths and file types
    FileCase(
        "csv_named_parquet",
        "table",
        {"e.parquet": f"{CSV_HEADER}\n1,2,3\n"},
        ("{tmp}/e.parquet is not a readable Parquet file", "name it .csv"),
    ),
    FileCase(
        "table_unknown_suffix",
        "table",
        {"e.json": "{}"},
        ("{tmp}/e.json: unknown table suffix '.json'",),
    ),
    FileCase(
        "table_given_a_directory",
        "table",
        {"e.csv": f"{CSV_HEADER}\n1,2,3\n"},
        ("{tmp} is a directory", ".csv or .parquet file"),
        path=".",
    ),
    FileCase(
        "ml1m_given_a_file",
        "movielens_1m",
        {"ratings.dat": "1::10::3::200\n"},
        ("{tmp}/ratings.dat is a file", "reads a directory", "--config.data.path"),
    ),
    FileCase(
        "ml1m_directory_without_ratings",
        "movielens_1m",
        {"movies.dat": "10::A (2001)::Comedy\n"},
        ("{tmp}/ratings.dat not found",),
        path=".",
    ),
    FileCase(
        "recbole_given_a_non_inter_file",
        "recbole_atomic",
        {"toy.csv": f"{CSV_HEADER}\n1,2,3\n"},
        ("{tmp}/toy.csv is a file but not a RecBole .inter file",),
    ),
    FileCase(
        "path_missing",
        "table",
        {},
        ("no data path given", "--config.data.path is required"),
        path="",
    ),
    FileCase(
        "path_does_not_exist",
        "recbole_atomic",
        {},
        ("{tmp}/nowhere does not exist", "--config.data.path"),
        path="nowhere",
    ),
    # --- the retrieval protocol on a loaded log
    FileCase(
        "no_user_long_enough_for_leave_one_out",
        "table",
        {"e.csv": f"{CSV_HEADER}\n1,1,1\n1,2,2\n2,1,1\n"},
        ("2 user(s) but none with at least 3 events", "leave-one-out needs >= 3 events"),
        then=lambda log: examples.retrieval_requests(_lengths(log), "train"),
        error=DataError,
    ),
]


def _write(path: pathlib.Path, content: Content) -> None:
    if isinstance(content, pa.Table):
        pq.write_table(content, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


@pytest.mark.parametrize("case", EVENT_LOG_FILES, ids=lambda case: case.id)
def test_bad_event_log_files(tmp_path, case: FileCase):
    for name, content in case.files.items():
        _write(tmp_path / name, content)
    relative = next(iter(case.files)) if case.path is None else case.path
    path = "" if relative == "" else tmp_path / relative
    with pytest.raises(UserError) as error:
        log = loaders.load_event_log(case.kind, path, EventLogOptions(**case.options))
        if case.then is not None:
            case.then(log)
    names = [name.replace("{tmp}", str(tmp_path)) for name in case.names]
    check_message(error.value, case.error, names)
    assert isinstance(error.value, DataError)


def test_event_log_catalogue_covers_every_loader():
    assert {case.kind for case in EVENT_LOG_FILES} == set(loaders.LOADERS)
    assert len({case.id for case in EVENT_LOG_FILES}) == len(EVENT_LOG_FILES)

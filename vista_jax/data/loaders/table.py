"""CSV and Parquet tables of events, with columns named user, item, timestamp and more."""

from __future__ import annotations

import csv
import dataclasses
import pathlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from vista_jax.data.eventlog import DEFAULT_OPTIONS, EventLog, EventLogError, EventLogOptions, Where
from vista_jax.data.eventlog_checks import BOOLEAN_RATING_FIX, is_number
from vista_jax.data.loaders import common, text_scan
from vista_jax.data.loaders.text_scan import Field

_REQUIRED = ("user", "item", "timestamp")
_OPTIONAL = ("rating", "label", "category")
_LAYOUT = "columns user,item,timestamp and optionally rating or label, and category"
_CSV_TYPES = dict(
    user=pa.string(),
    item=pa.string(),
    rating=pa.float64(),
    label=pa.float64(),
    category=pa.string(),
)
# Accepted type families of each column, and how to describe them.
_IDS = ({"int", "float", "string", "null"}, "integer or string ids, one per row")
_COLUMN_TYPES = dict(
    user=_IDS,
    item=_IDS,
    timestamp=(
        {"int", "float", "timestamp", "date", "string", "null"},
        "integer seconds since the epoch, or a timestamp/date type",
    ),
    rating=({"int", "float", "null"}, "numbers on the rating scale"),
    label=({"int", "float", "bool", "null"}, "0/1 numbers or booleans"),
    category=({"int", "float", "string", "null"}, "strings, one per row"),
)


def _check_table_columns(path: pathlib.Path, found: Sequence[str], where: str) -> list[str]:
    missing = [c for c in _REQUIRED if c not in found]
    if missing:
        raise EventLogError(
            f"{path} {where}: missing column(s) {missing}; found {list(found)}. Fix: a table "
            f"needs {_LAYOUT}."
        )
    return [c for c in (*_REQUIRED, *_OPTIONAL) if c in found]


def _table_field(name: str) -> Field | None:
    if name not in (*_REQUIRED, *_OPTIONAL):
        return None
    kind = "str" if name in ("user", "item", "category") else "float"
    return Field(name, kind, required=name in _REQUIRED)


def _read_csv_table(path: pathlib.Path) -> tuple[pa.Table, Where]:
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        header = next(csv.reader(f), [])  # utf-8-sig: a leading byte-order mark is dropped.
    if not header:
        raise EventLogError(
            f"{path} is empty. Fix: start it with a header line user,item,timestamp."
        )
    if len(header) == 1:
        fix = "save it comma-separated (e.g. pandas: pd.read_csv(path, sep=...).to_csv(...))."
        text_scan.check_delimiter(path, header[0], ",", "CSV", fix)
    names = _check_table_columns(path, header, "line 1")
    types = {name: _CSV_TYPES[name] for name in names if name in _CSV_TYPES}
    try:
        table = pa_csv.read_csv(
            path,
            convert_options=pa_csv.ConvertOptions(
                column_types=types, include_columns=names, strings_can_be_null=True
            ),
        )
    except pa.ArrowInvalid as e:
        split = lambda line: next(csv.reader([line]))
        fields = [_table_field(name) for name in header]
        bad_line = text_scan.find_bad_line(path, split, fields, 1, ",".join(header))
        raise text_scan.malformed(path, bad_line, f"could not be parsed ({e})") from None
    return table, text_scan.where_in_text(path, 1)


def _read_parquet_table(path: pathlib.Path) -> tuple[pa.Table, Where]:
    if path.stat().st_size == 0:
        raise EventLogError(f"{path} is empty. Fix: write the events to it as a Parquet table.")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EventLogError(
            f"{path} is not a readable Parquet file ({reason}). Fix: write it with "
            "pandas.DataFrame.to_parquet or pyarrow.parquet.write_table, or, if it is CSV, "
            "name it .csv."
        ) from None
    names = _check_table_columns(path, schema.names, "schema")
    table = pq.read_table(path, columns=names)
    columns = [_decoded(table[name]) for name in names]
    return pa.table(columns, names=names), Where(str(path))


def _decoded(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Dictionary-encoded (e.g. pandas categorical) columns as their plain values."""
    if pa.types.is_dictionary(column.type):
        return column.cast(column.type.value_type)
    return column


def _type_family(t: pa.DataType) -> str:
    checks = [
        ("bool", pa.types.is_boolean),
        ("int", pa.types.is_integer),
        ("float", lambda t: pa.types.is_floating(t) or pa.types.is_decimal(t)),
        ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
        ("timestamp", pa.types.is_timestamp),
        ("date", pa.types.is_date),
        ("null", pa.types.is_null),
    ]
    return next((family for family, check in checks if check(t)), "other")


def _check_column_types(path: pathlib.Path, schema: pa.Schema) -> None:
    for field in schema:
        families, expected = _COLUMN_TYPES[field.name]
        family = _type_family(field.type)
        if family in families:
            continue
        if field.name == "rating" and family == "bool":
            fix = BOOLEAN_RATING_FIX
        elif pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
            fix = f"store one {field.name} per row (explode lists into one row per event)."
        else:
            fix = f"store {field.name} as {expected}."
        raise EventLogError(
            f"{path}: column {field.name!r} has type {field.type}; expected {expected}. Fix: {fix}"
        )


def _check_required_filled(table: pa.Table, where: Where) -> None:
    for name in _REQUIRED:
        if table[name].null_count:
            row = int(np.argmax(np.asarray(table[name].is_null())))
            raise EventLogError(
                f"{where(row)}: empty {name} field. Fix: fill in or delete that {where.noun}."
            )


def _numeric_strings(path: pathlib.Path, column: pa.ChunkedArray) -> np.ndarray:
    """A string timestamp column of a Parquet file as numbers; refuses non-numbers."""
    try:
        return column.cast(pa.float64()).to_numpy()
    except pa.ArrowInvalid:
        values = column.to_pylist()
        row = next(i for i, v in enumerate(values) if not is_number(v))
        raise EventLogError(
            f"{path}: column 'timestamp' has type {column.type} and row {row + 1} holds "
            f"{values[row]!r}, not a number; expected integer seconds since the epoch, or a "
            "timestamp/date type. Fix: store timestamps as integers or as a timestamp type "
            "(e.g. pandas.to_datetime)."
        ) from None


def _timestamps(
    path: pathlib.Path, column: pa.ChunkedArray, options: EventLogOptions
) -> tuple[np.ndarray, EventLogOptions]:
    """The timestamp column as numpy, and `options` with a datetime column's own unit."""
    if pa.types.is_timestamp(column.type):
        time, unit = column.cast(pa.int64()).to_numpy(), column.type.unit
    elif pa.types.is_date32(column.type):
        time, unit = column.cast(pa.timestamp("s")).cast(pa.int64()).to_numpy(), "s"
    elif pa.types.is_date64(column.type):
        time, unit = column.cast(pa.timestamp("ms")).cast(pa.int64()).to_numpy(), "ms"
    elif path.suffix.lower() != ".csv" and pa.types.is_string(column.type):
        return _numeric_strings(path, column), options
    else:  # A CSV's non-numbers are rejected with their line by `from_columns`.
        return common.to_numpy(column), options
    return time, dataclasses.replace(options, time_unit=unit)


def load_table(path: common.PathLike, options: EventLogOptions = DEFAULT_OPTIONS) -> EventLog:
    """Loads a CSV (`.csv`) or Parquet (`.parquet`, `.pq`) table of events.

    Columns: user, item, timestamp (numbers in `options.time_unit`, or a datetime type with
    its own unit); optional rating or label; optional category ('A|B' uses the first part).
    Other columns are ignored. A CSV must be comma-separated; a byte-order mark is accepted.
    """
    path = common.existing_path(path, "table")
    if path.is_dir():
        raise EventLogError(
            f"{path} is a directory, but data kind 'table' reads one file. Fix: set "
            f"--config.data.path to {common.EXPECTED_PATH['table']} inside it."
        )
    suffix = path.suffix.lower()
    if suffix == ".csv":
        table, where = _read_csv_table(path)
    elif suffix in (".parquet", ".pq"):
        table, where = _read_parquet_table(path)
    else:
        raise EventLogError(f"{path}: unknown table suffix {suffix!r}. Fix: use .csv or .parquet.")
    if table.num_rows == 0:
        raise EventLogError(f"{path} has a header but no events. Fix: add event rows.")
    _check_column_types(path, table.schema)
    _check_required_filled(table, where)
    columns = {n: common.to_numpy(table[n]) for n in table.column_names if n != "timestamp"}
    columns["timestamp"], options = _timestamps(path, table["timestamp"], options)
    category = columns.get("category")
    if category is not None and category.dtype.kind == "U":
        columns["category"] = np.char.partition(category, "|")[:, 0]
    return common.to_event_log(columns, where, options)

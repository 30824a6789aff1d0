"""Event-log file formats: GroupLens ML-1M, RecBole atomic files, CSV/Parquet tables.

Each loader parses its format into plain columns and hands them to
`vista_jax.data.eventlog.from_columns`, which validates them. Parsing is vectorized (pyarrow);
a malformed text file is re-scanned line by line only on the error path, so that the message can
name the file and the 1-based line number. Every problem is an `EventLogError` whose message
names the file, the line or column, and ends with "Fix: <what to do>".

    log = load_event_log("table", "events.csv", EventLogOptions(time_unit="ms"))
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import io
import pathlib
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from vista_jax.data.eventlog import (
    DEFAULT_OPTIONS,
    EventLog,
    EventLogError,
    EventLogOptions,
    Where,
    from_columns,
)

PathLike = str | pathlib.Path

# What `--config.data.path` must name for each kind (in error messages).
_EXPECTED_PATH = {
    "movielens_1m": "the unzipped GroupLens ml-1m directory holding ratings.dat",
    "recbole_atomic": "a RecBole .inter file, or the directory <name>/ holding <name>.inter",
    "table": "a .csv or .parquet file",
}
_DELIMITER_NAMES = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def _existing_path(path: PathLike | None, kind: str) -> pathlib.Path:
    """`path` as a Path; refuses a missing (empty) or non-existent path."""
    if path is None or not str(path).strip():
        raise EventLogError(
            f"no data path given for data kind {kind!r}. Fix: --config.data.path is required; "
            f"set it to {_EXPECTED_PATH[kind]}."
        )
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise EventLogError(
            f"{path} does not exist. Fix: check --config.data.path; it must name "
            f"{_EXPECTED_PATH[kind]}."
        )
    return path


def _require_dir(path: pathlib.Path, kind: str) -> None:
    if not path.is_dir():
        raise EventLogError(
            f"{path} is a file, but data kind {kind!r} reads a directory. Fix: set "
            f"--config.data.path to {_EXPECTED_PATH[kind]} (e.g. {path.parent})."
        )


# ---------------------------------------------------------------------------------------------
# Text files: locate the bad line (error path only)
# ---------------------------------------------------------------------------------------------


def _text_lines(path: pathlib.Path):
    """(1-based line number, text) of each non-blank line, as pyarrow counts rows."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if line:
                yield number, line


def _line_of_row(path: pathlib.Path, row: int, header_lines: int) -> int:
    for index, (number, _) in enumerate(_text_lines(path)):
        if index == row + header_lines:
            return number
    return -1


def _where(path: pathlib.Path, header_lines: int) -> Where:
    """Names rows of a text file by their file line."""
    return Where(str(path), functools.partial(_line_of_row, path, header_lines=header_lines))


@dataclasses.dataclass(frozen=True)
class _Field:
    """One column of a delimited text file."""

    name: str  # Name in error messages, e.g. "timestamp".
    kind: str  # "int", "float" or "str".
    required: bool = True  # Required fields may not be empty.


_FIX_LINE = "correct or delete that line."


def _field_problem(field: _Field, value: str) -> tuple[str, str] | None:
    """(problem, fix) of one field's text, or None."""
    if not value:
        return (f"empty {field.name} field", _FIX_LINE) if field.required else None
    try:
        if field.kind == "int":
            int(value)
        elif field.kind == "float":
            float(value)
    except ValueError:
        if field.name == "rating" and value.strip().lower() in ("true", "false"):
            fix = "put binary feedback in a `label` column (0/1) instead of `rating`."
            return f"rating {value!r} is a boolean", fix
        expected = "an integer" if field.kind == "int" else "a number"
        return f"{field.name} {value!r} is not {expected}", _FIX_LINE
    return None


def _find_bad_line(
    path: pathlib.Path,
    split_line: Callable[[str], list[str]],
    fields: Sequence[_Field | None],
    header_lines: int,
    layout: str,
) -> tuple[str, str] | None:
    """('line N: problem', fix) for the first malformed line; None if every line parses."""
    for index, (number, line) in enumerate(_text_lines(path)):
        if index < header_lines:
            continue
        values = split_line(line)
        if len(values) != len(fields):
            problem = f"expected {len(fields)} fields ({layout}), found {len(values)}"
            return f"line {number}: {problem}", _FIX_LINE
        for field, value in zip(fields, values, strict=True):
            problem = field and _field_problem(field, value)
            if problem:
                return f"line {number}: {problem[0]}", problem[1]
    return None


def _malformed(path, bad_line: tuple[str, str] | None, fallback: str) -> EventLogError:
    detail, fix = bad_line or (fallback, _FIX_LINE)
    return EventLogError(f"{path} {detail}. Fix: {fix}")


def _other_delimiter(line: str, expected: str) -> str | None:
    """The most frequent likely delimiter in `line` other than `expected`, if any."""
    counts = collections.Counter(c for c in line if c in _DELIMITER_NAMES and c != expected)
    return counts.most_common(1)[0][0] if counts else None


def _wrong_delimiter(path, header: str, expected: str, fmt: str, fix: str) -> EventLogError:
    found = _DELIMITER_NAMES[_other_delimiter(header, expected)]
    return EventLogError(
        f"{path} line 1: the header {header!r} reads as one column: the file looks "
        f"{found}-separated, but {fmt} must be {_DELIMITER_NAMES[expected]}-separated. "
        f"Fix: {fix}"
    )


# ---------------------------------------------------------------------------------------------
# Delimited text
# ---------------------------------------------------------------------------------------------

_ARROW_TYPES = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}


def _read_delimited(
    path: pathlib.Path,
    delimiter: str,
    fields: Sequence[_Field | None],
    header_lines: int,
    layout: str,
) -> dict[str, np.ndarray]:
    """Parses a quote-free delimited file; `None` fields are skipped. Returns numpy columns."""
    data = path.read_bytes()
    if not data.strip():
        raise EventLogError(f"{path} is empty. Fix: give it rows of {layout}.")
    parse_delimiter = delimiter
    if len(delimiter) > 1:  # pyarrow wants one character; '\t' never occurs in these files.
        data, parse_delimiter = data.replace(delimiter.encode(), b"\t"), "\t"
    names = [f.name if f else f"_skip{i}" for i, f in enumerate(fields)]
    kept = {f.name: _ARROW_TYPES[f.kind] for f in fields if f}

    def locate(fallback: str) -> EventLogError:
        split = lambda s: s.split(delimiter)
        return _malformed(path, _find_bad_line(path, split, fields, header_lines, layout), fallback)

    try:
        table = pa_csv.read_csv(
            io.BytesIO(data),
            read_options=pa_csv.ReadOptions(column_names=names, skip_rows=header_lines),
            parse_options=pa_csv.ParseOptions(delimiter=parse_delimiter, quote_char=False),
            convert_options=pa_csv.ConvertOptions(
                column_types=kept, include_columns=list(kept), strings_can_be_null=True
            ),
        )
    except pa.ArrowInvalid as e:
        raise locate(f"could not be parsed ({e})") from None
    if table.num_rows == 0:
        raise EventLogError(f"{path} has a header but no events. Fix: add rows of {layout}.")
    for field in fields:
        if field and field.required and table[field.name].null_count:
            raise locate(f"has an empty {field.name} field")
    return {name: _to_numpy(table[name]) for name in kept}


def _to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        # Unknown (null) strings become "", the missing marker `from_columns` understands.
        return np.asarray(column.fill_null("").to_numpy(zero_copy_only=False)).astype(str)
    if column.null_count:
        column = column.cast(pa.float64())  # Nulls -> NaN, rejected or read as missing later.
    return column.to_numpy()


def _categories_for_items(event_items: np.ndarray, table_items, table_categories) -> np.ndarray:
    """Per-event category looked up from an item table ("" for items not in it)."""
    lookup = dict(zip(table_items, table_categories, strict=True))
    uniques, inverse = np.unique(event_items, return_inverse=True)
    per_item = np.array([lookup.get(item, "") for item in uniques.tolist()] + [""])
    return per_item[:-1][inverse] if len(uniques) else per_item[:0]


# ---------------------------------------------------------------------------------------------
# GroupLens ML-1M
# ---------------------------------------------------------------------------------------------

_ML1M_LAYOUT = "UserID::MovieID::Rating::Timestamp"


def load_movielens_1m(data_dir: PathLike, options: EventLogOptions = DEFAULT_OPTIONS) -> EventLog:
    """Loads GroupLens ML-1M: `ratings.dat` and, when present, `movies.dat` genres."""
    data_dir = _existing_path(data_dir, "movielens_1m")
    _require_dir(data_dir, "movielens_1m")
    ratings_path = data_dir / "ratings.dat"
    if not ratings_path.is_file():
        raise EventLogError(
            f"{ratings_path} not found. Fix: point --config.data.path at the unzipped GroupLens "
            "ml-1m directory (https://grouplens.org/datasets/movielens/1m/)."
        )
    fields = [
        _Field("user", "int"),
        _Field("item", "int"),
        _Field("rating", "float"),
        _Field("timestamp", "int"),
    ]
    columns = _read_delimited(ratings_path, "::", fields, 0, _ML1M_LAYOUT)
    category = None
    movies_path = data_dir / "movies.dat"
    if movies_path.is_file():
        movie_ids, genres = _read_movielens_genres(movies_path)
        category = _categories_for_items(columns["item"], movie_ids, genres)
    return from_columns(
        columns["user"],
        columns["item"],
        columns["timestamp"],
        rating=columns["rating"],
        category=category,
        source=_where(ratings_path, 0),
        options=options,
    )


def _read_movielens_genres(path: pathlib.Path) -> tuple[list[int], list[str]]:
    """MovieID and first genre of each row of a latin-1 `MovieID::Title::Genres` file."""
    movie_ids, genres = [], []
    with open(path, encoding="latin-1") as f:  # GroupLens ships movies.dat as ISO-8859-1.
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            movie_id, _, rest = line.partition("::")
            _, sep, genre_list = rest.rpartition("::")  # Titles may hold ':'; genres are last.
            if not sep or not movie_id.strip().isdigit():
                bad = f"line {number}: expected MovieID::Title::Genres, found {line!r}"
                raise _malformed(path, (bad, _FIX_LINE), "")
            movie_ids.append(int(movie_id))
            genres.append(genre_list.split("|")[0].strip())
    return movie_ids, genres


# ---------------------------------------------------------------------------------------------
# RecBole atomic files
# ---------------------------------------------------------------------------------------------

_RECBOLE_NUMERIC = ("float", "float_seq")
_RECBOLE_COLUMNS = dict(user_id="user", item_id="item", timestamp="timestamp")
_RECBOLE_OPTIONAL = dict(rating="rating", label="label")


def _recbole_header(path: pathlib.Path, required: Sequence[str]) -> list[tuple[str, str]]:
    """[(name, type)] from a RecBole atomic header like `user_id:token\\titem_id:token`."""
    if not path.is_file():
        raise EventLogError(
            f"{path} not found. Fix: a RecBole dataset <name>/ holds <name>.inter; pass that "
            "directory or the .inter file itself."
        )
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        header = f.readline().rstrip("\r\n")
    if not header:
        raise EventLogError(f"{path} is empty. Fix: give it a typed header such as user_id:token.")
    if "\t" not in header and _other_delimiter(header, "\t"):
        fix = "convert it to tabs, with a header such as user_id:token<TAB>item_id:token."
        raise _wrong_delimiter(path, header, "\t", "RecBole atomic files", fix)
    columns = [tuple(c.rsplit(":", 1)) if ":" in c else (c, "") for c in header.split("\t")]
    names = [name for name, _ in columns]
    missing = [name for name in required if name not in names]
    if missing:
        raise EventLogError(
            f"{path} line 1: missing column(s) {missing}; found {names}. Fix: a RecBole header "
            "names each tab-separated column as name:type, e.g. user_id:token."
        )
    return columns


def _recbole_layout(header) -> str:
    return "tab-separated " + ", ".join(f"{name}:{kind}" for name, kind in header)


def _recbole_fields(header, wanted: dict[str, str]) -> list[_Field | None]:
    fields = []
    for name, kind in header:
        if name not in wanted:
            fields.append(None)
            continue
        required = name in _RECBOLE_COLUMNS or name in _RECBOLE_OPTIONAL
        fields.append(
            _Field(wanted[name], "float" if kind in _RECBOLE_NUMERIC else "str", required)
        )
    return fields


def load_recbole_atomic(
    data_dir: PathLike, name: str, options: EventLogOptions = DEFAULT_OPTIONS
) -> EventLog:
    """Loads RecBole atomic files `<name>.inter` (and `<name>.item` genres, if present).

    `.inter` must have user_id, item_id and timestamp columns, and may have rating or label;
    the first token of the `.item` file's `class:token_seq` column becomes the category.
    """
    data_dir = _existing_path(data_dir, "recbole_atomic")
    _require_dir(data_dir, "recbole_atomic")
    inter_path = data_dir / f"{name}.inter"
    header = _recbole_header(inter_path, list(_RECBOLE_COLUMNS))
    wanted = {**_RECBOLE_COLUMNS, **_RECBOLE_OPTIONAL}
    layout = _recbole_layout(header)
    columns = _read_delimited(inter_path, "\t", _recbole_fields(header, wanted), 1, layout)
    item_path = data_dir / f"{name}.item"
    category = _recbole_item_categories(item_path, columns["item"]) if item_path.is_file() else None
    return from_columns(
        columns["user"],
        columns["item"],
        columns["timestamp"],
        rating=columns.get("rating"),
        label=columns.get("label"),
        category=category,
        source=_where(inter_path, 1),
        options=options,
    )


def _recbole_item_categories(path: pathlib.Path, event_items: np.ndarray) -> np.ndarray | None:
    header = _recbole_header(path, ["item_id"])
    if "class" not in [name for name, _ in header]:
        return None
    wanted = dict(item_id="item", **{"class": "class"})
    fields = _recbole_fields(header, wanted)  # Only item_id is required; class may be empty.
    layout = _recbole_layout(header)
    columns = _read_delimited(path, "\t", fields, 1, layout)
    first_class = [c.split(" ", 1)[0] for c in columns["class"].tolist()]
    return _categories_for_items(event_items, columns["item"].tolist(), first_class)


def _load_recbole_path(path: PathLike, options: EventLogOptions = DEFAULT_OPTIONS) -> EventLog:
    """RecBole from the `.inter` file or its directory (named like the dataset)."""
    path = _existing_path(path, "recbole_atomic")
    if path.is_dir():
        return load_recbole_atomic(path, path.name, options)
    if path.suffix != ".inter":
        raise EventLogError(
            f"{path} is a file but not a RecBole .inter file. Fix: set --config.data.path to "
            f"{_EXPECTED_PATH['recbole_atomic']}."
        )
    return load_recbole_atomic(path.parent, path.stem, options)


# ---------------------------------------------------------------------------------------------
# CSV / Parquet tables
# ---------------------------------------------------------------------------------------------

_TABLE_REQUIRED = ("user", "item", "timestamp")
_TABLE_OPTIONAL = ("rating", "label", "category")
_TABLE_LAYOUT = "columns user,item,timestamp and optionally rating or label, and category"
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
    missing = [c for c in _TABLE_REQUIRED if c not in found]
    if missing:
        raise EventLogError(
            f"{path} {where}: missing column(s) {missing}; found {list(found)}. Fix: a table "
            f"needs {_TABLE_LAYOUT}."
        )
    return [c for c in (*_TABLE_REQUIRED, *_TABLE_OPTIONAL) if c in found]


def _table_field(name: str) -> _Field | None:
    if name not in (*_TABLE_REQUIRED, *_TABLE_OPTIONAL):
        return None
    kind = "str" if name in ("user", "item", "category") else "float"
    return _Field(name, kind, required=name in _TABLE_REQUIRED)


def _read_csv_table(path: pathlib.Path) -> tuple[pa.Table, Where]:
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        header = next(csv.reader(f), [])  # utf-8-sig: a leading byte-order mark is dropped.
    if not header:
        raise EventLogError(
            f"{path} is empty. Fix: start it with a header line user,item,timestamp."
        )
    if len(header) == 1 and _other_delimiter(header[0], ","):
        fix = "save it comma-separated (e.g. pandas: pd.read_csv(path, sep=...).to_csv(...))."
        raise _wrong_delimiter(path, header[0], ",", "CSV", fix)
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
        bad_line = _find_bad_line(path, split, fields, 1, ",".join(header))
        raise _malformed(path, bad_line, f"could not be parsed ({e})") from None
    return table, _where(path, 1)


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
            fix = "put binary feedback in a `label` column (0/1) instead of `rating`."
        elif pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
            fix = f"store one {field.name} per row (explode lists into one row per event)."
        else:
            fix = f"store {field.name} as {expected}."
        raise EventLogError(
            f"{path}: column {field.name!r} has type {field.type}; expected {expected}. Fix: {fix}"
        )


def _numeric_strings(path: pathlib.Path, column: pa.ChunkedArray) -> np.ndarray:
    """A string timestamp column of a Parquet file as numbers; refuses non-numbers."""
    try:
        return column.cast(pa.float64()).to_numpy()
    except pa.ArrowInvalid:
        values = column.to_pylist()
        row = next(i for i, v in enumerate(values) if not _is_number(v))
        raise EventLogError(
            f"{path}: column 'timestamp' has type {column.type} and row {row + 1} holds "
            f"{values[row]!r}, not a number; expected integer seconds since the epoch, or a "
            "timestamp/date type. Fix: store timestamps as integers or as a timestamp type "
            "(e.g. pandas.to_datetime)."
        ) from None


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _table_time(column: pa.ChunkedArray) -> tuple[np.ndarray | None, str | None]:
    """(int64 values, unit) of a datetime column; (None, None) for other columns."""
    if pa.types.is_timestamp(column.type):
        return column.cast(pa.int64()).to_numpy(), column.type.unit
    if pa.types.is_date32(column.type):
        return column.cast(pa.timestamp("s")).cast(pa.int64()).to_numpy(), "s"
    if pa.types.is_date64(column.type):
        return column.cast(pa.timestamp("ms")).cast(pa.int64()).to_numpy(), "ms"
    return None, None


def load_table(path: PathLike, options: EventLogOptions = DEFAULT_OPTIONS) -> EventLog:
    """Loads a CSV (`.csv`) or Parquet (`.parquet`, `.pq`) table of events.

    Columns: user, item, timestamp (numbers in `options.time_unit`, or a datetime type with
    its own unit); optional rating or label; optional category ('A|B' uses the first part).
    Other columns are ignored. A CSV must be comma-separated; a byte-order mark is accepted.
    """
    path = _existing_path(path, "table")
    if path.is_dir():
        raise EventLogError(
            f"{path} is a directory, but data kind 'table' reads one file. Fix: set "
            f"--config.data.path to {_EXPECTED_PATH['table']} inside it."
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
    for name in _TABLE_REQUIRED:
        if table[name].null_count:
            row = int(np.argmax(np.asarray(table[name].is_null())))
            raise EventLogError(
                f"{where(row)}: empty {name} field. Fix: fill in or delete that {where.noun}."
            )
    columns = {name: _to_numpy(table[name]) for name in table.column_names if name != "timestamp"}
    time, unit = _table_time(table["timestamp"])
    if unit is not None:
        options = dataclasses.replace(options, time_unit=unit)
    elif suffix != ".csv" and pa.types.is_string(table["timestamp"].type):
        time = _numeric_strings(path, table["timestamp"])
    else:  # A CSV's non-numbers are rejected with their line by `from_columns`.
        time = _to_numpy(table["timestamp"])
    category = columns.get("category")
    if category is not None and category.dtype.kind == "U":
        category = np.char.partition(category, "|")[:, 0]
    return from_columns(
        columns["user"],
        columns["item"],
        time,
        rating=columns.get("rating"),
        label=columns.get("label"),
        category=category,
        source=where,
        options=options,
    )


LOADERS: dict[str, Callable[..., EventLog]] = {
    "movielens_1m": load_movielens_1m,
    "recbole_atomic": _load_recbole_path,
    "table": load_table,
}


def load_event_log(
    kind: str, path: PathLike | None, options: EventLogOptions | None = DEFAULT_OPTIONS
) -> EventLog:
    """Loads an event log of a given kind (a key of `LOADERS`) from `path`.

    "movielens_1m": the ml-1m directory; "recbole_atomic": the `.inter` file or its directory
    (whose name is the dataset name, as in `ml-100k/ml-100k.inter`); "table": a .csv or
    .parquet file. `options=None` means the defaults.
    """
    if kind not in LOADERS:
        raise EventLogError(
            f"unknown event log kind {kind!r}. Fix: set --config.data.kind to one of "
            f"{tuple(LOADERS)}."
        )
    return LOADERS[kind](_existing_path(path, kind), options or DEFAULT_OPTIONS)


__all__ = [
    "LOADERS",
    "load_event_log",
    "load_movielens_1m",
    "load_recbole_atomic",
    "load_table",
]

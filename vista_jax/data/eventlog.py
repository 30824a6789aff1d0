"""Validated interaction event logs: the one door raw data comes in through.

Every loader parses its file format into plain columns and hands them to `from_columns`, which
validates them, maps raw ids to dense ids and sorts events per user by time. Ids follow
docs/ARCHITECTURE.md: users are `0..U-1`, items `1..I` and categories `1..C` with 0 as
padding/unknown, actions are ratings 1..5, labels + 1, or 1.

Parsing is vectorized (pyarrow); a malformed file is re-scanned line by line only on the error
path, so that the message can name the file and the 1-based line number.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

UNKNOWN_CATEGORY = "<unknown>"
PAD_ITEM = "<pad>"  # Placeholder raw id at dense item 0 when raw item ids are strings.
PAD_ITEM_NUMERIC = -1  # Same placeholder when raw item ids are integers.
MAX_RATING_ACTION = 5
# Vocabulary sizes of the event features, shared by the data and every model (one place):
NUM_ACTIONS = 8  # Action ids used: 0 pad, ratings 1..5, labels 1..2; the rest is headroom.
NUM_GAP_BUCKETS = 16  # log2 buckets of the gap to the previous event (see `gap_buckets`).

PathLike = str | pathlib.Path


class EventLogError(ValueError):
    """Bad event data: the message says what was wrong, where, and how to fix it."""


# ---------------------------------------------------------------------------------------------
# EventLog
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class EventLog:
    """Events sorted by dense user, then time (stable: ties keep file order).

    All event columns have length `num_events`. `raw_user_ids[u]` is the raw id of dense user
    `u`; `raw_item_ids[i]` that of dense item `i` (index 0 is a padding placeholder);
    `category_names[c]` the name of dense category `c` (index 0 is "<unknown>").
    """

    user: np.ndarray  # int32 [N], dense 0..U-1
    item: np.ndarray  # int32 [N], dense 1..I
    time: np.ndarray  # int64 [N], seconds
    action: np.ndarray  # int32 [N], see module docstring
    category: np.ndarray  # int32 [N], 0 = unknown
    label: np.ndarray | None  # float32 [N] in {0, 1}
    rating: np.ndarray | None  # float32 [N]
    raw_user_ids: np.ndarray
    raw_item_ids: np.ndarray
    category_names: tuple[str, ...]

    def __post_init__(self):
        # Cheap structural checks only; value validation lives in `from_columns`.
        n = len(self.user)
        columns = dict(item=self.item, time=self.time, action=self.action, category=self.category)
        columns.update(label=self.label, rating=self.rating)
        for name, column in columns.items():
            if column is not None and len(column) != n:
                raise EventLogError(f"EventLog column {name!r} has {len(column)} rows, user {n}.")
        if not self.category_names or self.category_names[0] != UNKNOWN_CATEGORY:
            raise EventLogError(f"category_names[0] must be {UNKNOWN_CATEGORY!r}.")

    @property
    def num_users(self) -> int:
        return len(self.raw_user_ids)

    @property
    def num_items(self) -> int:
        """Number of real items; item tables need `num_items + 1` rows (0 is padding)."""
        return len(self.raw_item_ids) - 1

    @property
    def num_categories(self) -> int:
        """Number of known categories; tables need `num_categories + 1` rows (0 is unknown)."""
        return len(self.category_names) - 1

    @property
    def num_events(self) -> int:
        return len(self.user)

    @functools.cached_property
    def user_offsets(self) -> np.ndarray:
        """CSR offsets: user `u`'s events are `[offsets[u], offsets[u + 1])`; int64 [U + 1]."""
        counts = np.bincount(self.user, minlength=self.num_users)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def user_slice(self, u: int) -> slice:
        offsets = self.user_offsets
        return slice(int(offsets[u]), int(offsets[u + 1]))

    @functools.cached_property
    def item_category(self) -> np.ndarray:
        """Dense category of each dense item, int32 [num_items + 1] (0 for padding/unknown)."""
        table = np.zeros(self.num_items + 1, np.int32)
        table[self.item] = self.category  # Consistent per item, validated in `from_columns`.
        return table


def gap_buckets(
    time: np.ndarray, user_offsets: np.ndarray, num_buckets: int = NUM_GAP_BUCKETS
) -> np.ndarray:
    """Log2 bucket of the gap to the user's previous event, int32 [N].

    Bucket 0 marks a user's first event; otherwise `1 + floor(log2(1 + gap_seconds))`, clipped
    to `num_buckets - 1`. It depends only on event times, never on when it is read, so cached
    summaries stay exact under incremental updates.
    """
    time = np.asarray(time, np.int64)
    gap = np.diff(time, prepend=time[:1] if len(time) else time)
    # frexp(x) = (m, e) with x = m * 2**e and m in [0.5, 1): floor(log2(x)) = e - 1 exactly.
    _, exponent = np.frexp(1.0 + np.maximum(gap, 0).astype(np.float64))
    buckets = np.minimum(exponent, num_buckets - 1).astype(np.int32)
    starts = np.asarray(user_offsets[:-1])
    buckets[starts[starts < len(time)]] = 0
    return buckets


# ---------------------------------------------------------------------------------------------
# The validating constructor
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Where:
    """Names the place of a 0-based input row in error messages."""

    source: str
    path: pathlib.Path | None = None  # A text file whose lines hold the rows.
    header_lines: int = 0

    def __call__(self, row: int) -> str:
        if self.path is None:
            return f"{self.source} row {row + 1}"
        return f"{self.source} line {_line_of_row(self.path, row, self.header_lines)}"


def from_columns(
    user: Sequence[Any] | np.ndarray,
    item: Sequence[Any] | np.ndarray,
    time: Sequence[Any] | np.ndarray,
    rating: Sequence[Any] | np.ndarray | None = None,
    label: Sequence[Any] | np.ndarray | None = None,
    category: Sequence[Any] | np.ndarray | None = None,
    source: str = "<arrays>",
) -> EventLog:
    """Validates raw event columns and returns an `EventLog` (dense ids, stable time sort).

    Args:
      user, item: raw ids (integers or strings); numeric ids are ordered numerically, others
        lexicographically, before dense ids are assigned.
      time: seconds, integer-valued (floats such as 8.8e8 are accepted if integral).
      rating: optional finite ratings; action = rating rounded and clipped to 1..5.
      label: optional binary labels in {0, 1}; action = label + 1. Not together with rating.
      category: optional raw category per event ("" / None / NaN = unknown); all events of an
        item must agree.
      source: names the data in error messages.
    """
    return _build_event_log(user, item, time, rating, label, category, _Where(source))


def _build_event_log(user, item, time, rating, label, category, where: _Where) -> EventLog:
    user, item, time = np.asarray(user), np.asarray(item), np.asarray(time)
    n = len(user)
    if n == 0:
        raise EventLogError(f"{where.source}: no events; an event log needs at least one row.")
    lengths = dict(user=n, item=len(item), time=len(time))
    for name, column in dict(rating=rating, label=label, category=category).items():
        if column is not None:
            lengths[name] = len(column)
    if len(set(lengths.values())) != 1:
        raise EventLogError(f"{where.source}: columns differ in length {lengths}; align them.")
    if rating is not None and label is not None:
        raise EventLogError(
            f"{where.source}: got both rating and label; pass one of them (the action id comes "
            "from a rating 1..5 or a binary label, not both)."
        )

    time = _validated_time(time, where)
    rating = None if rating is None else _validated_rating(rating, where)
    label = None if label is None else _validated_label(label, where)
    raw_user_ids, dense_user = _dense_ids(user, "user", where)
    raw_items, item_index = _dense_ids(item, "item", where)
    dense_item = item_index + 1  # 0 is padding.
    category_names, dense_category = _dense_categories(category, item_index, raw_items, where)

    order = np.argsort(time, kind="stable")
    order = order[np.argsort(dense_user[order], kind="stable")]
    return EventLog(
        user=dense_user[order].astype(np.int32),
        item=dense_item[order].astype(np.int32),
        time=time[order],
        action=_actions(rating, label, n)[order],
        category=dense_category[order],
        label=None if label is None else label[order],
        rating=None if rating is None else rating[order],
        raw_user_ids=raw_user_ids,
        raw_item_ids=_with_pad(raw_items),
        category_names=category_names,
    )


def _first_row(bad: np.ndarray) -> int:
    return int(np.argmax(bad))


def _show(value: Any) -> str:
    """repr of a value as the user wrote it (no `np.float64(...)` wrapper)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _as_float(column: np.ndarray, name: str, where: _Where) -> np.ndarray:
    try:
        return np.asarray(column, np.float64)
    except (TypeError, ValueError):
        for row, value in enumerate(column.tolist()):
            try:
                float(value)
            except (TypeError, ValueError):
                raise EventLogError(
                    f"{where(row)}: {name} {value!r} is not a number; fix or drop that row."
                ) from None
        raise


def _validated_time(time: np.ndarray, where: _Where) -> np.ndarray:
    if time.dtype.kind in "iu":
        return time.astype(np.int64)
    time = _as_float(time, "timestamp", where)
    bad = ~np.isfinite(time) | (time != np.floor(time))
    if bad.any():
        row = _first_row(bad)
        raise EventLogError(
            f"{where(row)}: timestamp {_show(time[row])} is not a whole number of seconds; "
            "timestamps must be finite integer seconds since the epoch."
        )
    return time.astype(np.int64)


def _validated_rating(rating, where: _Where) -> np.ndarray:
    rating = _as_float(np.asarray(rating), "rating", where)
    bad = ~np.isfinite(rating)
    if bad.any():
        row = _first_row(bad)
        raise EventLogError(
            f"{where(row)}: rating {_show(rating[row])} is not finite; fix that row."
        )
    return rating.astype(np.float32)


def _validated_label(label, where: _Where) -> np.ndarray:
    label = _as_float(np.asarray(label), "label", where)
    bad = (label != 0) & (label != 1)
    if bad.any():
        row = _first_row(bad)
        raise EventLogError(
            f"{where(row)}: label {_show(label[row])} is not 0 or 1; labels must be binary "
            "(use the rating column for graded feedback)."
        )
    return label.astype(np.float32)


def _actions(rating, label, n: int) -> np.ndarray:
    if rating is not None:
        # Half-up rounding so that 4.5 stars counts as 5, then clip into the rating range.
        return np.clip(np.floor(rating + 0.5), 1, MAX_RATING_ACTION).astype(np.int32)
    if label is not None:
        return label.astype(np.int32) + 1
    return np.ones(n, np.int32)


def _missing_mask(raw: np.ndarray) -> np.ndarray:
    """True where a raw value is None, NaN or the empty string."""
    if raw.dtype.kind == "f":
        return np.isnan(raw)
    if raw.dtype.kind == "O":
        return np.array([v is None or v == "" or v != v for v in raw.tolist()], bool)
    if raw.dtype.kind in "US":
        return raw == raw.dtype.type()
    return np.zeros(len(raw), bool)


def _canonical_ints(strings: np.ndarray) -> np.ndarray | None:
    """Integer values of `strings` if every one is a canonical integer ("7", not "007")."""
    try:
        ints = strings.astype(np.int64)
    except (ValueError, OverflowError):
        return None
    return ints if np.array_equal(ints.astype(strings.dtype), strings) else None


def _dense_ids(raw: np.ndarray, name: str, where: _Where) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique raw ids and each row's 0-based index into them."""
    raw = np.asarray(raw)
    missing = _missing_mask(raw)
    if missing.any():
        raise EventLogError(f"{where(_first_row(missing))}: empty {name} id; fill or drop the row.")
    if raw.dtype.kind == "f":
        if (raw != np.floor(raw)).any():
            row = _first_row(raw != np.floor(raw))
            raise EventLogError(f"{where(row)}: {name} id {_show(raw[row])} is not an integer.")
        raw = raw.astype(np.int64)
    if raw.dtype.kind in "iub":
        uniques, inverse = np.unique(raw, return_inverse=True)
        return uniques.astype(np.int64), inverse.astype(np.int64)
    uniques, inverse = np.unique(raw.astype(str), return_inverse=True)  # Lexicographic.
    ints = _canonical_ints(uniques)
    if ints is None:
        return uniques, inverse.astype(np.int64)
    # Numeric strings ("10" < "9" lexicographically) are ranked by value instead.
    order = np.argsort(ints, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return ints[order], rank[inverse].astype(np.int64)


def _category_strings(category) -> np.ndarray:
    """Raw categories as strings, "" where unknown."""
    category = np.asarray(category)
    missing = _missing_mask(category)
    if category.dtype.kind == "f":
        category = np.where(missing, 0, category)
        if (category == np.floor(category)).all():
            category = category.astype(np.int64)
    strings = np.array([str(v) for v in category.tolist()]) if category.dtype.kind == "O" else None
    strings = category.astype(str) if strings is None else strings
    return np.where(missing, "", strings)


def _dense_categories(category, item_index, raw_items, where: _Where):
    """(category_names, dense category per row); checks that each item has one category."""
    n = len(item_index)
    if category is None:
        return (UNKNOWN_CATEGORY,), np.zeros(n, np.int32)
    raw = _category_strings(category)
    _, first_row = np.unique(item_index, return_index=True)
    item_raw = raw[first_row]  # [I], the category of each item's first event.
    conflict = raw != item_raw[item_index]
    if conflict.any():
        row = _first_row(conflict)
        item, earlier = raw_items[item_index[row]], item_raw[item_index[row]]
        raise EventLogError(
            f"{where(row)}: item {_show(item)} has category {_show(raw[row])} but an earlier "
            f"event of it has {_show(earlier)}; give every event of an item the same category "
            "(for multi-genre items, the first genre)."
        )
    known = item_raw != ""
    item_category = np.zeros(len(item_raw), np.int32)
    names: tuple[str, ...] = ()
    if known.any():
        uniques, inverse = _dense_ids(item_raw[known], "category", where)
        item_category[known] = inverse + 1
        names = tuple(str(name) for name in uniques.tolist())
    return (UNKNOWN_CATEGORY, *names), item_category[item_index]


def _with_pad(raw_items: np.ndarray) -> np.ndarray:
    pad = PAD_ITEM_NUMERIC if raw_items.dtype.kind in "iu" else PAD_ITEM
    return np.concatenate([np.array([pad]), raw_items])  # Widens strings to fit "<pad>".


# ---------------------------------------------------------------------------------------------
# Error-path helpers: locate the bad line of a text file
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


@dataclasses.dataclass(frozen=True)
class _Field:
    """One column of a delimited text file."""

    name: str  # Name in error messages, e.g. "timestamp".
    kind: str  # "int", "float" or "str".
    required: bool = True  # Required fields may not be empty.


def _field_problem(field: _Field, value: str) -> str | None:
    if not value:
        return f"empty {field.name} field" if field.required else None
    try:
        if field.kind == "int":
            int(value)
        elif field.kind == "float":
            float(value)
    except ValueError:
        return (
            f"{field.name} {value!r} is not {'an integer' if field.kind == 'int' else 'a number'}"
        )
    return None


def _find_bad_line(
    path: pathlib.Path,
    split_line: Callable[[str], list[str]],
    fields: Sequence[_Field | None],
    header_lines: int,
    layout: str,
) -> str | None:
    """'LINE: problem' for the first malformed line; None if every line parses."""
    for index, (number, line) in enumerate(_text_lines(path)):
        if index < header_lines:
            continue
        values = split_line(line)
        if len(values) != len(fields):
            return f"line {number}: expected {len(fields)} fields ({layout}), found {len(values)}"
        for field, value in zip(fields, values, strict=True):
            problem = field and _field_problem(field, value)
            if problem:
                return f"line {number}: {problem}"
    return None


def _malformed(path, detail: str, how_to_fix: str) -> EventLogError:
    return EventLogError(f"{path} {detail}; {how_to_fix}")


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
        raise EventLogError(f"{path} is empty; expected rows of {layout}.")
    parse_delimiter = delimiter
    if len(delimiter) > 1:  # pyarrow wants one character; '\t' never occurs in these files.
        data, parse_delimiter = data.replace(delimiter.encode(), b"\t"), "\t"
    names = [f.name if f else f"_skip{i}" for i, f in enumerate(fields)]
    kept = {f.name: _ARROW_TYPES[f.kind] for f in fields if f}

    def locate(fallback: str) -> EventLogError:
        problem = _find_bad_line(path, lambda s: s.split(delimiter), fields, header_lines, layout)
        return _malformed(path, problem or fallback, "fix or delete that line.")

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
        raise EventLogError(f"{path} has a header but no events; expected rows of {layout}.")
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
# Loaders
# ---------------------------------------------------------------------------------------------

_ML1M_LAYOUT = "UserID::MovieID::Rating::Timestamp"


def load_movielens_1m(data_dir: PathLike) -> EventLog:
    """Loads GroupLens ML-1M: `ratings.dat` and, when present, `movies.dat` genres."""
    data_dir = pathlib.Path(data_dir)
    ratings_path = data_dir / "ratings.dat"
    if not ratings_path.is_file():
        raise EventLogError(
            f"{ratings_path} not found; point data_dir at the unzipped GroupLens ml-1m directory "
            "(https://grouplens.org/datasets/movielens/1m/)."
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
    where = _Where(str(ratings_path), ratings_path)
    return _build_event_log(
        columns["user"],
        columns["item"],
        columns["timestamp"],
        columns["rating"],
        None,
        category,
        where,
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
                raise _malformed(
                    path,
                    f"line {number}: expected MovieID::Title::Genres, found {line!r}",
                    "fix or delete that line.",
                )
            movie_ids.append(int(movie_id))
            genres.append(genre_list.split("|")[0].strip())
    return movie_ids, genres


_RECBOLE_NUMERIC = ("float", "float_seq")
_RECBOLE_COLUMNS = dict(user_id="user", item_id="item", timestamp="timestamp")
_RECBOLE_OPTIONAL = dict(rating="rating", label="label")


def _recbole_header(path: pathlib.Path, required: Sequence[str]) -> list[tuple[str, str]]:
    """[(name, type)] from a RecBole atomic header like `user_id:token\\titem_id:token`."""
    if not path.is_file():
        raise EventLogError(f"{path} not found; expected a RecBole atomic file there.")
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline().rstrip("\r\n")
    if not header:
        raise EventLogError(f"{path} is empty; expected a typed header such as user_id:token.")
    columns = [tuple(c.rsplit(":", 1)) if ":" in c else (c, "") for c in header.split("\t")]
    names = [name for name, _ in columns]
    missing = [name for name in required if name not in names]
    if missing:
        raise EventLogError(
            f"{path} line 1: missing column(s) {missing}; found {names}. A RecBole header names "
            "each tab-separated column as name:type, e.g. user_id:token."
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


def load_recbole_atomic(data_dir: PathLike, name: str) -> EventLog:
    """Loads RecBole atomic files `<name>.inter` (and `<name>.item` genres, if present).

    `.inter` must have user_id, item_id and timestamp columns, and may have rating or label;
    the first token of the `.item` file's `class:token_seq` column becomes the category.
    """
    data_dir = pathlib.Path(data_dir)
    inter_path = data_dir / f"{name}.inter"
    header = _recbole_header(inter_path, list(_RECBOLE_COLUMNS))
    wanted = {**_RECBOLE_COLUMNS, **_RECBOLE_OPTIONAL}
    layout = _recbole_layout(header)
    columns = _read_delimited(inter_path, "\t", _recbole_fields(header, wanted), 1, layout)
    item_path = data_dir / f"{name}.item"
    category = _recbole_item_categories(item_path, columns["item"]) if item_path.is_file() else None
    return _build_event_log(
        columns["user"],
        columns["item"],
        columns["timestamp"],
        columns.get("rating"),
        columns.get("label"),
        category,
        _Where(str(inter_path), inter_path, header_lines=1),
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


_TABLE_REQUIRED = ("user", "item", "timestamp")
_TABLE_OPTIONAL = ("rating", "label", "category")
_TABLE_TYPES = dict(
    user=pa.string(),
    item=pa.string(),
    rating=pa.float64(),
    label=pa.float64(),
    category=pa.string(),
)


def _check_table_columns(path: pathlib.Path, found: Sequence[str], where: str) -> list[str]:
    missing = [c for c in _TABLE_REQUIRED if c not in found]
    if missing:
        raise EventLogError(
            f"{path} {where}: missing column(s) {missing}; found {list(found)}. A table needs "
            "columns user,item,timestamp and optionally rating or label, and category."
        )
    return [c for c in (*_TABLE_REQUIRED, *_TABLE_OPTIONAL) if c in found]


def _table_field(name: str) -> _Field | None:
    if name not in (*_TABLE_REQUIRED, *_TABLE_OPTIONAL):
        return None
    kind = "str" if name in ("user", "item", "category") else "float"
    return _Field(name, kind, required=name in _TABLE_REQUIRED)


def _read_csv_table(path: pathlib.Path) -> tuple[pa.Table, _Where]:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        header = next(csv.reader(f), [])
    if not header:
        raise EventLogError(f"{path} is empty; expected a header line user,item,timestamp.")
    names = _check_table_columns(path, header, "line 1")
    fields = [_table_field(name) for name in header]
    types = {name: _TABLE_TYPES[name] for name in names if name in _TABLE_TYPES}
    try:
        table = pa_csv.read_csv(
            path,
            convert_options=pa_csv.ConvertOptions(
                column_types=types, include_columns=names, strings_can_be_null=True
            ),
        )
    except pa.ArrowInvalid as e:
        split = lambda line: next(csv.reader([line]))
        problem = _find_bad_line(path, split, fields, 1, ",".join(header))
        detail = problem or f"could not be parsed ({e})"
        raise _malformed(path, detail, "fix or delete that line.") from None
    return table, _Where(str(path), path, header_lines=1)


def _read_parquet_table(path: pathlib.Path) -> tuple[pa.Table, _Where]:
    names = _check_table_columns(path, pq.read_schema(path).names, "schema")
    return pq.read_table(path, columns=names), _Where(str(path))


def _table_time(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Datetime columns become int64 epoch seconds; numbers pass through."""
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        return pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64())
    return column


def load_table(path: PathLike) -> EventLog:
    """Loads a CSV (`.csv`) or Parquet (`.parquet`, `.pq`) table of events.

    Columns: user, item, timestamp (seconds or datetime); optional rating or label; optional
    category ('A|B' uses the first part). Other columns are ignored.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise EventLogError(f"{path} not found; pass the path of a .csv or .parquet file.")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        table, where = _read_csv_table(path)
    elif suffix in (".parquet", ".pq"):
        table, where = _read_parquet_table(path)
    else:
        raise EventLogError(f"{path}: unknown table suffix {suffix!r}; use .csv or .parquet.")
    if table.num_rows == 0:
        raise EventLogError(f"{path} has a header but no events.")
    for name in _TABLE_REQUIRED:
        if table[name].null_count:
            row = _first_row(np.asarray(table[name].is_null()))
            raise EventLogError(f"{where(row)}: empty {name} field; fill or delete that row.")
    columns = {name: _to_numpy(table[name]) for name in table.column_names if name != "timestamp"}
    time = _table_time(table["timestamp"])
    if pa.types.is_string(time.type):
        time = time.to_numpy(zero_copy_only=False)  # Rejected with its row by `_as_float`.
    else:
        time = _to_numpy(time)
    category = columns.get("category")
    if category is not None and category.dtype.kind == "U":
        category = np.char.partition(category, "|")[:, 0]
    return _build_event_log(
        columns["user"],
        columns["item"],
        time,
        columns.get("rating"),
        columns.get("label"),
        category,
        where,
    )


LOADERS = ("movielens_1m", "recbole_atomic", "table")


def load_event_log(kind: str, path: PathLike) -> EventLog:
    """Loads an event log of a given kind: one of `LOADERS`.

    For "recbole_atomic", `path` is the `.inter` file or its directory (whose name is the
    dataset name, as in `ml-100k/ml-100k.inter`).
    """
    path = pathlib.Path(path)
    if kind == "movielens_1m":
        return load_movielens_1m(path)
    if kind == "recbole_atomic":
        if path.suffix == ".inter":
            return load_recbole_atomic(path.parent, path.stem)
        return load_recbole_atomic(path, path.name)
    if kind == "table":
        return load_table(path)
    raise EventLogError(f"unknown event log kind {kind!r}; use one of {LOADERS}.")


__all__ = [
    "EventLog",
    "EventLogError",
    "from_columns",
    "gap_buckets",
    "load_event_log",
    "load_movielens_1m",
    "load_recbole_atomic",
    "load_table",
]

"""What the loaders share: data paths, the vectorized delimited-text reader, and the hand-off.

`read_delimited` parses with pyarrow; only when that fails is the file re-scanned line by line
(`text_scan`) to name the bad line.
"""

from __future__ import annotations

import io
import pathlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from vista_jax.data.eventlog import EventLog, EventLogError, EventLogOptions, Where, from_columns
from vista_jax.data.loaders import text_scan
from vista_jax.data.loaders.text_scan import Field

PathLike = str | pathlib.Path

# What `--config.data.path` must name for each kind (in error messages).
EXPECTED_PATH = {
    "movielens_1m": "the unzipped GroupLens ml-1m directory holding ratings.dat",
    "recbole_atomic": "a RecBole .inter file, or the directory <name>/ holding <name>.inter",
    "table": "a .csv or .parquet file",
}
_ARROW_TYPES = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}


def existing_path(path: PathLike | None, kind: str) -> pathlib.Path:
    """`path` as a Path; refuses a missing (empty) or non-existent path."""
    if path is None or not str(path).strip():
        raise EventLogError(
            f"no data path given for data kind {kind!r}. Fix: --config.data.path is required; "
            f"set it to {EXPECTED_PATH[kind]}."
        )
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise EventLogError(
            f"{path} does not exist. Fix: check --config.data.path; it must name "
            f"{EXPECTED_PATH[kind]}."
        )
    return path


def existing_dir(path: PathLike | None, kind: str) -> pathlib.Path:
    """Like `existing_path`, and refuses a file."""
    path = existing_path(path, kind)
    if not path.is_dir():
        raise EventLogError(
            f"{path} is a file, but data kind {kind!r} reads a directory. Fix: set "
            f"--config.data.path to {EXPECTED_PATH[kind]} (e.g. {path.parent})."
        )
    return path


def read_delimited(
    path: pathlib.Path,
    delimiter: str,
    fields: Sequence[Field | None],
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
        bad_line = text_scan.find_bad_line(path, split, fields, header_lines, layout)
        return text_scan.malformed(path, bad_line, fallback)

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
    return {name: to_numpy(table[name]) for name in kept}


def to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A pyarrow column as numpy: strings with "" for null, numbers with NaN for null."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        # Unknown (null) strings become "", the missing marker `from_columns` understands.
        return np.asarray(column.fill_null("").to_numpy(zero_copy_only=False)).astype(str)
    if column.null_count:
        column = column.cast(pa.float64())  # Nulls -> NaN, rejected or read as missing later.
    return column.to_numpy()


def categories_for_items(event_items: np.ndarray, table_items, table_categories) -> np.ndarray:
    """Per-event category looked up from an item table ("" for items not in it)."""
    lookup = dict(zip(table_items, table_categories, strict=True))
    uniques, inverse = np.unique(event_items, return_inverse=True)
    per_item = np.array([lookup.get(item, "") for item in uniques.tolist()] + [""])
    return per_item[:-1][inverse] if len(uniques) else per_item[:0]


def to_event_log(
    columns: dict[str, np.ndarray], source: Where, options: EventLogOptions
) -> EventLog:
    """`from_columns` on columns named user, item, timestamp and any of rating/label/category."""
    return from_columns(
        columns["user"],
        columns["item"],
        columns["timestamp"],
        rating=columns.get("rating"),
        label=columns.get("label"),
        category=columns.get("category"),
        source=source,
        options=options,
    )

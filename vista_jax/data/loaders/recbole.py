"""RecBole atomic files: `<name>.inter` events and, when present, `<name>.item` genres."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np

from vista_jax.data.eventlog import DEFAULT_OPTIONS, EventLog, EventLogError, EventLogOptions
from vista_jax.data.loaders import common, text_scan
from vista_jax.data.loaders.text_scan import Field

_NUMERIC = ("float", "float_seq")
_COLUMNS = dict(user_id="user", item_id="item", timestamp="timestamp")
_OPTIONAL = dict(rating="rating", label="label")

Header = list[tuple[str, str]]  # [(name, type)] of each tab-separated column.


def _read_header(path: pathlib.Path, required: Sequence[str]) -> Header:
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
    if "\t" not in header:
        fix = "convert it to tabs, with a header such as user_id:token<TAB>item_id:token."
        text_scan.check_delimiter(path, header, "\t", "RecBole atomic files", fix)
    columns = [tuple(c.rsplit(":", 1)) if ":" in c else (c, "") for c in header.split("\t")]
    names = [name for name, _ in columns]
    missing = [name for name in required if name not in names]
    if missing:
        raise EventLogError(
            f"{path} line 1: missing column(s) {missing}; found {names}. Fix: a RecBole header "
            "names each tab-separated column as name:type, e.g. user_id:token."
        )
    return columns


def _read_columns(path: pathlib.Path, header: Header, wanted: dict[str, str]):
    """The `wanted` columns (RecBole name -> our name) of an atomic file, as numpy."""
    fields: list[Field | None] = []
    for name, kind in header:
        if name not in wanted:
            fields.append(None)
            continue
        required = name in _COLUMNS or name in _OPTIONAL
        fields.append(Field(wanted[name], "float" if kind in _NUMERIC else "str", required))
    layout = "tab-separated " + ", ".join(f"{name}:{kind}" for name, kind in header)
    return common.read_delimited(path, "\t", fields, 1, layout)


def load_recbole_atomic(
    data_dir: common.PathLike, name: str, options: EventLogOptions = DEFAULT_OPTIONS
) -> EventLog:
    """Loads RecBole atomic files `<name>.inter` (and `<name>.item` genres, if present).

    `.inter` must have user_id, item_id and timestamp columns, and may have rating or label;
    the first token of the `.item` file's `class:token_seq` column becomes the category.
    """
    data_dir = common.existing_dir(data_dir, "recbole_atomic")
    inter_path = data_dir / f"{name}.inter"
    header = _read_header(inter_path, list(_COLUMNS))
    columns = _read_columns(inter_path, header, {**_COLUMNS, **_OPTIONAL})
    item_path = data_dir / f"{name}.item"
    if item_path.is_file():
        columns["category"] = _item_categories(item_path, columns["item"])
    return common.to_event_log(columns, text_scan.where_in_text(inter_path, 1), options)


def _item_categories(path: pathlib.Path, event_items: np.ndarray) -> np.ndarray | None:
    """Per-event first token of the `.item` file's class column; None without that column."""
    header = _read_header(path, ["item_id"])
    if "class" not in [name for name, _ in header]:
        return None
    # Only item_id is required; class may be empty.
    columns = _read_columns(path, header, {"item_id": "item", "class": "class"})
    first_class = [c.split(" ", 1)[0] for c in columns["class"].tolist()]
    return common.categories_for_items(event_items, columns["item"].tolist(), first_class)


def load_recbole_path(
    path: common.PathLike, options: EventLogOptions = DEFAULT_OPTIONS
) -> EventLog:
    """RecBole from the `.inter` file or its directory (named like the dataset)."""
    path = common.existing_path(path, "recbole_atomic")
    if path.is_dir():
        return load_recbole_atomic(path, path.name, options)
    if path.suffix != ".inter":
        raise EventLogError(
            f"{path} is a file but not a RecBole .inter file. Fix: set --config.data.path to "
            f"{common.EXPECTED_PATH['recbole_atomic']}."
        )
    return load_recbole_atomic(path.parent, path.stem, options)

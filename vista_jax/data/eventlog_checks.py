"""Checks of raw event columns for `eventlog.from_columns`, and how their problems are named.

Each check refuses bad data with an `EventLogError` that names the source and the row or file
line (a `Where`) and ends with "Fix: <what to do>", and returns the column in its checked form.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from vista_jax.errors import DataError

UNKNOWN_CATEGORY = "<unknown>"
TIME_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}  # Per second.
# Seconds since the epoch above this (the year 5138) are taken to be milliseconds.
MILLISECONDS_THRESHOLD = 1e11
BOOLEAN_RATING_FIX = "put binary feedback in a `label` column (0/1) instead of `rating`."


class EventLogError(DataError):
    """Bad event data: the message says what was wrong, where, and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Where:
    """Names the source of the rows and the place of a 0-based row in error messages."""

    source: str  # E.g. the file path.
    line_of_row: Callable[[int], int] | None = None  # 1-based file line of a row (text files).

    @property
    def noun(self) -> str:
        """What a row is called: "line" in text files, "row" otherwise."""
        return "row" if self.line_of_row is None else "line"

    def at(self, row: int) -> str:
        """'line 7' for text files, 'row 7' (1-based) otherwise."""
        if self.line_of_row is None:
            return f"row {row + 1}"
        return f"line {self.line_of_row(row)}"

    def __call__(self, row: int) -> str:
        return f"{self.source} {self.at(row)}"


def check_shapes(where: Where, **columns) -> None:
    """Refuses an empty log, columns of different lengths, and rating with label."""
    n = len(columns["user"])
    if n == 0:
        raise EventLogError(f"{where.source}: no events. Fix: give the log at least one event.")
    lengths = {name: len(column) for name, column in columns.items() if column is not None}
    if len(set(lengths.values())) != 1:
        raise EventLogError(
            f"{where.source}: columns differ in length {lengths}. Fix: pass columns of one length."
        )
    if columns["rating"] is not None and columns["label"] is not None:
        raise EventLogError(
            f"{where.source}: got both rating and label. Fix: keep one of them (the action id "
            "comes from a graded rating or a binary 0/1 label, not both)."
        )


def _first_row(bad: np.ndarray) -> int:
    return int(np.argmax(bad))


def _show(value: Any) -> str:
    """repr of a value as the user wrote it (no `np.float64(...)` wrapper)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def is_number(value: Any) -> bool:
    """Whether `float(value)` works."""
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _as_float(column: np.ndarray, name: str, where: Where) -> np.ndarray:
    try:
        return np.asarray(column, np.float64)
    except (TypeError, ValueError):
        for row, value in enumerate(column.tolist()):
            if not is_number(value):
                raise EventLogError(
                    f"{where(row)}: {name} {value!r} is not a number. Fix: correct or delete "
                    f"that {where.noun}."
                ) from None
        raise


def validated_time(time: np.ndarray, where: Where, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """(timestamps in `unit` for sorting, timestamps in whole seconds), both int64."""
    if time.dtype.kind not in "iu":
        as_float = _as_float(time, "timestamp", where)
        bad = ~np.isfinite(as_float) | (as_float != np.floor(as_float)) | (abs(as_float) >= 2**62)
        if bad.any():
            row = _first_row(bad)
            raise EventLogError(
                f"{where(row)}: timestamp {_show(as_float[row])} is not a whole number "
                f"(time_unit={unit!r}). Fix: write timestamps as finite integers since the "
                "epoch, in seconds or, with --config.data.time_unit=ms, milliseconds."
            )
        time = as_float
    time = time.astype(np.int64)
    if (time < 0).any():
        row = _first_row(time < 0)
        raise EventLogError(
            f"{where(row)}: timestamp {_show(time[row])} is negative. Fix: timestamps count "
            f"time since 1970-01-01 UTC; correct or delete that {where.noun}."
        )
    if unit == "s" and np.median(time) > MILLISECONDS_THRESHOLD:
        row = _first_row(time > MILLISECONDS_THRESHOLD)
        raise EventLogError(
            f"{where.source}: the timestamp column looks like milliseconds (median "
            f"{np.median(time):.4g}; {where.at(row)} has {time[row]}), but it is read as "
            "seconds. Fix: pass --config.data.time_unit=ms (it converts them to seconds)."
        )
    return time, time // TIME_UNITS[unit]


def validated_rating(rating, where: Where, scale: tuple[float, float]) -> np.ndarray:
    """Finite float32 ratings within `scale`."""
    rating = np.asarray(rating)
    if rating.dtype.kind == "b":
        raise EventLogError(
            f"{where.source}: the rating column holds booleans (true/false). Fix: "
            + BOOLEAN_RATING_FIX
        )
    rating = _as_float(rating, "rating", where)
    bad = ~np.isfinite(rating)
    if bad.any():
        row = _first_row(bad)
        raise EventLogError(
            f"{where(row)}: rating {_show(rating[row])} is not finite. Fix: correct or delete "
            f"that {where.noun}."
        )
    low, high = scale
    bad = (rating < low) | (rating > high)
    if bad.any():
        row = _first_row(bad)
        binary = " (binary 0/1 feedback belongs in a `label` column)" if rating[row] == 0 else ""
        raise EventLogError(
            f"{where(row)}: rating {rating[row]:g} is outside the rating scale {low:g}..{high:g}"
            f"{binary}. Fix: correct that {where.noun}, or set "
            "--config.data.rating_scale='(LOW, HIGH)' to the scale of your data."
        )
    return rating.astype(np.float32)


def validated_label(label, where: Where) -> np.ndarray:
    """float32 labels, each 0 or 1."""
    label = _as_float(np.asarray(label), "label", where)
    bad = (label != 0) & (label != 1)
    if bad.any():
        row = _first_row(bad)
        raise EventLogError(
            f"{where(row)}: label {_show(label[row])} is not 0 or 1. Fix: labels must be "
            "binary; put graded feedback in a `rating` column."
        )
    return label.astype(np.float32)


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


def dense_ids(
    raw: np.ndarray, name: str, where: Where, allow_mixed: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique raw ids and each row's 0-based index into them."""
    raw = np.asarray(raw)
    missing = _missing_mask(raw)
    if missing.any():
        row = _first_row(missing)
        raise EventLogError(
            f"{where(row)}: empty {name} id. Fix: fill in or delete that {where.noun}."
        )
    if raw.dtype.kind == "f":
        if (raw != np.floor(raw)).any():
            row = _first_row(raw != np.floor(raw))
            raise EventLogError(
                f"{where(row)}: {name} id {_show(raw[row])} is not an integer. Fix: ids are "
                f"integers or strings; correct that {where.noun}."
            )
        raw = raw.astype(np.int64)
    if raw.dtype.kind in "iub":
        uniques, inverse = np.unique(raw, return_inverse=True)
        return uniques.astype(np.int64), inverse.astype(np.int64)
    uniques, inverse = np.unique(raw.astype(str), return_inverse=True)  # Lexicographic.
    if not allow_mixed:
        _check_one_id_form(uniques, inverse, name, where)
    ints = _canonical_ints(uniques)
    if ints is None:
        return uniques, inverse.astype(np.int64)
    # Numeric strings ("10" < "9" lexicographically) are ranked by value instead.
    order = np.argsort(ints, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return ints[order], rank[inverse].astype(np.int64)


def _check_one_id_form(uniques: np.ndarray, inverse: np.ndarray, name: str, where: Where):
    """Refuses ids that mix numbers ("242", "-3", "007") and names ("item_242")."""
    numeric = np.char.isdigit(np.char.lstrip(uniques, "-"))
    if numeric.all() or not numeric.any():
        return
    rows = sorted([_first_row(numeric[inverse]), _first_row(~numeric[inverse])])
    a, b = (_show(uniques[inverse[row]]) for row in rows)
    raise EventLogError(
        f"{where.source}: the {name} column mixes numbers and names: {a} ({where.at(rows[0])}) "
        f"and {b} ({where.at(rows[1])}); the same {name} written both ways would become two "
        f"{name}s. Fix: write every {name} id in one form, or set "
        "--config.data.allow_mixed_ids=True if they are distinct ids."
    )


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


def dense_categories(category, item_index, raw_items, where: Where):
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
            f"event of it has {_show(earlier)}. Fix: give every event of an item the same "
            "category (for multi-genre items, the first genre)."
        )
    known = item_raw != ""
    item_category = np.zeros(len(item_raw), np.int32)
    names: tuple[str, ...] = ()
    if known.any():
        uniques, inverse = dense_ids(item_raw[known], "category", Where(where.source))
        item_category[known] = inverse + 1
        names = tuple(str(name) for name in uniques.tolist())
    return (UNKNOWN_CATEGORY, *names), item_category[item_index]


def duplicate_rows(
    order: np.ndarray, keys: list[tuple[str, np.ndarray]], policy: str, where: Where
) -> np.ndarray:
    """Mask of the rows that repeat an earlier row in every key; all False under "keep".

    `keys` start with user, time and item; `order` sorts the rows by (user, time), so
    only rows of one (user, time) run can be duplicates, and only those are sorted by every key.
    """
    n = len(order)
    duplicate = np.zeros(n, bool)
    if policy == "keep":
        return duplicate
    user, time, item = (column[order] for _, column in keys[:3])
    new_run = np.r_[True, (user[1:] != user[:-1]) | (time[1:] != time[:-1])]
    # Rows of one (user, time) run with the same item: the only candidates, few in practice.
    run_item = (np.cumsum(new_run) - 1) * (int(item.max()) + 1) + item
    by_run_item = np.argsort(run_item, kind="stable")
    tie = run_item[by_run_item][1:] == run_item[by_run_item][:-1]
    rows = order[by_run_item[np.r_[tie, False] | np.r_[False, tie]]]
    # Sorted by every key, then by row, so a run of equal rows starts at its first occurrence.
    rows = rows[np.lexsort([rows] + [column[rows] for _, column in reversed(keys)])]
    same = np.ones(max(len(rows) - 1, 0), bool)
    for _, column in keys:
        same &= column[rows][1:] == column[rows][:-1]
    if not same.any():
        return duplicate
    run_start = np.maximum.accumulate(np.where(np.r_[False, same], 0, np.arange(len(rows))))
    original = np.arange(n)
    original[rows] = rows[run_start]  # Row -> the first row equal to it.
    duplicate = original != np.arange(n)
    _report_duplicates(duplicate, original, [name for name, _ in keys], policy, where)
    return duplicate


def _report_duplicates(duplicate, original, names: list[str], policy: str, where: Where):
    """Refuses duplicates under policy "error"; reports them on stderr under "drop"."""
    row = _first_row(duplicate)
    what = f"{int(duplicate.sum())} exact duplicate event(s) (same {', '.join(names)})"
    first = f"the first is {where.at(row)}, a copy of {where.at(int(original[row]))}"
    if policy == "error":
        raise EventLogError(
            f"{where.source}: {what}; {first}. Fix: delete the duplicates, or set "
            "--config.data.duplicates=drop to drop them (or =keep to keep them)."
        )
    print(
        f"{where.source}: dropped {what}; {first}. Set --config.data.duplicates=keep to keep "
        "them or =error to refuse them.",
        file=sys.stderr,
    )

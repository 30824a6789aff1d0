"""Text files on the error path: find the bad line and name it.

Loaders parse text vectorized; only when that fails (or finds an empty field) is the file
re-scanned here, so the message can name the file and the 1-based line number.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import pathlib
from collections.abc import Callable, Iterator, Sequence

from vista_jax.data.eventlog import EventLogError, Where
from vista_jax.data.eventlog_checks import BOOLEAN_RATING_FIX

FIX_LINE = "correct or delete that line."
_DELIMITER_NAMES = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}


def text_lines(path: pathlib.Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each non-blank line, as pyarrow counts rows."""
    with open(path, encoding=encoding, errors="replace", newline="") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if line:
                yield number, line


def _line_of_row(path: pathlib.Path, row: int, header_lines: int) -> int:
    for index, (number, _) in enumerate(text_lines(path)):
        if index == row + header_lines:
            return number
    return -1


def where_in_text(path: pathlib.Path, header_lines: int) -> Where:
    """Names rows of a text file by their file line."""
    return Where(str(path), functools.partial(_line_of_row, path, header_lines=header_lines))


@dataclasses.dataclass(frozen=True)
class Field:
    """One column of a delimited text file."""

    name: str  # Name in error messages, e.g. "timestamp".
    kind: str  # "int", "float" or "str".
    required: bool = True  # Required fields may not be empty.


def _field_problem(field: Field, value: str) -> tuple[str, str] | None:
    """(problem, fix) of one field's text, or None."""
    if not value:
        return (f"empty {field.name} field", FIX_LINE) if field.required else None
    try:
        if field.kind == "int":
            int(value)
        elif field.kind == "float":
            float(value)
    except ValueError:
        if field.name == "rating" and value.strip().lower() in ("true", "false"):
            return f"rating {value!r} is a boolean", BOOLEAN_RATING_FIX
        expected = "an integer" if field.kind == "int" else "a number"
        return f"{field.name} {value!r} is not {expected}", FIX_LINE
    return None


def find_bad_line(
    path: pathlib.Path,
    split_line: Callable[[str], list[str]],
    fields: Sequence[Field | None],
    header_lines: int,
    layout: str,
) -> tuple[str, str] | None:
    """('line N: problem', fix) for the first malformed line; None if every line parses."""
    for index, (number, line) in enumerate(text_lines(path)):
        if index < header_lines:
            continue
        values = split_line(line)
        if len(values) != len(fields):
            problem = f"expected {len(fields)} fields ({layout}), found {len(values)}"
            return f"line {number}: {problem}", FIX_LINE
        for field, value in zip(fields, values, strict=True):
            problem = field and _field_problem(field, value)
            if problem:
                return f"line {number}: {problem[0]}", problem[1]
    return None


def malformed(path, bad_line: tuple[str, str] | None, fallback: str) -> EventLogError:
    """The error for `bad_line` (from `find_bad_line`), or `fallback` if none was found."""
    detail, fix = bad_line or (fallback, FIX_LINE)
    return EventLogError(f"{path} {detail}. Fix: {fix}")


def _other_delimiter(line: str, expected: str) -> str | None:
    """The most frequent likely delimiter in `line` other than `expected`, if any."""
    counts = collections.Counter(c for c in line if c in _DELIMITER_NAMES and c != expected)
    return counts.most_common(1)[0][0] if counts else None


def check_delimiter(path, header: str, expected: str, fmt: str, fix: str) -> None:
    """Refuses a header read as one column that holds a likely delimiter other than `expected`."""
    found = _other_delimiter(header, expected)
    if found is None:
        return
    raise EventLogError(
        f"{path} line 1: the header {header!r} reads as one column: the file looks "
        f"{_DELIMITER_NAMES[found]}-separated, but {fmt} must be "
        f"{_DELIMITER_NAMES[expected]}-separated. Fix: {fix}"
    )

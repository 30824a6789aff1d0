"""Event-log file formats: GroupLens ML-1M, RecBole atomic files, CSV/Parquet tables.

Each loader (one module per format) parses its format into plain columns and hands them to
`vista_jax.data.eventlog.from_columns`, which validates them. Parsing is vectorized (pyarrow);
a malformed text file is re-scanned line by line only on the error path (`text_scan`), so that
the message can name the file and the 1-based line number. Every problem is an `EventLogError`
whose message names the file, the line or column, and ends with "Fix: <what to do>".

    log = load_event_log("table", "events.csv", EventLogOptions(time_unit="ms"))
"""

from __future__ import annotations

from collections.abc import Callable

from vista_jax.data.eventlog import DEFAULT_OPTIONS, EventLog, EventLogError, EventLogOptions
from vista_jax.data.loaders.common import PathLike, existing_path
from vista_jax.data.loaders.movielens import load_movielens_1m
from vista_jax.data.loaders.recbole import load_recbole_atomic, load_recbole_path
from vista_jax.data.loaders.table import load_table

LOADERS: dict[str, Callable[..., EventLog]] = {
    "movielens_1m": load_movielens_1m,
    "recbole_atomic": load_recbole_path,
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
    return LOADERS[kind](existing_path(path, kind), options or DEFAULT_OPTIONS)


__all__ = [
    "LOADERS",
    "load_event_log",
    "load_movielens_1m",
    "load_recbole_atomic",
    "load_table",
]

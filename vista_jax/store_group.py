"""Several processes writing one summary-store version: a multi-host cache build.

Every process of the group calls `SummaryStore.write_version` with the same arguments but
its own rows, `row_range(...)`: whole shards (layout "rows") or chunks ("plain"), so no two
processes ever write one file. The protocol of `vista_jax.store_layout` then runs once, for
the group:

  1. process 0 names the write attempt; every process writes its rows under that prefix;
  2. `combine_written` gathers what each wrote (a barrier: every write has completed), and
     any process's failure fails them all, before anything is published;
  3. process 0 alone creates the manifest and moves CURRENT (`on_primary`), and every
     process returns its outcome.

A group of one (`SINGLE`) is the single-process build, step for step. The group's
collectives are injected (`Group`; `vista_jax.distributed.ProcessGroup` over
`jax.distributed`), so the store itself does not depend on JAX. The layout "ocdbt" (one
database that a single writer commits to) cannot be written by a group.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any, Protocol

from vista_jax.store_layout import SummaryStoreError


class Group(Protocol):
    """The processes writing one version together; payloads are JSON-able dicts."""

    index: int  # this process, 0..count-1; process 0 publishes
    count: int

    def broadcast(self, payload: dict) -> dict:
        """Process 0's payload, on every process."""
        ...

    def gather(self, payload: dict) -> list[dict]:
        """Every process's payload in process order, on every process (a barrier too)."""
        ...


@dataclasses.dataclass(frozen=True)
class SingleProcess:
    index: int = 0
    count: int = 1

    def broadcast(self, payload: dict) -> dict:
        return payload

    def gather(self, payload: dict) -> list[dict]:
        return [payload]


SINGLE = SingleProcess()


def row_range(num_rows: int, chunk_rows: int, index: int, count: int) -> range:
    """The rows process `index` of `count` writes: a contiguous run of whole shards of
    `chunk_rows` rows (the last may be short). Process 0's is never empty; with fewer
    shards than processes, the last processes get none."""
    shards = -(-num_rows // chunk_rows)
    bound = lambda i: min(num_rows, -(-i * shards // count) * chunk_rows)  # noqa: E731
    return range(bound(index), bound(index + 1))


def on_primary(group: Group, fn: Callable[[], Any]) -> Any:
    """`fn()` run on process 0, its (JSON) result on every process. An error there raises
    on every process (as itself on process 0) instead of leaving the others waiting."""
    if group.count == 1:
        return fn()
    result, error = None, None
    if group.index == 0:
        try:
            result = fn()
        except Exception as e:  # Reported to every process, then raised here.
            error = e
    shared = group.broadcast({"result": result, "error": _describe(error)})
    if error is not None:
        raise error
    if shared["error"] is not None:
        raise SummaryStoreError(
            f"process 0 failed to publish the version: {shared['error']}. Fix: see process "
            "0's log; rerun the build (an identical rerun completes the publication)"
        )
    return shared["result"]


def combine_written(group: Group, written, error: Exception | None):
    """Every process's `store_write.WrittenArrays` (None for a process without rows) ->
    the version's, on process 0 (elsewhere the process's own). Raises on every process if
    any failed; nothing is published then. Also the barrier after the last write."""
    if group.count == 1:
        if error is not None:
            raise error
        return written
    mine = {"error": _describe(error), "rows": written is not None}
    if written is not None:
        mine |= {
            "digest": written.digest,
            "present_rows": written.present_rows,
            "newest_time": written.newest_time,
        }
    everyone = group.gather(mine)
    if error is not None:
        raise error
    failed = [(i, p["error"]) for i, p in enumerate(everyone) if p["error"] is not None]
    if failed:
        i, message = failed[0]
        raise SummaryStoreError(
            f"process {i} of {group.count} failed writing its rows ({message}); nothing was "
            "published. Fix: see that process's log, then rerun the build"
        )
    if group.index != 0:
        return written
    wrote = [p for p in everyone if p["rows"]]
    newest = [p["newest_time"] for p in wrote if p["newest_time"] is not None]
    digest = hashlib.sha256("".join(p["digest"] for p in wrote).encode()).hexdigest()
    return written._replace(
        digest=digest,
        present_rows=sum(p["present_rows"] for p in wrote),
        newest_time=max(newest) if newest else None,
    )


def _describe(error: Exception | None) -> str | None:
    if error is None:
        return None
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}"

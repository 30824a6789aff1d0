"""Row-block writing of a summary store version's arrays (before its manifest publishes it).

A version's arrays are created, under the prefix of one write attempt, from its first
`RowBlock`; then every block is validated, encoded (`vista_jax.quantize`), hashed and
written, one block at a time, so memory stays bounded by a block however large the build.
The digest of what was written (row ids and stored values, in block order) goes into the
manifest's content hash, by which an identical rerun is recognised. Nothing here publishes:
`write_attempt` then creates the manifest, only if absent; `vista_jax.store` moves CURRENT.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

import numpy as np
import tensorstore as ts

from vista_jax import store_group
from vista_jax.quantize import STORED_DTYPE, encode
from vista_jax.store_layout import (
    CORE_ARRAYS,
    NO_EVENTS,
    UNKNOWN_TIME,
    SummaryStoreError,
    array_kvstore,
    attempt_prefix,
    build_manifest,
    check_name,
    create_manifest,
    delete_prefix,
    describe,
    new_attempt_id,
    order_key,
    prune_empty_dirs,
    read_manifest,
)
from vista_jax.store_refresh import ROW_MAP_KEY, encode_map
from vista_jax.store_rows import (
    ROW_ARRAY,
    ShardBuffer,
    pack,
    record_dtype,
    record_fields,
    sharded_spec,
)

_clock_lock = threading.Lock()
_last_clock = 0  # the last build clock of this process: its builds order by start
_log = logging.getLogger(__name__)


class RowBlock(NamedTuple):
    """Summaries of a block of rows, the unit of a streaming cache build."""

    row_ids: np.ndarray  # [b] int, distinct, in [0, num_rows)
    summaries: np.ndarray  # [b, K, D] float32
    coverage: np.ndarray  # [b] int64: events of the row's user the summary covers
    extras: Mapping[str, np.ndarray] | None = None  # name -> [b, ...]
    # [b] int64: time of the last event each row covers (store_layout.NO_EVENTS: none);
    # None stamps the rows UNKNOWN_TIME, which point-in-time reads never pick.
    event_time: np.ndarray | None = None


class Lineage(NamedTuple):
    """What a build knows of its inputs, beyond what its rows say (see the manifest)."""

    summarizer_checkpoint: str = ""  # path of the checkpoint the summarizer came from
    data_fingerprint: str = ""  # of the dataset the rows were computed from
    watermark: int | None = None  # newest event time the build read; None: newest covered


def as_blocks(
    summaries, coverage, extra_arrays, row_ids, num_rows, block_rows, event_time=None
) -> tuple[Iterable[RowBlock], int]:
    """Whole arrays -> (blocks of rows, num_rows); an iterable of RowBlock passes through."""
    if not isinstance(summaries, np.ndarray) and not hasattr(summaries, "__array__"):
        given = (coverage, extra_arrays, row_ids, event_time)
        if any(x is not None for x in given):
            raise ValueError(
                "with block input, coverage/extras/row ids/event_time go inside each RowBlock"
            )
        if num_rows is None:
            raise ValueError("num_rows is required when summaries is an iterable of RowBlock")
        return summaries, num_rows
    summaries = np.asarray(summaries)
    if coverage is None:
        raise ValueError("coverage [N] is required: it stamps what each summary covers")
    if row_ids is None:
        row_ids = np.arange(len(summaries))
    if num_rows is None:
        num_rows = int(np.max(row_ids)) + 1 if len(row_ids) else 0
    extras = dict(extra_arrays or {})

    def blocks() -> Iterator[RowBlock]:
        for start in range(0, len(summaries), block_rows):
            part = slice(start, start + block_rows)
            block_extras = {name: np.asarray(a)[part] for name, a in extras.items()}
            yield RowBlock(
                np.asarray(row_ids)[part],
                summaries[part],
                np.asarray(coverage)[part],
                block_extras,
                None if event_time is None else np.asarray(event_time)[part],
            )

    return blocks(), num_rows


class WrittenArrays(NamedTuple):
    """What `write_arrays` wrote: the manifest needs all of it."""

    schema: dict[str, tuple]  # name -> (shape, dtype) of every logical array
    digest: str  # hex digest of every row written (ids and stored values, in order)
    present_rows: int  # distinct rows written
    newest_time: int | None  # largest event time any row covers (None: no stamped row)
    row_record: dict | None  # "rows" layout: the packed record's layout


def write_arrays(
    root_spec, prefix, blocks, *, version, num_rows, quantization, chunk_rows, layout, context,
    rows: range | None = None,
) -> WrittenArrays | None:  # fmt: skip
    """Creates a version's arrays under `prefix` from its first block, then writes every
    block, one at a time (memory stays bounded by a block, and with the "rows" layout by a
    few shards).

    `rows`: this process's share of a group build (`vista_jax.store_group.row_range`); the
    arrays may exist already (another process created them), a block outside `rows` is an
    error, and a process given no blocks writes nothing (returns None)."""
    if num_rows < 1:
        raise ValueError(f"version {version!r}: need num_rows >= 1, got {num_rows}")
    blocks = iter(blocks)
    first = next(blocks, None)
    if first is None:
        if rows is not None and rows.start > 0:
            return None
        raise ValueError(f"version {version!r}: no row blocks to write")
    schema = _array_schema(first, num_rows, quantization)
    sink = _RowsSink if layout == "rows" else _ArraySink
    sink = sink(root_spec, prefix, layout, schema, num_rows, chunk_rows, context, rows is not None)
    digest = hashlib.sha256()
    written = np.zeros(num_rows, bool)
    newest = NO_EVENTS
    for block in itertools.chain([first], blocks):
        ids = _check_block(block, schema, num_rows)
        if rows is not None and len(ids) and (ids.min() < rows.start or ids.max() >= rows.stop):
            raise ValueError(
                f"rows [{ids.min()}, {ids.max()}] lie outside this process's share "
                f"[{rows.start}, {rows.stop}) of the build (store_group.row_range)"
            )
        values = _encode_block(block, ids, schema, quantization, digest)
        sink.write(ids, values)
        written[ids] = True
        stamped = values["event_time"][values["event_time"] != UNKNOWN_TIME]
        newest = max(newest, int(stamped.max(initial=NO_EVENTS)))
    sink.close()
    return WrittenArrays(
        schema,
        digest.hexdigest(),
        int(written.sum()),
        None if newest == NO_EVENTS else newest,
        sink.row_record,
    )


def _array_schema(block: RowBlock, num_rows: int, quantization: str) -> dict[str, tuple]:
    """Name -> (shape, dtype) of every array of a version, from its first block."""
    if block.summaries.ndim != 3:
        raise ValueError(f"summaries must be [b, K, D], got shape {block.summaries.shape}")
    _, k, d = block.summaries.shape
    schema = {
        "summary": ((num_rows, k, d), STORED_DTYPE[quantization]),
        "present": ((num_rows,), np.dtype(np.uint8)),
        "coverage": ((num_rows,), np.dtype(np.int64)),
        "event_time": ((num_rows,), np.dtype(np.int64)),
    }
    if quantization == "int8":
        schema["scale"] = ((num_rows, k), np.dtype(np.float32))
    for name, values in (block.extras or {}).items():
        check_name("extra array name", name)
        if name in CORE_ARRAYS or name == ROW_ARRAY:
            raise ValueError(f"extra array name {name!r} clashes with a core array")
        values = np.asarray(values)
        schema[name] = ((num_rows, *values.shape[1:]), values.dtype)
    return schema


def _create_array(
    kvstore: dict, shape: tuple, dtype: np.dtype, chunk_rows: int, context, shared=False
):
    chunk = [min(chunk_rows, shape[0])] + [max(1, s) for s in shape[1:]]
    spec = {
        "driver": "zarr3",
        "kvstore": kvstore,
        "metadata": {
            "shape": list(shape),
            "data_type": ts.dtype(dtype).name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
        },
    }
    return ts.open(spec, create=True, open=shared, context=context).result()


def _check_block(block: RowBlock, schema: dict[str, tuple], num_rows: int) -> np.ndarray:
    """Validates one block against the version's schema; returns its row ids as int64."""
    ids = np.asarray(block.row_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"row_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= num_rows):
        raise ValueError(f"row ids must lie in [0, {num_rows}), got [{ids.min()}, {ids.max()}]")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("row ids within a block must be distinct")
    expected = {"summary": block.summaries, "coverage": block.coverage, **(block.extras or {})}
    if block.event_time is not None:
        expected["event_time"] = block.event_time
    extra_names = set(schema) - set(CORE_ARRAYS)
    if set(block.extras or {}) != extra_names:
        raise ValueError(f"block extras {sorted(block.extras or {})} != {sorted(extra_names)}")
    for name, values in expected.items():
        want = (len(ids), *schema[name][0][1:])
        if np.shape(values) != want:
            raise ValueError(f"{name} of a block must have shape {want}, got {np.shape(values)}")
    if not np.all(np.isfinite(block.summaries)):
        raise ValueError(f"non-finite summaries for rows {ids[:8].tolist()}...; refusing to cache")
    return ids


def _row_index(ids: np.ndarray):
    """A slice for a contiguous ascending run of ids (one chunk-aligned write), else the ids."""
    if len(ids) and np.all(np.diff(ids) == 1):
        return slice(int(ids[0]), int(ids[-1]) + 1)
    return ids


def _encode_block(block: RowBlock, ids: np.ndarray, schema: dict, quantization: str, digest):
    """The stored values of one block, {array name: [b, ...]}, added to `digest`."""
    stored, scale = encode(np.asarray(block.summaries, np.float32), quantization)
    stamps = UNKNOWN_TIME if block.event_time is None else block.event_time
    values = {
        "summary": stored,
        "present": np.ones(len(ids), np.uint8),
        "coverage": np.asarray(block.coverage, np.int64),
        "event_time": np.broadcast_to(np.asarray(stamps, np.int64), (len(ids),)),
        # Cast on the host: TensorStore does not convert, e.g., float64 states to float32.
        **{name: np.asarray(v, schema[name][1]) for name, v in (block.extras or {}).items()},
    }
    if scale is not None:
        values["scale"] = scale
    digest.update(ids.tobytes())
    for name in sorted(values):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(values[name]).tobytes())
    return values


class _ArraySink:
    """Layouts "ocdbt" and "plain": one zarr3 array per name, chunks of `chunk_rows` rows."""

    row_record = None

    def __init__(self, root_spec, prefix, layout, schema, num_rows, chunk_rows, context, shared):
        self._arrays = {}
        for name, (shape, dtype) in schema.items():
            kvstore = array_kvstore(root_spec, prefix, layout, name)
            self._arrays[name] = _create_array(kvstore, shape, dtype, chunk_rows, context, shared)

    def write(self, ids: np.ndarray, values: dict) -> None:
        """Writes one block to every array and waits until it is committed."""
        index = _row_index(ids)
        futures = []
        for name, array in self._arrays.items():
            cast = np.ascontiguousarray(values[name], array.dtype.numpy_dtype)
            futures.append(array[index].write(cast))
        for future in futures:
            future.commit.result()

    def close(self) -> None:
        pass


class _RowsSink:
    """Layout "rows": core values packed per row into the sharded ``row`` array; extras
    as sharded arrays of their own (`vista_jax.store_rows`)."""

    def __init__(self, root_spec, prefix, layout, schema, num_rows, chunk_rows, context, shared):
        (_, k, d), stored = schema["summary"]
        self._record = record_dtype(k, d, stored, "scale" in schema)
        self.row_record = {
            "array": ROW_ARRAY,
            "row_bytes": self._record.itemsize,
            "shard_rows": int(min(chunk_rows, num_rows)),
            "fields": record_fields(self._record),
        }
        shapes = {ROW_ARRAY: ((num_rows, self._record.itemsize), np.dtype(np.uint8))}
        shapes |= {n: schema[n] for n in schema if n not in CORE_ARRAYS}
        arrays = {
            name: ts.open(
                sharded_spec(
                    array_kvstore(root_spec, prefix, layout, name), shape, dtype, chunk_rows
                ),
                create=True,
                open=shared,  # A group build: another process may have created it.
                context=context,
            ).result()
            for name, (shape, dtype) in shapes.items()
        }
        self._buffer = ShardBuffer(arrays, num_rows, chunk_rows)

    def write(self, ids: np.ndarray, values: dict) -> None:
        rows = {n: v for n, v in values.items() if n not in CORE_ARRAYS}
        self._buffer.write(ids, rows | {ROW_ARRAY: pack(values, self._record)})

    def close(self) -> None:
        self._buffer.close()


# --------------------------------------------------------------------------- attempts


def build_clock(base: ts.KvStore, current: str | None, where: str) -> int:
    """This build's order: after the wall clock, CURRENT's build and this process's last."""
    global _last_clock
    other = manifest_or_none(base, current, where)
    floor = order_key(other)[0] + 1 if other is not None else 0
    with _clock_lock:
        _last_clock = max(time.time_ns(), floor, _last_clock + 1)
        return _last_clock


def manifest_or_none(base: ts.KvStore, version: str | None, where: str) -> dict | None:
    if version is None:
        return None
    try:
        return read_manifest(base, version, where)[0]
    except SummaryStoreError:
        return None


def write_attempt(
    base, spec, version, blocks, num_rows, fields, coverage_info, clock, context, lineage,
    group: store_group.Group = store_group.SINGLE,
) -> tuple[dict, bool]:  # fmt: skip
    """Writes the arrays under a fresh attempt prefix, then creates the manifest if absent;
    returns (the published manifest, whether an identical earlier build had published it).

    In a `group` build every process writes its rows under the attempt process 0 names,
    and process 0 publishes once all have written (`vista_jax.store_group`)."""
    where = describe(spec)
    attempt = group.broadcast({"attempt": new_attempt_id(time.time_ns())})["attempt"]
    prefix = attempt_prefix(version, attempt)
    shared = group.count > 1
    rows = store_group.row_range(num_rows, fields["chunk_rows"], group.index, group.count)
    try:
        error, written = None, None
        try:
            written = write_arrays(
                spec, prefix, blocks, version=version, num_rows=num_rows, context=context,
                rows=rows if shared else None,
                **{k: fields[k] for k in ("quantization", "chunk_rows", "layout")},
            )  # fmt: skip
        except Exception as e:  # In a group, every process learns of it first.
            error = e
        written = store_group.combine_written(group, written, error)

        def publish() -> dict:
            manifest = build_manifest(
                version, written.schema, **fields, coverage_info=coverage_info,
                attempt=attempt, build_clock=clock, data_digest=written.digest,
                lineage=lineage_fields(written, lineage, version),
            )  # fmt: skip
            manifest, rerun = create_manifest(base, manifest, where)
            return {"manifest": manifest, "rerun": rerun}

        published = store_group.on_primary(group, publish)
    except BaseException:
        if group.index == 0:  # after every process stopped writing (combine_written)
            _discard_attempt(base, spec, version, prefix)
        raise
    if published["rerun"] and group.index == 0:  # a duplicate of the published one
        _discard_attempt(base, spec, version, prefix)
    return published["manifest"], published["rerun"]


def lineage_fields(written: WrittenArrays, lineage: Lineage, version: str) -> dict:
    """The manifest's ``LINEAGE_KEYS`` from what was written and what the build names."""
    watermark = lineage.watermark if lineage.watermark is not None else written.newest_time
    if watermark is not None and (written.newest_time or NO_EVENTS) > watermark:
        raise ValueError(
            f"version {version!r}: a row covers an event at time {written.newest_time}, after "
            f"the watermark {watermark}; the watermark must be >= every row's event_time"
        )
    if written.row_record is not None:
        bytes_per_row = written.row_record["row_bytes"]
    else:  # one value of every core array per row
        bytes_per_row = sum(
            int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
            for name, (shape, dtype) in written.schema.items()
            if name in CORE_ARRAYS
        )
    return {
        "summarizer_checkpoint": str(lineage.summarizer_checkpoint),
        "data_fingerprint": str(lineage.data_fingerprint),
        "present_rows": written.present_rows,
        "bytes_per_row": int(bytes_per_row),
        "watermark": None if watermark is None else int(watermark),
        "row_record": written.row_record,
    }


def _discard_attempt(base: ts.KvStore, spec: dict, version: str, prefix: str) -> None:
    """Deletes an attempt's arrays, unless a manifest publishes them after all."""
    try:
        manifest = manifest_or_none(base, version, "")
        if manifest is None or manifest.get("data") != prefix:
            delete_prefix(base, prefix)
            prune_empty_dirs(spec, prefix)
    except Exception:  # best effort: garbage collection removes it later
        _log.warning("could not delete the failed write attempt %s", prefix)


# --------------------------------------------------------------------------- refresh attempts


def version_schema(parent: dict, num_rows: int, with_extras: bool) -> dict[str, tuple]:
    """Name -> (shape, dtype) of a refresh of `parent` (its manifest) with `num_rows` rows:
    the parent's arrays, and its extras when the refresh keeps them."""
    described = {**parent["arrays"], **(parent["extra_arrays"] if with_extras else {})}
    return {
        name: ((num_rows, *meta["shape"][1:]), np.dtype(ts.dtype(meta["dtype"]).numpy_dtype))
        for name, meta in described.items()
    }


def _compact(blocks: Iterable[RowBlock], written_rows: np.ndarray) -> Iterator[RowBlock]:
    """Blocks of version row ids -> the same blocks on rows 0..T-1 of the refresh attempt."""
    for block in blocks:
        ids = np.asarray(block.row_ids, np.int64)
        compact = np.searchsorted(written_rows, ids).clip(0, len(written_rows) - 1)
        if np.any(written_rows[compact] != ids):
            raise ValueError("a refresh block writes a row outside `written_rows`")
        yield block._replace(row_ids=compact)


def write_refresh_attempt(
    base, spec, version, blocks, written_rows, schema, fields, coverage_info, clock, context,
    lineage, refresh, parent_row_record,
) -> tuple[dict, bool]:  # fmt: skip
    """Writes a refresh's own rows (compact) and its row map under a fresh attempt prefix,
    then creates the manifest if absent; returns (the published manifest, rerun).

    `refresh` holds the manifest's refresh keys but the row map's: ``segments`` (int64
    [S, 4], `vista_jax.store_refresh`) is stored under the attempt and named by its hash."""
    where = describe(spec)
    attempt = new_attempt_id(time.time_ns())
    prefix = attempt_prefix(version, attempt)
    refresh = dict(refresh)
    segments = refresh.pop("segments")
    try:
        if len(written_rows):
            written = write_arrays(
                spec, prefix, _compact(blocks, written_rows), version=version,
                num_rows=len(written_rows), context=context,
                **{k: fields[k] for k in ("quantization", "chunk_rows", "layout")},
            )  # fmt: skip
            _check_schema(written.schema, schema, version)
        else:
            written = WrittenArrays(schema, hashlib.sha256().hexdigest(), 0, None, None)
        raw, sha = encode_map(segments)
        base.write(prefix + ROW_MAP_KEY, raw).result()
        carried = int(segments[segments[:, 2] > 0, 1].sum())
        written = written._replace(
            schema=schema,
            present_rows=written.present_rows + carried,
            row_record=written.row_record or parent_row_record,
        )
        refresh |= {"rows_written": len(written_rows),
                    "row_map": {"segments": len(segments), "sha256": sha}}  # fmt: skip
        manifest = build_manifest(
            version, schema, **fields, coverage_info=coverage_info, attempt=attempt,
            build_clock=clock, data_digest=written.digest,
            lineage=lineage_fields(written, lineage, version), refresh=refresh,
        )  # fmt: skip
        manifest, rerun = create_manifest(base, manifest, where)
    except BaseException:
        _discard_attempt(base, spec, version, prefix)
        raise
    if rerun:
        _discard_attempt(base, spec, version, prefix)
    return manifest, rerun


def _check_schema(written: dict, want: dict, version: str) -> None:
    """The rows a refresh writes must have the parent's per-row shapes and dtypes."""
    got = {n: (tuple(s[1:]), np.dtype(d)) for n, (s, d) in written.items()}
    expected = {n: (tuple(s[1:]), np.dtype(d)) for n, (s, d) in want.items()}
    if got != expected:
        raise ValueError(
            f"refresh version {version!r}: rows of {got} differ from the parent's {expected}"
        )

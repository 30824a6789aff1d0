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

from vista_jax.quantize import STORED_DTYPE, encode
from vista_jax.store_layout import (
    CORE_ARRAYS,
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

_clock_lock = threading.Lock()
_last_clock = 0  # the last build clock of this process: its builds order by start
_log = logging.getLogger(__name__)


class RowBlock(NamedTuple):
    """Summaries of a block of rows, the unit of a streaming cache build."""

    row_ids: np.ndarray  # [b] int, distinct, in [0, num_rows)
    summaries: np.ndarray  # [b, K, D] float32
    coverage: np.ndarray  # [b] int64: events of the row's user the summary covers
    extras: Mapping[str, np.ndarray] | None = None  # name -> [b, ...]


def as_blocks(
    summaries, coverage, extra_arrays, row_ids, num_rows, block_rows
) -> tuple[Iterable[RowBlock], int]:
    """Whole arrays -> (blocks of rows, num_rows); an iterable of RowBlock passes through."""
    if not isinstance(summaries, np.ndarray) and not hasattr(summaries, "__array__"):
        if coverage is not None or extra_arrays is not None or row_ids is not None:
            raise ValueError("with block input, coverage/extras/row ids go inside each RowBlock")
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
            )

    return blocks(), num_rows


def write_arrays(
    root_spec, prefix, blocks, *, version, num_rows, quantization, chunk_rows, layout, context
) -> tuple[dict[str, tuple], str]:
    """Creates a version's arrays under `prefix` from its first block, then writes every
    block, one at a time (memory stays bounded by a block); returns the array schema
    {name: (shape, dtype)} and the hex digest of everything written."""
    if num_rows < 1:
        raise ValueError(f"version {version!r}: need num_rows >= 1, got {num_rows}")
    blocks = iter(blocks)
    first = next(blocks, None)
    if first is None:
        raise ValueError(f"version {version!r}: no row blocks to write")
    schema = _array_schema(first, num_rows, quantization)
    arrays = {
        name: _create_array(
            array_kvstore(root_spec, prefix, layout, name), shape, dtype, chunk_rows, context
        )
        for name, (shape, dtype) in schema.items()
    }
    digest = hashlib.sha256()
    for block in itertools.chain([first], blocks):
        ids = _check_block(block, schema, num_rows)
        _write_block(arrays, block, ids, quantization, digest)
    return schema, digest.hexdigest()


def _array_schema(block: RowBlock, num_rows: int, quantization: str) -> dict[str, tuple]:
    """Name -> (shape, dtype) of every array of a version, from its first block."""
    if block.summaries.ndim != 3:
        raise ValueError(f"summaries must be [b, K, D], got shape {block.summaries.shape}")
    _, k, d = block.summaries.shape
    schema = {
        "summary": ((num_rows, k, d), STORED_DTYPE[quantization]),
        "present": ((num_rows,), np.dtype(np.uint8)),
        "coverage": ((num_rows,), np.dtype(np.int64)),
    }
    if quantization == "int8":
        schema["scale"] = ((num_rows, k), np.dtype(np.float32))
    for name, values in (block.extras or {}).items():
        check_name("extra array name", name)
        if name in CORE_ARRAYS:
            raise ValueError(f"extra array name {name!r} clashes with a core array")
        values = np.asarray(values)
        schema[name] = ((num_rows, *values.shape[1:]), values.dtype)
    return schema


def _create_array(kvstore: dict, shape: tuple, dtype: np.dtype, chunk_rows: int, context):
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
    return ts.open(spec, create=True, context=context).result()


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


def _write_block(arrays: dict, block: RowBlock, ids: np.ndarray, quantization: str, digest):
    """Writes one block to every array, adds it to `digest`, and waits until it is committed."""
    stored, scale = encode(np.asarray(block.summaries, np.float32), quantization)
    values = {
        "summary": stored,
        "present": np.ones(len(ids), np.uint8),
        "coverage": np.asarray(block.coverage, np.int64),
        **{name: np.asarray(v) for name, v in (block.extras or {}).items()},
    }
    if scale is not None:
        values["scale"] = scale
    index = _row_index(ids)
    digest.update(ids.tobytes())
    futures = []
    for name in sorted(values):
        # Cast on the host: TensorStore does not convert, e.g., float64 states to float32.
        cast = np.ascontiguousarray(values[name], arrays[name].dtype.numpy_dtype)
        digest.update(name.encode())
        digest.update(cast.tobytes())
        futures.append(arrays[name][index].write(cast))
    for future in futures:
        future.commit.result()


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
    base, spec, version, blocks, num_rows, fields, coverage_info, clock, context
) -> tuple[dict, bool]:
    """Writes the arrays under a fresh attempt prefix, then creates the manifest if absent;
    returns (the published manifest, whether an identical earlier build had published it)."""
    where = describe(spec)
    attempt = new_attempt_id(time.time_ns())
    prefix = attempt_prefix(version, attempt)
    try:
        schema, digest = write_arrays(
            spec, prefix, blocks, version=version, num_rows=num_rows, context=context,
            **{k: fields[k] for k in ("quantization", "chunk_rows", "layout")},
        )  # fmt: skip
        manifest = build_manifest(
            version, schema, **fields, coverage_info=coverage_info, attempt=attempt,
            build_clock=clock, data_digest=digest,
        )  # fmt: skip
        manifest, rerun = create_manifest(base, manifest, where)
    except BaseException:
        _discard_attempt(base, spec, version, prefix)
        raise
    if rerun:  # this attempt duplicates the published one: nobody reads it
        _discard_attempt(base, spec, version, prefix)
    return manifest, rerun


def _discard_attempt(base: ts.KvStore, spec: dict, version: str, prefix: str) -> None:
    """Deletes an attempt's arrays, unless a manifest publishes them after all."""
    try:
        manifest = manifest_or_none(base, version, "")
        if manifest is None or manifest.get("data") != prefix:
            delete_prefix(base, prefix)
            prune_empty_dirs(spec, prefix)
    except Exception:  # best effort: garbage collection removes it later
        _log.warning("could not delete the failed write attempt %s", prefix)

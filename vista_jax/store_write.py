"""Row-block writing of a summary store version's arrays (before its manifest publishes it).

A version's arrays are created from its first `RowBlock`, then every block is validated,
encoded (`vista_jax.quantize`) and written, one block at a time, so memory stays bounded by
a block however large the build. Nothing here publishes: `vista_jax.store` writes the
manifest and CURRENT once the arrays are committed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

import numpy as np
import tensorstore as ts

from vista_jax.quantize import STORED_DTYPE, encode
from vista_jax.store_layout import CORE_ARRAYS, array_kvstore, check_name


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
    root_spec, version, layout, blocks, num_rows, quantization, chunk_rows, context
) -> dict[str, tuple]:
    """Creates a version's arrays from its first block, then writes every block, one at a
    time (memory stays bounded by a block); returns the array schema {name: (shape, dtype)}."""
    if num_rows < 1:
        raise ValueError(f"version {version!r}: need num_rows >= 1, got {num_rows}")
    blocks = iter(blocks)
    first = next(blocks, None)
    if first is None:
        raise ValueError(f"version {version!r}: no row blocks to write")
    schema = _array_schema(first, num_rows, quantization)
    arrays = {
        name: _create_array(
            array_kvstore(root_spec, version, layout, name), shape, dtype, chunk_rows, context
        )
        for name, (shape, dtype) in schema.items()
    }
    for block in itertools.chain([first], blocks):
        _write_block(arrays, block, _check_block(block, schema, num_rows), quantization)
    return schema


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


def _write_block(arrays: dict, block: RowBlock, ids: np.ndarray, quantization: str) -> None:
    """Writes one block to every array and waits until it is committed."""
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
    # Cast on the host: TensorStore does not convert, e.g., float64 states to float32.
    futures = [
        arrays[name][index].write(np.asarray(v, arrays[name].dtype.numpy_dtype))
        for name, v in values.items()
    ]
    for future in futures:
        future.commit.result()

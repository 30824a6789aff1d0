"""SummaryStore: versioned, quantized summary cache on TensorStore zarr3, one row per snapshot.

A row holds one summary snapshot of one user: the summary of that user's history up to some
event. The store knows only dense row ids in ``[0, num_rows)``; the caller maps each
(user, snapshot) pair to its row id (``vista_jax.cache`` gives the j-th snapshot of user u
row ``row_offsets[u] + j``).

A store root is any TensorStore kvstore (a local path, ``"memory://"``, ``"gs://..."``,
``"s3://..."`` or a spec dict). Its keys (CURRENT, ``versions/<version>/manifest.json`` and
the version's zarr3 arrays summary, scale, present, coverage and named extras, chunked by
blocks of ``chunk_rows`` rows) are laid out in `vista_jax.store_layout`; quantization is
`vista_jax.quantize`; row-block writing is `vista_jax.store_write`. This module opens,
reads, writes and publishes versions.

Atomicity rule: a version's arrays are written and committed first, then its manifest, then
CURRENT, each a single kvstore write (temp file + rename with the file driver, one object PUT
on GCS/S3). A reader follows CURRENT to a manifest, so it sees the old version or the new one,
never a mix. A write that fails midway leaves CURRENT and the old version untouched; its
partial data is unpublished and is deleted by the next write of that version id. Published
versions are immutable. One writer per version id at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
import tensorstore as ts

from vista_jax.quantize import QUANTIZATIONS, decode, dequantize_int8, quantize_int8
from vista_jax.store_layout import (
    LAYOUTS,
    SummaryStoreError,
    array_kvstore,
    build_manifest,
    check_name,
    delete_version,
    describe,
    is_published,
    open_base,
    read_current,
    read_manifest,
    root_spec,
    write_current,
    write_manifest,
)
from vista_jax.store_write import RowBlock, as_blocks, write_arrays

__all__ = [
    "LAYOUTS",
    "QUANTIZATIONS",
    "RowBlock",
    "SummaryBatch",
    "SummaryStore",
    "SummaryStoreError",
    "default_context",
    "dequantize_int8",
    "quantize_int8",
]

_DEFAULT_CACHE_BYTES = 256 << 20
_default_context: ts.Context | None = None


class SummaryBatch(NamedTuple):
    """Result of `SummaryStore.read`; absent rows have present False and zeros."""

    summaries: np.ndarray  # [B, K, D] float32, dequantized
    present: np.ndarray  # [B] bool
    coverage: np.ndarray  # [B] int64


def default_context() -> ts.Context:
    """The process-wide context: one read cache, and the memory kvstore shared by all stores."""
    global _default_context
    if _default_context is None:
        _default_context = ts.Context({"cache_pool": {"total_bytes_limit": _DEFAULT_CACHE_BYTES}})
    return _default_context


# --------------------------------------------------------------------------- the store


class SummaryStore:
    """Read side of one published version; build with `write_version`, read with `open`."""

    def __init__(self, root_spec: dict, manifest: dict, arrays: dict[str, Any]):
        self._root_spec = root_spec
        self._manifest = manifest
        self._arrays = arrays

    @classmethod
    def open(
        cls,
        root: Any,
        *,
        expected_config_hash: str | None = None,
        version: str | None = None,
        context: ts.Context | None = None,
    ) -> SummaryStore:
        """Opens the CURRENT version (or `version`); refuses a config hash other than
        `expected_config_hash` when one is given."""
        spec = root_spec(root)
        context = context or default_context()
        where = describe(spec)
        base = open_base(spec, context)
        version = version or read_current(base, where)
        manifest = read_manifest(base, version, where)
        if expected_config_hash is not None and manifest["config_hash"] != expected_config_hash:
            raise SummaryStoreError(
                f"summary version {version!r} at {where} was built with config_hash "
                f"{manifest['config_hash']!r}, but the reader expects {expected_config_hash!r}. "
                "Rebuild the cache with the current summarizer (pipeline build_cache) or "
                "read with the config it was built from."
            )
        arrays = {
            name: cls._open_array(spec, manifest, name, meta, context)
            for name, meta in {**manifest["arrays"], **manifest["extra_arrays"]}.items()
        }
        return cls(spec, manifest, arrays)

    @staticmethod
    def _open_array(spec: dict, manifest: dict, name: str, meta: dict, context):
        kvstore = array_kvstore(spec, manifest["version"], manifest["layout"], name)
        try:
            array = ts.open({"driver": "zarr3", "kvstore": kvstore}, open=True, context=context)
            array = array.result()
        except ValueError as e:
            raise SummaryStoreError(
                f"version {manifest['version']!r} is published but its array {name!r} cannot "
                f"be opened: {e}"
            ) from e
        if list(array.shape) != list(meta["shape"]):
            raise SummaryStoreError(
                f"array {name!r} has shape {list(array.shape)}, manifest says {meta['shape']}"
            )
        return array

    @staticmethod
    def write_version(
        root: Any,
        *,
        version: str,
        summaries: np.ndarray | Iterable[RowBlock],
        config_hash: str,
        summarizer_step: int,
        coverage: np.ndarray | None = None,
        num_rows: int | None = None,
        row_ids: np.ndarray | None = None,
        extra_arrays: Mapping[str, np.ndarray] | None = None,
        quantization: str = "int8",
        chunk_rows: int = 64,
        coverage_info: Mapping[str, Any] | None = None,
        layout: str = "ocdbt",
        context: ts.Context | None = None,
    ) -> dict:
        """Writes, then publishes, a new version; returns its manifest.

        `summaries` is either f32 [N, K, D] (rows for `row_ids`, default 0..N-1, with
        `coverage` [N] and `extra_arrays` {name: [N, ...]}) or an iterable of `RowBlock`
        (then `num_rows` is required), so a large build streams block by block. Rows never
        written read as absent. Refuses to overwrite a published version.
        """
        check_name("version", version)
        if quantization not in QUANTIZATIONS or layout not in LAYOUTS or chunk_rows < 1:
            raise ValueError(
                f"need quantization in {QUANTIZATIONS}, layout in {LAYOUTS}, chunk_rows >= 1; "
                f"got {quantization!r}, {layout!r}, {chunk_rows}"
            )
        spec = root_spec(root)
        context = context or default_context()
        base = open_base(spec, context)
        if is_published(base, version):
            raise SummaryStoreError(
                f"version {version!r} is already published at {describe(spec)}; versions "
                "are immutable, write a new version id."
            )
        # Whole arrays go in blocks of whole chunks (~4096 rows): one OCDBT commit per block.
        block_rows = chunk_rows * max(1, 4096 // chunk_rows)
        blocks, num_rows = as_blocks(
            summaries, coverage, extra_arrays, row_ids, num_rows, block_rows
        )
        # Leftovers of a failed attempt at this id were never published, so nobody reads them.
        delete_version(base, version)
        schema = write_arrays(
            spec, version, layout, blocks, num_rows, quantization, chunk_rows, context
        )
        manifest = build_manifest(
            version, schema, config_hash, summarizer_step, quantization, layout, chunk_rows,
            coverage_info,
        )  # fmt: skip
        write_manifest(base, manifest)
        SummaryStore.set_current(root, version, context=context)
        return manifest

    @staticmethod
    def set_current(root: Any, version: str, *, context: ts.Context | None = None) -> None:
        """Points CURRENT at a published version (publishing, or rolling back)."""
        spec = root_spec(root)
        base = open_base(spec, context or default_context())
        read_manifest(base, version, describe(spec))  # refuse unpublished versions
        write_current(base, version)

    # ------------------------------------------------------------------- metadata

    @property
    def manifest(self) -> dict:
        return json.loads(json.dumps(self._manifest))  # a copy: the store stays immutable

    @property
    def version(self) -> str:
        return self._manifest["version"]

    @property
    def num_rows(self) -> int:
        return self._manifest["num_rows"]

    @property
    def k(self) -> int:
        return self._manifest["k"]

    @property
    def d(self) -> int:
        return self._manifest["d"]

    @property
    def extra_names(self) -> tuple[str, ...]:
        return tuple(self._manifest["extra_arrays"])

    # ------------------------------------------------------------------- reading

    def read(self, row_ids) -> SummaryBatch:
        """Dequantized summaries of a batch of rows, one TensorStore read per array.

        Ids >= num_rows or never written read as present False with zeros; negative ids are
        an error.
        """
        ids, valid = self._locate(row_ids)
        names = ["present", "coverage", "summary"] + ["scale"] * ("scale" in self._arrays)
        rows = self._read_rows(names, ids[valid])
        present = np.zeros(len(ids), bool)
        present[valid] = rows["present"] == 1
        summaries = np.zeros((len(ids), self.k, self.d), np.float32)
        summaries[valid] = decode(rows["summary"], rows.get("scale"))
        summaries[~present] = 0.0
        coverage = np.zeros(len(ids), np.int64)
        coverage[valid] = rows["coverage"]
        coverage[~present] = 0
        return SummaryBatch(summaries, present, coverage)

    def read_extra(self, name: str, row_ids) -> np.ndarray:
        """Extra per-row array `name` for a batch of rows; absent rows read as zeros."""
        if name not in self.extra_names:
            raise SummaryStoreError(
                f"version {self.version!r} has no extra array {name!r}; it has "
                f"{list(self.extra_names)}"
            )
        ids, valid = self._locate(row_ids)
        rows = self._read_rows(["present", name], ids[valid])
        array = self._arrays[name]
        out = np.zeros((len(ids), *array.shape[1:]), array.dtype.numpy_dtype)
        values = rows[name]
        values[rows["present"] != 1] = 0
        out[valid] = values
        return out

    def _locate(self, row_ids) -> tuple[np.ndarray, np.ndarray]:
        """Row ids as int64 [B] and which of them lie inside the store."""
        ids = np.asarray(row_ids)
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise ValueError(f"row_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        ids = ids.astype(np.int64)
        if len(ids) and ids.min() < 0:
            raise ValueError(f"negative row id {ids.min()}; dense row ids start at 0")
        return ids, ids < self.num_rows

    def _read_rows(self, names: list[str], ids: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `ids` of each named array; all reads are issued before any is awaited."""
        if not len(ids):
            return {
                n: np.zeros((0, *self._arrays[n].shape[1:]), self._arrays[n].dtype.numpy_dtype)
                for n in names
            }
        futures = {n: self._arrays[n][ids].read() for n in names}
        return {n: f.result() for n, f in futures.items()}

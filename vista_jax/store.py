"""SummaryStore: versioned, quantized summary cache on TensorStore zarr3, one row per snapshot.

A row holds one summary snapshot of one user: the summary of that user's history up to some
event. The store knows only dense row ids in ``[0, num_rows)``; the caller maps each
(user, snapshot) pair to its row id (``vista_jax.cache`` gives the j-th snapshot of user u
row ``row_offsets[u] + j``).

A store root is any TensorStore kvstore: a local path (the default), a URL such as
``"memory://"``, ``"gs://bucket/cache/"``, ``"s3://bucket/cache/"``, or a kvstore spec dict
such as ``{"driver": "memory"}``. Every key below is joined onto the root's ``path``, so the
same code serves every backend::

  CURRENT                              text: id of the published version
  versions/<version>/manifest.json     written last; its presence publishes the version
  versions/<version>/data/             one OCDBT database (few files) of zarr3 arrays:
      summary    [R, K, D]  int8 | bfloat16 | float32   (quantization "int8" | "bf16" | "none")
      scale      [R, K]     float32   int8 only: one symmetric scale per summary token
      present    [R]        uint8     1 = row written; other rows read as absent (zeros)
      coverage   [R]        int64     how many of the row's user's time-sorted events it covers
      <extra>    [R, ...]   any       named per-row arrays (e.g. recurrent QLA states)

Arrays are chunked by blocks of ``chunk_rows`` rows.

Atomicity rule: a version's arrays are written and committed first, then its manifest, then
CURRENT, each a single kvstore write (temp file + rename with the file driver, one object PUT
on GCS/S3). A reader follows CURRENT to a manifest, so it sees the old version or the new one,
never a mix. A write that fails midway leaves CURRENT and the old version untouched; its
partial data is unpublished and is deleted by the next write of that version id. Published
versions are immutable. One writer per version id at a time.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import tensorstore as ts

from vista_jax.errors import UserError

FORMAT_VERSION = 2  # 2: row-based keys num_rows, chunk_rows (1 had num_users, chunk_users)
QUANTIZATIONS = ("int8", "bf16", "none")
LAYOUTS = ("ocdbt", "plain")
_STORED_DTYPE = {"int8": "int8", "bf16": "bfloat16", "none": "float32"}
_CORE_ARRAYS = ("summary", "scale", "present", "coverage")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MANIFEST_KEYS = (
    "format_version",
    "version",
    "created_at",
    "summarizer_step",
    "config_hash",
    "num_rows",
    "k",
    "d",
    "quantization",
    "layout",
    "chunk_rows",
    "coverage",
    "arrays",
    "extra_arrays",
)
_DEFAULT_CACHE_BYTES = 256 << 20
_default_context: ts.Context | None = None


class SummaryStoreError(UserError):
    """A store that cannot be used as asked: nothing published, corrupt, or mismatched."""


class RowBlock(NamedTuple):
    """Summaries of a block of rows, the unit of a streaming cache build."""

    row_ids: np.ndarray  # [b] int, distinct, in [0, num_rows)
    summaries: np.ndarray  # [b, K, D] float32
    coverage: np.ndarray  # [b] int64: events of the row's user the summary covers
    extras: Mapping[str, np.ndarray] | None = None  # name -> [b, ...]


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


# --------------------------------------------------------------------------- quantization


def _namespace(x: Any):
    """numpy, or jax.numpy for jax arrays, so a cache build can quantize on device."""
    if type(x).__module__.startswith("jax"):
        import jax.numpy as jnp  # noqa: PLC0415 - keep jax optional for host-only readers

        return jnp
    return np


def quantize_int8(x_KxD):
    """Symmetric int8 with one scale per token: x [..., K, D] -> (q int8, scale f32 [..., K]).

    scale = max|x| / 127 over a token's D values, so |x - q * scale| <= scale / 2. All-zero
    tokens get scale 1 (no division by zero) and still dequantize to exactly 0.
    """
    xp = _namespace(x_KxD)
    x = xp.asarray(x_KxD, dtype=xp.float32)
    amax = xp.max(xp.abs(x), axis=-1)
    scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    q = xp.clip(xp.round(x / scale[..., None]), -127, 127).astype(xp.int8)
    return q, scale


def dequantize_int8(q_KxD, scale_K):
    """Inverse of `quantize_int8`: q [..., K, D] int8, scale [..., K] -> float32."""
    xp = _namespace(q_KxD)
    return q_KxD.astype(xp.float32) * xp.asarray(scale_K, dtype=xp.float32)[..., None]


def _encode(summaries: np.ndarray, quantization: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Summaries f32 -> (stored values, scale or None) for the given quantization."""
    if quantization == "int8":
        return quantize_int8(summaries)
    return np.asarray(summaries).astype(_STORED_DTYPE[quantization]), None


def _decode(stored: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    if scale is not None:
        return dequantize_int8(stored, scale)
    return stored.astype(np.float32)


# --------------------------------------------------------------------------- kvstore layout


def _root_spec(root: Any) -> dict:
    """A store root (path, URL, spec dict or KvStore.Spec) as a kvstore JSON spec whose path
    is a directory prefix ("" or ending in "/")."""
    if isinstance(root, ts.KvStore.Spec):
        spec = root.to_json()
    elif isinstance(root, Mapping):
        spec = dict(root)
    elif isinstance(root, (str, os.PathLike)):
        path = os.fspath(root)
        if "://" in path:
            spec = ts.KvStore.Spec(path).to_json()
        else:
            spec = {"driver": "file", "path": os.path.abspath(path)}
    else:
        raise TypeError(f"store root must be a path, URL or kvstore spec, got {type(root)}")
    path = spec.get("path", "")
    spec["path"] = path if not path or path.endswith("/") else path + "/"
    return spec


def _join(spec: dict, relative: str) -> dict:
    return {**spec, "path": spec["path"] + relative}


def _describe(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def _version_prefix(version: str) -> str:
    return f"versions/{version}/"


def _manifest_key(version: str) -> str:
    return _version_prefix(version) + "manifest.json"


def _array_kvstore(root_spec: dict, version: str, layout: str, name: str) -> dict:
    data = _join(root_spec, _version_prefix(version) + "data/")
    if layout == "ocdbt":
        return {"driver": "ocdbt", "base": data, "path": f"{name}/"}
    return _join(data, f"{name}/")


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{kind} {name!r} must match {_NAME_RE.pattern} (it is a path part)")


def _open_base(root_spec: dict, context: ts.Context) -> ts.KvStore:
    return ts.KvStore.open(root_spec, context=context).result()


def _read_text(base: ts.KvStore, key: str) -> str | None:
    result = base.read(key).result()
    return result.value.decode() if result.state == "value" else None


def _read_current(base: ts.KvStore, where: str) -> str:
    current = _read_text(base, "CURRENT")
    if current is None:
        raise SummaryStoreError(
            f"no summary version is published at {where} (CURRENT is missing); "
            "build a cache first (pipeline build_cache)."
        )
    version = current.strip()
    if not _NAME_RE.match(version):
        raise SummaryStoreError(f"CURRENT at {where} is corrupt: {current[:80]!r}")
    return version


def _read_manifest(base: ts.KvStore, version: str, where: str) -> dict:
    text = _read_text(base, _manifest_key(version))
    if text is None:
        raise SummaryStoreError(
            f"version {version!r} at {where} is not published (no {_manifest_key(version)}); "
            "its build did not finish. Rebuild it or open another version."
        )
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError:
        manifest = None
    manifest = manifest if isinstance(manifest, dict) else {}
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing or manifest["format_version"] != FORMAT_VERSION:
        raise SummaryStoreError(
            f"manifest of version {version!r} at {where} is corrupt or of another format "
            f"(missing keys {missing}, format_version {manifest.get('format_version')!r}, "
            f"this reader reads {FORMAT_VERSION}); rebuild the version."
        )
    return manifest


# --------------------------------------------------------------------------- writing


def _as_blocks(
    summaries, coverage, extra_arrays, row_ids, num_rows, block_rows
) -> tuple[Iterable[RowBlock], int]:
    """Whole arrays -> blocks of rows; an iterable of RowBlock passes through."""
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


def _array_schema(block: RowBlock, num_rows: int, quantization: str) -> dict[str, tuple]:
    """Name -> (shape, dtype) of every array of a version, from its first block."""
    if block.summaries.ndim != 3:
        raise ValueError(f"summaries must be [b, K, D], got shape {block.summaries.shape}")
    _, k, d = block.summaries.shape
    schema = {
        "summary": ((num_rows, k, d), np.dtype(ts.dtype(_STORED_DTYPE[quantization]).numpy_dtype)),
        "present": ((num_rows,), np.dtype(np.uint8)),
        "coverage": ((num_rows,), np.dtype(np.int64)),
    }
    if quantization == "int8":
        schema["scale"] = ((num_rows, k), np.dtype(np.float32))
    for name, values in (block.extras or {}).items():
        _check_name("extra array name", name)
        if name in _CORE_ARRAYS:
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
    extra_names = set(schema) - set(_CORE_ARRAYS)
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
    stored, scale = _encode(np.asarray(block.summaries, np.float32), quantization)
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


def _delete_prefix(base: ts.KvStore, prefix: str) -> None:
    upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    base.delete_range(ts.KvStore.KeyRange(prefix, upper)).result()


def _write_arrays(
    root_spec, version, layout, blocks, num_rows, quantization, chunk_rows, context
) -> dict[str, tuple]:
    """Creates a version's arrays from its first block, then writes every block, one at a
    time (memory stays bounded by a block); returns the array schema."""
    if num_rows < 1:
        raise ValueError(f"version {version!r}: need num_rows >= 1, got {num_rows}")
    blocks = iter(blocks)
    first = next(blocks, None)
    if first is None:
        raise ValueError(f"version {version!r}: no row blocks to write")
    schema = _array_schema(first, num_rows, quantization)
    arrays = {
        name: _create_array(
            _array_kvstore(root_spec, version, layout, name), shape, dtype, chunk_rows, context
        )
        for name, (shape, dtype) in schema.items()
    }
    for block in itertools.chain([first], blocks):
        _write_block(arrays, block, _check_block(block, schema, num_rows), quantization)
    return schema


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
        root_spec = _root_spec(root)
        context = context or default_context()
        where = _describe(root_spec)
        base = _open_base(root_spec, context)
        version = version or _read_current(base, where)
        manifest = _read_manifest(base, version, where)
        if expected_config_hash is not None and manifest["config_hash"] != expected_config_hash:
            raise SummaryStoreError(
                f"summary version {version!r} at {where} was built with config_hash "
                f"{manifest['config_hash']!r}, but the reader expects {expected_config_hash!r}. "
                "Rebuild the cache with the current summarizer (pipeline build_cache) or "
                "read with the config it was built from."
            )
        arrays = {
            name: cls._open_array(root_spec, manifest, name, meta, context)
            for name, meta in {**manifest["arrays"], **manifest["extra_arrays"]}.items()
        }
        return cls(root_spec, manifest, arrays)

    @staticmethod
    def _open_array(root_spec: dict, manifest: dict, name: str, meta: dict, context):
        kvstore = _array_kvstore(root_spec, manifest["version"], manifest["layout"], name)
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
        _check_name("version", version)
        if quantization not in QUANTIZATIONS or layout not in LAYOUTS or chunk_rows < 1:
            raise ValueError(
                f"need quantization in {QUANTIZATIONS}, layout in {LAYOUTS}, chunk_rows >= 1; "
                f"got {quantization!r}, {layout!r}, {chunk_rows}"
            )
        root_spec = _root_spec(root)
        context = context or default_context()
        base = _open_base(root_spec, context)
        if _read_text(base, _manifest_key(version)) is not None:
            raise SummaryStoreError(
                f"version {version!r} is already published at {_describe(root_spec)}; versions "
                "are immutable, write a new version id."
            )
        # Whole arrays go in blocks of whole chunks (~4096 rows): one OCDBT commit per block.
        block_rows = chunk_rows * max(1, 4096 // chunk_rows)
        blocks, num_rows = _as_blocks(
            summaries, coverage, extra_arrays, row_ids, num_rows, block_rows
        )
        # Leftovers of a failed attempt at this id were never published, so nobody reads them.
        _delete_prefix(base, _version_prefix(version))
        schema = _write_arrays(
            root_spec, version, layout, blocks, num_rows, quantization, chunk_rows, context
        )
        manifest = _manifest(
            version, schema, config_hash, summarizer_step, quantization, layout, chunk_rows,
            coverage_info,
        )  # fmt: skip
        base.write(_manifest_key(version), json.dumps(manifest, indent=1).encode()).result()
        SummaryStore.set_current(root, version, context=context)
        return manifest

    @staticmethod
    def set_current(root: Any, version: str, *, context: ts.Context | None = None) -> None:
        """Points CURRENT at a published version (publishing, or rolling back)."""
        root_spec = _root_spec(root)
        base = _open_base(root_spec, context or default_context())
        _read_manifest(base, version, _describe(root_spec))  # refuse unpublished versions
        base.write("CURRENT", (version + "\n").encode()).result()

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
        summaries[valid] = _decode(rows["summary"], rows.get("scale"))
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


def _manifest(
    version, schema, config_hash, summarizer_step, quantization, layout, chunk_rows, coverage_info
) -> dict:
    """The manifest JSON of a version (written last: it publishes the version)."""

    def describe(names):
        return {
            n: {"shape": list(schema[n][0]), "dtype": np.dtype(schema[n][1]).name} for n in names
        }

    (num_rows, k, d), _ = schema["summary"]
    core = [n for n in _CORE_ARRAYS if n in schema]
    return {
        "format_version": FORMAT_VERSION,
        "version": version,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
        "summarizer_step": int(summarizer_step),
        "config_hash": str(config_hash),
        "num_rows": int(num_rows),
        "k": int(k),
        "d": int(d),
        "quantization": quantization,
        "layout": layout,
        "chunk_rows": int(chunk_rows),
        "coverage": dict(
            coverage_info
            or {
                "kind": "event_position",
                "per_row": "array 'coverage': number of its user's time-sorted events covered",
            }
        ),
        "arrays": describe(core),
        "extra_arrays": describe([n for n in schema if n not in _CORE_ARRAYS]),
    }

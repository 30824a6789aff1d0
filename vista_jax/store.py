"""SummaryStore: versioned, quantized summary cache on TensorStore zarr3, one row per snapshot.

A row holds one summary snapshot of one user: the summary of that user's history up to some
event. The store knows only dense row ids in ``[0, num_rows)``; the caller maps each
(user, snapshot) pair to its row id (``vista_jax.cache`` gives the j-th snapshot of user u
row ``row_offsets[u] + j``).

A store root is any TensorStore kvstore (a local path, ``"memory://"``, ``"gs://..."``,
``"s3://..."`` or a spec dict). Its keys (CURRENT, ``versions/<v>/manifest.json`` and each
write attempt's zarr3 arrays: by default one packed record per row, in shards of
``chunk_rows`` rows, and named extras) are laid out in `vista_jax.store_layout`; the "rows"
layout and its byte-range reader are `vista_jax.store_rows`; quantization is
`vista_jax.quantize`; row-block writing and lineage are `vista_jax.store_write`. This module
opens, reads, writes, publishes and garbage-collects versions.

Each row is stamped with the time of the last event it covers (`read_quantized`'s
``event_time``), each version has a ``watermark`` and a ``lineage`` (what built it);
`vista_jax.cache.as_of` answers point-in-time reads from them.

Publication cannot tear (the protocol is in `vista_jax.store_layout`): each write attempt
has its own arrays, the manifest is created only if absent, CURRENT moves by compare-and-swap
and never back to an older build, a rerun of an identical build completes its publication,
and only `SummaryStore.collect_garbage` deletes. A reader sees one whole version, and a read
of a version collected since it was opened raises instead of returning zeros.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
import tensorstore as ts

from vista_jax import store_group
from vista_jax.quantize import QUANTIZATIONS, decode, dequantize_int8, quantize_int8
from vista_jax.store_layout import (
    LAYOUTS,
    NO_EVENTS,
    UNKNOWN_TIME,
    SummaryStoreError,
    array_kvstore,
    attempt_prefix,
    attempt_started,
    check_name,
    collect_version,
    data_prefix,
    delete_prefix,
    describe,
    list_versions,
    manifest_key,
    open_base,
    order_key,
    prune_empty_dirs,
    read_current,
    read_current_stamped,
    read_manifest,
    read_stamped,
    refuse_conflicting,
    retained,
    root_spec,
    version_prefix,
    write_current,
    write_if,
)
from vista_jax.store_refresh import (
    MappedRows,
    carried_segments,
    check_segments,
    compose,
    merge,
    own_segments,
    referenced_prefixes,
    version_map,
)
from vista_jax.store_rows import ROW_ARRAY, RowReader, record_dtype, unpack
from vista_jax.store_write import (
    Lineage,
    RowBlock,
    as_blocks,
    build_clock,
    manifest_or_none,
    version_schema,
    write_attempt,
    write_refresh_attempt,
)

__all__ = [
    "LAYOUTS",
    "NO_EVENTS",
    "QUANTIZATIONS",
    "UNKNOWN_TIME",
    "GarbageReport",
    "QuantizedBatch",
    "RowBlock",
    "SummaryBatch",
    "SummaryStore",
    "SummaryStoreError",
    "WriteResult",
    "default_context",
    "dequantize_int8",
    "quantize_int8",
]

DEFAULT_GRACE_SECONDS = 24 * 3600.0  # unpublished attempts younger than this may be running
_CAS_TRIES = 16  # each failed swap means another build moved CURRENT meanwhile
_DEFAULT_CACHE_BYTES = 256 << 20
_default_context: ts.Context | None = None
_log = logging.getLogger(__name__)


class SummaryBatch(NamedTuple):
    """Result of `SummaryStore.read`; absent rows have present False and zeros."""

    summaries: np.ndarray  # [B, K, D] float32, dequantized
    present: np.ndarray  # [B] bool
    coverage: np.ndarray  # [B] int64


class QuantizedBatch(NamedTuple):
    """Result of `SummaryStore.read_quantized`: rows as stored, to dequantize on device
    (`vista_jax.quantize.dequantize_int8` takes jax arrays). Absent rows are zeros."""

    values: np.ndarray  # [B, K, D] int8 | bfloat16 | float32, as stored
    scale: np.ndarray | None  # [B, K] float32 (int8 only; absent rows 0)
    present: np.ndarray  # [B] bool
    coverage: np.ndarray  # [B] int64
    event_time: np.ndarray  # [B] int64: time of the last covered event (NO_EVENTS: none)


class WriteResult(dict):
    """What `SummaryStore.write_version` returns: the published manifest (a plain dict to
    JSON and ==), with how the write ended as attributes."""

    def __init__(self, manifest: dict, *, current: str, moved_current: bool, rerun: bool):
        super().__init__(manifest)
        self.current = current  # the version CURRENT named when the write returned
        self.moved_current = moved_current  # False: CURRENT already named it, or a newer one
        self.rerun = rerun  # an identical earlier build had published it: its manifest


class GarbageReport(NamedTuple):
    """What `SummaryStore.collect_garbage` removed (or, with dry_run, would remove)."""

    versions: list[str]  # published versions removed (manifest first, then arrays)
    attempts: list[str]  # key prefixes of unpublished write attempts removed
    kept: list[str]  # published versions kept, newest first


def default_context() -> ts.Context:
    """The process-wide context: one read cache, and the memory kvstore shared by all stores."""
    global _default_context
    if _default_context is None:
        _default_context = ts.Context({"cache_pool": {"total_bytes_limit": _DEFAULT_CACHE_BYTES}})
    return _default_context


# --------------------------------------------------------------------------- the store


class SummaryStore:
    """Read side of one published version; build with `write_version`, read with `open`."""

    def __init__(self, base: ts.KvStore, where: str, manifest: dict, generation: bytes, arrays):
        self._base = base  # the root kvstore, to check the version is still published
        self._where = where
        self._manifest = manifest
        self._generation = generation  # of the manifest this reader opened
        self._arrays = arrays
        self._rows: RowReader | None = None  # layout "rows": the byte-range reader
        self._manifest_stat: tuple | None = None  # local roots: (path, identity) at open

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
        local = spec["path"] + manifest_key(version) if spec.get("driver") == "file" else None
        before = _identity_or_none(local)
        manifest, generation = read_manifest(base, version, where)
        after = _identity_or_none(local)
        if expected_config_hash is not None and manifest["config_hash"] != expected_config_hash:
            raise SummaryStoreError(
                f"summary version {version!r} at {where} was built with config_hash "
                f"{manifest['config_hash']!r}, but the reader expects {expected_config_hash!r}. "
                "Fix: rebuild the cache with the current summarizer (--mode=build_cache) or "
                "read with the config it was built from"
            )
        store = cls(base, where, manifest, generation, {})
        if before is not None and before == after:  # the file read is the one stat'ed
            store._manifest_stat = (local, before)
        if manifest.get("refresh"):  # rows of several attempts, through its row map
            segments, sources = version_map(base, manifest, where)
            store._rows = MappedRows(
                spec, manifest, segments, sources, manifest["extra_arrays"], context
            )
            return store
        for name, meta in store._stored_arrays().items():
            store._arrays[name] = store._open_array(spec, name, meta, context)
        if manifest["layout"] == "rows":
            record = manifest["row_record"]
            store._rows = RowReader(
                array_kvstore(spec, data_prefix(manifest), "rows", ROW_ARRAY),
                manifest["num_rows"], record["row_bytes"], record["shard_rows"], context,
            )  # fmt: skip
        return store

    def _stored_arrays(self) -> dict[str, dict]:
        """{name: {"shape", "dtype"}} of the zarr3 arrays this version stores."""
        manifest = self._manifest
        if manifest["layout"] != "rows":
            return {**manifest["arrays"], **manifest["extra_arrays"]}
        shape = [manifest["num_rows"], manifest["row_record"]["row_bytes"]]
        return {ROW_ARRAY: {"shape": shape, "dtype": "uint8"}, **manifest["extra_arrays"]}

    def _open_array(self, spec: dict, name: str, meta: dict, context):
        manifest = self._manifest
        kvstore = array_kvstore(spec, data_prefix(manifest), manifest["layout"], name)
        try:
            array = ts.open({"driver": "zarr3", "kvstore": kvstore}, open=True, context=context)
            array = array.result()
        except ValueError as e:
            self._check_live(e)
            raise SummaryStoreError(
                f"version {self.version!r} at {self._where} is published but its array "
                f"{name!r} cannot be opened ({str(e).splitlines()[0]}). Fix: rebuild the "
                "version under a new id (--mode=build_cache)"
            ) from e
        if list(array.shape) != list(meta["shape"]):
            raise SummaryStoreError(
                f"array {name!r} of version {self.version!r} at {self._where} has shape "
                f"{list(array.shape)}, its manifest says {meta['shape']}. Fix: rebuild the "
                "version under a new id (--mode=build_cache)"
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
        layout: str = LAYOUTS[0],
        context: ts.Context | None = None,
        event_time: np.ndarray | None = None,
        summarizer_checkpoint: str = "",
        data_fingerprint: str = "",
        watermark: int | None = None,
        group: store_group.Group = store_group.SINGLE,
    ) -> WriteResult:
        """Writes, then publishes, a version; moves CURRENT to it unless a newer one is
        current; returns its manifest as a `WriteResult`.

        `summaries` is either f32 [N, K, D] (rows for `row_ids`, default 0..N-1, with
        `coverage` [N], `event_time` [N] and `extra_arrays` {name: [N, ...]}) or an iterable
        of `RowBlock` (then `num_rows` is required), so a large build streams block by block.
        Rows never written read as absent. A version published with other content is
        refused; an identical rerun (same rows, same order) completes the earlier publication.

        Lineage: `summarizer_checkpoint` (path) and `data_fingerprint` name the inputs; the
        `watermark` is the newest event time the build read (default: the newest any row
        covers) and must be >= every row's event_time. `chunk_rows` is rows per chunk, or
        per shard with layout "rows" (`vista_jax.store_rows`).

        `group`: the processes of a multi-host build, each calling this with the rows of
        `store_group.row_range(num_rows, chunk_rows, group.index, group.count)`; they write
        one attempt and process 0 publishes it (`vista_jax.store_group`).
        """
        check_name("version", version)
        if quantization not in QUANTIZATIONS or layout not in LAYOUTS or chunk_rows < 1:
            raise ValueError(
                f"need quantization in {QUANTIZATIONS}, layout in {LAYOUTS}, chunk_rows >= 1; "
                f"got {quantization!r}, {layout!r}, {chunk_rows}"
            )
        if group.count > 1 and layout == "ocdbt":
            raise ValueError(
                "layout 'ocdbt' is one database with a single writer; several processes "
                "cannot write it. Fix: use layout 'rows' (the default) or 'plain'"
            )
        spec = root_spec(root)
        context = context or default_context()
        base, where = open_base(spec, context), describe(spec)
        start = read_current_stamped(base)  # CURRENT moves by CAS from this generation
        clock = build_clock(base, start[0], where)
        # Whole arrays go in blocks of whole chunks (~4096 rows): one OCDBT commit per block.
        block_rows = chunk_rows * max(1, 4096 // chunk_rows)
        blocks, num_rows = as_blocks(
            summaries, coverage, extra_arrays, row_ids, num_rows, block_rows, event_time
        )
        lineage = Lineage(summarizer_checkpoint, data_fingerprint, watermark)
        fields = dict(
            config_hash=str(config_hash), summarizer_step=int(summarizer_step),
            quantization=quantization, layout=layout, chunk_rows=int(chunk_rows),
        )  # fmt: skip
        refuse_conflicting(base, version, where, num_rows=int(num_rows), **fields)
        manifest, rerun = write_attempt(
            base, spec, version, blocks, num_rows, fields, coverage_info, clock, context,
            lineage, group,
        )  # fmt: skip
        # Process 0's `start`: its compare-and-swap moves CURRENT, once for the group.
        current, moved = store_group.on_primary(
            group, lambda: list(_advance_current(base, manifest, start, where))
        )
        if current != version:
            _log.warning(
                "published summary version %r at %s; CURRENT left at the newer %r",
                version, where, current,
            )  # fmt: skip
        return WriteResult(manifest, current=current, moved_current=moved, rerun=rerun)

    @staticmethod
    def write_refresh(
        root: Any,
        *,
        parent: str,
        version: str,
        rows: Iterable[RowBlock],
        written_rows: np.ndarray,
        parent_row: np.ndarray,
        config_hash: str,
        data_fingerprint: str,
        delta_fingerprint: str,
        watermark: int | None = None,
        with_extras: bool = True,
        chunk_rows: int = 64,
        coverage_info: Mapping[str, Any] | None = None,
        context: ts.Context | None = None,
    ) -> WriteResult:
        """Publishes a refresh of version `parent` (CURRENT when the refresh began) that
        writes only the rows it recomputes and carries every other row by reference
        (`vista_jax.store_refresh`); moves CURRENT to it by compare-and-swap from `parent`.

        The version has ``len(parent_row)`` rows: row r carries row ``parent_row[r]`` of the
        parent (bytes shared, not copied), or, where that is -1, is one of `written_rows`
        (ascending), whose values `rows` gives as RowBlocks of version row ids. It keeps the
        parent's summarizer step and checkpoint, quantization, k and d, and its extras when
        `with_extras` (the blocks then carry them). Lineage adds ``refresh.parent`` and
        ``refresh.delta_fingerprint``; the `watermark` must be >= every row's event time.
        Identical reruns (same parent, same rows) complete the earlier publication.
        """
        check_name("version", version)
        spec = root_spec(root)
        context = context or default_context()
        base, where = open_base(spec, context), describe(spec)
        start = read_current_stamped(base)
        if start[0] != parent:
            raise SummaryStoreError(
                f"the refresh of version {parent!r} at {where} found CURRENT at "
                f"{start[0]!r}: another build published meanwhile. Fix: rerun the refresh, "
                "which then starts from the current version"
            )
        parent_manifest, _ = read_manifest(base, parent, where)
        extras = parent_manifest["extra_arrays"]
        if parent_manifest["layout"] != "rows" or (with_extras and not extras):
            raise SummaryStoreError(
                f"version {parent!r} at {where} has layout {parent_manifest['layout']!r} and "
                f"extras {sorted(extras)}; a refresh needs layout "
                "'rows' (and the stored states to fold into). Fix: rebuild it "
                "(--mode=build_cache), then refresh"
            )
        clock = build_clock(base, parent, where)
        written_rows = np.asarray(written_rows, np.int64)
        parent_row = np.asarray(parent_row, np.int64)
        if np.any(parent_row[written_rows] != -1) or np.any(np.diff(written_rows) <= 0):
            raise ValueError("written_rows must ascend and must not be carried (parent_row -1)")
        if np.any(parent_row >= parent_manifest["num_rows"]):
            raise ValueError(f"parent rows must lie in [0, {parent_manifest['num_rows']})")
        parent_segments, parent_sources = version_map(base, parent_manifest, where)
        carried, sources = compose(carried_segments(parent_row), parent_segments, parent_sources)
        num_rows = len(parent_row)
        segments = merge(np.concatenate([carried, own_segments(written_rows)]))
        own = {"data": "", "num_rows": len(written_rows), "shard_rows": 1}
        check_segments(segments, [own, *sources], num_rows)
        fields = dict(
            config_hash=str(config_hash), summarizer_step=parent_manifest["summarizer_step"],
            quantization=parent_manifest["quantization"], layout="rows",
            chunk_rows=int(chunk_rows),
        )  # fmt: skip
        refuse_conflicting(base, version, where, num_rows=num_rows, **fields)
        lineage = Lineage(parent_manifest["summarizer_checkpoint"], data_fingerprint, watermark)
        refresh = {
            "parent": parent, "delta_fingerprint": str(delta_fingerprint),
            "sources": sources, "segments": segments,
        }  # fmt: skip
        manifest, rerun = write_refresh_attempt(
            base, spec, version, rows, written_rows,
            version_schema(parent_manifest, num_rows, with_extras), fields, coverage_info,
            clock, context, lineage, refresh, parent_manifest["row_record"],
        )  # fmt: skip
        if not rerun:
            _withdraw_if_parent_collected(base, manifest, spec, where)
        current, moved = _advance_current(base, manifest, start, where)
        return WriteResult(manifest, current=current, moved_current=moved, rerun=rerun)

    @staticmethod
    def set_current(root: Any, version: str, *, context: ts.Context | None = None) -> None:
        """Points CURRENT at a published version, unconditionally (rolling back)."""
        spec = root_spec(root)
        base = open_base(spec, context or default_context())
        read_manifest(base, version, describe(spec))  # refuse unpublished versions
        write_current(base, version)

    @staticmethod
    def collect_garbage(
        root: Any,
        *,
        keep_last: int,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        keep: Iterable[str] = (),
        dry_run: bool = False,
        context: ts.Context | None = None,
    ) -> GarbageReport:
        """Removes published versions beyond the newest `keep_last` and unpublished write
        attempts older than `grace_seconds`; returns what it removed.

        Never removes CURRENT, a version newer than CURRENT, or one named in `keep` (e.g. the
        version a downstream checkpoint was trained on). `grace_seconds` must exceed the
        longest build: a younger unpublished attempt may be a build still writing.
        """
        if keep_last < 0 or grace_seconds < 0:
            raise ValueError(f"need keep_last >= 0, grace_seconds >= 0: {keep_last, grace_seconds}")
        spec = root_spec(root)
        base, where = open_base(spec, context or default_context()), describe(spec)
        listing = list_versions(base)
        published = {}  # version -> (manifest, generation); unreadable manifests are left
        for version in (v for v, entry in listing.items() if entry["published"]):
            try:
                published[version] = read_manifest(base, version, where)
            except SummaryStoreError:
                listing[version]["attempts"] = set()  # their data may be referenced: keep it
        kept = retained(published, read_current_stamped(base)[0], keep_last, set(keep))
        removed = []
        in_use = lambda prefix: prefix in _referenced(base, where)  # noqa: E731
        for version in sorted(set(published) - set(kept), key=lambda v: order_key(published[v][0])):
            if dry_run or collect_version(base, *published[version], in_use=in_use):
                removed.append(version)
        # Attempts any published version reads (its own, or a refresh's sources), as listed
        # after the collection: a refresh published meanwhile protects its parent's data.
        referenced = _referenced(base, where)
        referenced |= {data_prefix(published[v][0]) for v in removed}  # collected above
        attempts = []
        for version, entry in sorted(listing.items()):
            for attempt in sorted(entry["attempts"]):
                started = attempt_started(attempt)
                old = started is not None and started < time.time() - grace_seconds
                if attempt_prefix(version, attempt) not in referenced and old:
                    attempts.append(attempt_prefix(version, attempt))
                    if not dry_run:
                        delete_prefix(base, attempts[-1])
        for prefix in [] if dry_run else [version_prefix(v) for v in removed] + attempts:
            prune_empty_dirs(spec, prefix)
        return GarbageReport(removed, attempts, kept)

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

    @property
    def watermark(self) -> int | None:
        """The newest event time this version's build read (None: unknown, format < 4)."""
        return self._manifest.get("watermark")

    @property
    def lineage(self) -> dict:
        """What names this version and its inputs, for the checkpoints trained on it: the
        root, version, content hash, summarizer checkpoint and step, config hash, data
        fingerprint, k, d, quantization, layout, row counts, bytes per row, watermark, and
        for a refresh version its parent version and delta fingerprint."""
        keys = (
            "version", "content_hash", "summarizer_checkpoint", "summarizer_step",
            "config_hash", "data_fingerprint", "k", "d", "quantization", "layout",
            "num_rows", "present_rows", "bytes_per_row", "watermark", "format_version",
        )  # fmt: skip
        refresh = self._manifest.get("refresh")  # a refresh: what it folded into what
        parent = {k: refresh[k] for k in ("parent", "delta_fingerprint")} if refresh else None
        return (
            {"root": self._where}
            | {key: self._manifest.get(key) for key in keys}
            | {"refresh": parent}
        )

    # ------------------------------------------------------------------- reading

    def read(self, row_ids) -> SummaryBatch:
        """Dequantized summaries of a batch of rows (decoded on the host).

        Ids >= num_rows or never written read as present False with zeros; negative ids are
        an error, and so is a version garbage-collected since it was opened.
        """
        batch = self.read_quantized(row_ids)
        summaries = decode(batch.values, batch.scale)
        summaries[~batch.present] = 0.0
        return SummaryBatch(summaries, batch.present, batch.coverage)

    def read_quantized(self, row_ids) -> QuantizedBatch:
        """Rows as stored (int8 and scales, bf16 or f32), with their coverage and event time:
        the fast path, whose dequantization can run on device. Same absence rules as `read`;
        versions older than format 4 read event_time as UNKNOWN_TIME."""
        ids, valid = self._locate(row_ids)
        rows = self._read_core(ids[valid])
        if not valid.all():  # ids past the end: absent rows between the ones read
            for name, values in rows.items():
                rows[name] = np.zeros((len(ids), *values.shape[1:]), values.dtype)
                rows[name][valid] = values
        present = rows.pop("present") == 1
        if not present.all():
            for values in rows.values():
                values[~present] = 0
        return QuantizedBatch(
            rows["summary"], rows.get("scale"), present, rows["coverage"], rows["event_time"]
        )

    def _read_core(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Core values of rows `ids` (all < num_rows): summary, [scale,] present, coverage,
        event_time, from the row records or the per-array zarr3 arrays."""
        if self._rows is not None:
            try:
                raw = self._rows.read(ids)
            except (OSError, ValueError, SummaryStoreError) as e:  # e.g. collected meanwhile
                self._check_live(e)
                raise
            self._check_live()
            summary = self._manifest["arrays"]["summary"]
            stored = np.dtype(ts.dtype(summary["dtype"]).numpy_dtype)
            dtype = record_dtype(self.k, self.d, stored, "scale" in self._manifest["arrays"])
            return unpack(raw, dtype, self.k, self.d, stored)
        names = [n for n in ("present", "coverage", "summary", "scale", "event_time")
                 if n in self._arrays]  # fmt: skip
        rows = self._read_rows(names, ids)
        rows.setdefault("event_time", np.full(len(ids), UNKNOWN_TIME, np.int64))
        return rows

    def read_extra(self, name: str, row_ids) -> np.ndarray:
        """Extra per-row array `name` for a batch of rows; absent rows read as zeros."""
        if name not in self.extra_names:
            raise SummaryStoreError(
                f"version {self.version!r} at {self._where} has no extra array {name!r}; it "
                f"has {list(self.extra_names)}. Fix: read one of those, or rebuild the cache "
                "with a summarizer that stores it"
            )
        ids, valid = self._locate(row_ids)
        if isinstance(self._rows, MappedRows):
            try:
                values = self._rows.read_extra(name, ids[valid])
            except ValueError as e:  # e.g. a source collected meanwhile
                self._check_live(e)
                raise
            self._check_live()
        else:
            values = self._read_rows([name], ids[valid])[name]
        values[self._read_core(ids[valid])["present"] != 1] = 0
        out = np.zeros((len(ids), *values.shape[1:]), values.dtype)
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
        """Rows `ids` of each named array; all reads are issued before any is awaited, and
        the version is checked to be still published after they complete."""
        if not len(ids):
            rows = {
                n: np.zeros((0, *self._arrays[n].shape[1:]), self._arrays[n].dtype.numpy_dtype)
                for n in names
            }
        else:
            futures = {n: self._arrays[n][ids].read() for n in names}
            try:
                rows = {n: f.result() for n, f in futures.items()}
            except ValueError as e:  # e.g. an OCDBT node deleted under the reader
                self._check_live(e)
                raise
        self._check_live()
        return rows

    def _check_live(self, cause: BaseException | None = None) -> None:
        """Raises unless this reader's manifest is still published, unchanged. Collection
        deletes a manifest before its data, so rows read before this passes are valid."""
        state = self._manifest_state()
        if state == "unspecified":  # the generation is still the one opened
            return
        what = "garbage-collected" if state == "missing" else "deleted and published again"
        raise SummaryStoreError(
            f"summary version {self.version!r} at {self._where} was {what} after this reader "
            "opened it; its rows are no longer readable. Fix: reopen the store "
            "(SummaryStore.open), or keep the version when collecting garbage (keep=...)"
        ) from cause

    def _manifest_state(self) -> str:
        """ "unspecified" (unchanged since opened), "missing", or "value" (another one).

        On a local root, a stat of the manifest file (inode, mtime, size as seen at open),
        which costs microseconds where a kvstore read costs a millisecond per batch."""
        if self._manifest_stat is not None:
            try:
                stat = _file_identity(self._manifest_stat[0])
            except FileNotFoundError:
                return "missing"
            return "unspecified" if stat == self._manifest_stat[1] else "value"
        key = manifest_key(self.version)
        return self._base.read(key, if_not_equal=self._generation).result().state


def _identity_or_none(path: str | None) -> tuple | None:
    if path is None:
        return None
    try:
        return _file_identity(path)
    except FileNotFoundError:
        return None


def _file_identity(path: str) -> tuple:
    stat = os.stat(path)
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


# --------------------------------------------------------------------------- publication


def _referenced(base, where: str) -> set[str]:
    """Data prefixes the published versions read now (their own and refresh sources)."""
    prefixes: set[str] = set()
    for version, entry in list_versions(base).items():
        if entry["published"]:
            manifest = manifest_or_none(base, version, where)
            prefixes |= referenced_prefixes(manifest) if manifest else set()
    return prefixes


def _withdraw_if_parent_collected(base, manifest: dict, spec: dict, where: str) -> None:
    """A refresh reads its parent's attempts. Collection deletes a version's data only if no
    published manifest names it, asked after its manifest is gone; so if the parent is still
    published once the refresh's manifest exists, its data stays. Otherwise the refresh may
    name deleted rows: it unpublishes itself (not yet CURRENT) and fails."""
    parent = manifest["refresh"]["parent"]
    if manifest_or_none(base, parent, where) is not None:
        return
    version = manifest["version"]
    _, generation = read_stamped(base, manifest_key(version))
    if write_if(base, manifest_key(version), None, generation):
        delete_prefix(base, data_prefix(manifest))
        prune_empty_dirs(spec, version_prefix(version))
    raise SummaryStoreError(
        f"version {parent!r} at {where} was garbage-collected while the refresh {version!r} "
        "of it was written, so the refresh was withdrawn. Fix: rerun the refresh (it starts "
        "from the current version), or keep the version when collecting (keep=...)"
    )


def _advance_current(base, manifest: dict, start: tuple, where: str) -> tuple[str, bool]:
    """Moves CURRENT to `manifest`'s version by compare-and-swap from `start` (CURRENT's
    version and generation when the build started), unless CURRENT names a newer version
    (`vista_jax.store_layout.order_key`); returns (CURRENT's version, whether moved)."""
    version = manifest["version"]
    current, generation = start
    for _ in range(_CAS_TRIES):
        if current == version:
            return version, False
        other = manifest_or_none(base, current, where)
        if other is not None and order_key(other) > order_key(manifest):
            return current, False
        if write_current(base, version, if_equal=generation):
            return version, True
        current, generation = read_current_stamped(base)
    raise SummaryStoreError(
        f"CURRENT at {where} kept moving during {_CAS_TRIES} tries to point it at the "
        f"published version {version!r}. Fix: rerun the identical build to finish, or "
        "SummaryStore.set_current once the other builds are done"
    )

"""Refresh versions: a version that writes only the rows it recomputes and references the rest.

A refresh version (`vista_jax.store.SummaryStore.write_refresh`) is published like any other
(its own attempt, manifest created once, CURRENT by compare-and-swap), but its attempt holds
only the T rows it recomputed, packed densely as rows ``0..T-1`` of its own ``row`` array (and
extras), plus a *row map*: segments ``(start, count, source, source_start)`` over the
version's row ids, sorted by start. Rows ``[start, start + count)`` of the version are rows
``[source_start, source_start + count)`` of source ``source``: source 0 is the version's own
attempt; source ``i >= 1`` is entry ``i - 1`` of the manifest's ``refresh.sources``, the data
prefix of an ancestor's write attempt (``data``, its ``num_rows`` and ``shard_rows``). A row in
no segment reads as absent.

Maps are flattened when a refresh is written (a refresh of a refresh names the attempts that
hold the bytes, never another map), so a read is one hop: ids -> (source, row) -> the
source's byte-range `RowReader`. The map is stored under the attempt as ``row_map`` (int64
little-endian ``[S, 4]``); the manifest records its segment count and sha256, so a damaged map
is refused. An ancestor's data is kept by garbage collection for as long as any published
manifest names it (`referenced_prefixes`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import tensorstore as ts

from vista_jax.store_layout import SummaryStoreError, array_kvstore, data_prefix
from vista_jax.store_rows import ROW_ARRAY, RowReader

ROW_MAP_KEY = "row_map"  # under a refresh attempt's data prefix
MAP_COLUMNS = 4  # start, count, source, source_start


# --------------------------------------------------------------------------- maps


def own_source(manifest: dict) -> dict:
    """Source 0 of a version: its own attempt's rows."""
    refresh = manifest.get("refresh")
    rows = refresh["rows_written"] if refresh else manifest["num_rows"]
    shard_rows = (manifest.get("row_record") or {}).get("shard_rows", manifest["chunk_rows"])
    return {"data": data_prefix(manifest), "num_rows": int(rows), "shard_rows": int(shard_rows)}


def map_key(manifest: dict) -> str:
    return data_prefix(manifest) + ROW_MAP_KEY


def encode_map(segments: np.ndarray) -> tuple[bytes, str]:
    """A row map as stored bytes and their sha256 (hex)."""
    raw = np.ascontiguousarray(segments, "<i8").tobytes()
    return raw, hashlib.sha256(raw).hexdigest()


def version_map(base: ts.KvStore, manifest: dict, where: str) -> tuple[np.ndarray, list[dict]]:
    """(segments int64 [S, 4], sources: own first) of a published version; a version that is
    not a refresh maps all its rows onto its own attempt."""
    refresh = manifest.get("refresh")
    if not refresh:
        return np.array([[0, manifest["num_rows"], 0, 0]], np.int64), [own_source(manifest)]
    result = base.read(map_key(manifest)).result()
    raw = result.value if result.state == "value" else b""
    info = refresh["row_map"]
    if hashlib.sha256(raw).hexdigest() != info["sha256"] or len(raw) != info["segments"] * 32:
        raise SummaryStoreError(
            f"the row map of refresh version {manifest['version']!r} at {where} is missing or "
            f"damaged ({map_key(manifest)}). Fix: rebuild the version (--mode=build_cache)"
        )
    segments = np.frombuffer(raw, "<i8").reshape(-1, MAP_COLUMNS).astype(np.int64)
    return segments, [own_source(manifest), *refresh["sources"]]


def own_segments(written_rows: np.ndarray) -> np.ndarray:
    """Segments of a refresh's own rows: version rows `written_rows` (ascending) are rows
    0..T-1 of its attempt; each run of consecutive ids is one segment."""
    rows = np.asarray(written_rows, np.int64)
    if not len(rows):
        return np.zeros((0, MAP_COLUMNS), np.int64)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    counts = np.diff(np.concatenate([starts, [len(rows)]]))
    return np.stack([rows[starts], counts, np.zeros_like(starts), starts], 1)


def carried_segments(parent_row: np.ndarray) -> np.ndarray:
    """[C, 3] (start, parent_start, count) runs of a per-row array of the version: the parent
    row each row carries, -1 for rows the refresh writes."""
    parent_row = np.asarray(parent_row, np.int64)
    rows = np.flatnonzero(parent_row >= 0)
    if not len(rows):
        return np.zeros((0, 3), np.int64)
    src = parent_row[rows]
    breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(src) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    counts = np.diff(np.concatenate([starts, [len(rows)]]))
    return np.stack([rows[starts], src[starts], counts], 1)


def compose(
    carried: np.ndarray, parent_segments: np.ndarray, parent_sources: Sequence[dict]
) -> tuple[np.ndarray, list[dict]]:
    """The segments of rows a refresh carries from its parent, resolved through the parent's
    own map to the attempts that hold them; returns (segments with source indexes >= 1, the
    sources they name, in order). Rows the parent lacks stay unmapped (absent)."""
    starts = parent_segments[:, 0]
    out, used = [], {}
    for new_start, parent_start, count in np.asarray(carried, np.int64).tolist():
        j = max(int(np.searchsorted(starts, parent_start, side="right")) - 1, 0)
        end = parent_start + count
        while j < len(parent_segments) and starts[j] < end:
            seg_start, seg_count, source, source_start = parent_segments[j].tolist()
            lo, hi = max(seg_start, parent_start), min(seg_start + seg_count, end)
            if lo < hi:
                index = used.setdefault(source, len(used) + 1)
                out.append([new_start + lo - parent_start, hi - lo, index,
                            source_start + lo - seg_start])  # fmt: skip
            j += 1
    sources = [None] * len(used)
    for source, index in used.items():
        sources[index - 1] = dict(parent_sources[source])
    segments = np.array(out, np.int64).reshape(-1, MAP_COLUMNS)
    return segments, sources


def merge(segments: np.ndarray) -> np.ndarray:
    """Sorts segments by start and joins neighbours that continue one another."""
    segments = segments[np.argsort(segments[:, 0], kind="stable")]
    merged: list[list[int]] = []
    for start, count, source, source_start in segments.tolist():
        if merged:
            s, c, src, ss = merged[-1]
            if s + c == start and src == source and ss + c == source_start:
                merged[-1][1] += count
                continue
        merged.append([start, count, source, source_start])
    return np.array(merged, np.int64).reshape(-1, MAP_COLUMNS)


def check_segments(segments: np.ndarray, sources: Sequence[dict], num_rows: int) -> None:
    """Segments must be disjoint, inside the version and inside their sources."""
    starts, counts = segments[:, 0], segments[:, 1]
    if np.any(counts <= 0) or np.any(starts < 0) or np.any(starts + counts > num_rows):
        raise ValueError(f"row map segments outside [0, {num_rows}) or empty")
    if np.any(starts[1:] < (starts + counts)[:-1]):
        raise ValueError("row map segments overlap: a row is both carried and written")
    limits = np.array([s["num_rows"] for s in sources], np.int64)
    if np.any(segments[:, 3] + counts > limits[segments[:, 2]]):
        raise ValueError("a row map segment reaches past the rows of its source")


def referenced_prefixes(manifest: dict) -> set[str]:
    """Data prefixes a published version reads: its own and, for a refresh, its sources'."""
    refresh = manifest.get("refresh") or {}
    return {data_prefix(manifest)} | {s["data"] for s in refresh.get("sources", ())}


# --------------------------------------------------------------------------- reading


class MappedRows:
    """Reads the rows and extras of a refresh version through its row map: the same interface
    as `RowReader.read` (records uint8 [B, row_bytes]) plus `read_extra`."""

    def __init__(self, spec: dict, manifest: dict, segments, sources, extras: Mapping, context):
        self._spec, self._context = spec, context
        self._segments = segments
        self._sources = sources
        self._extras = dict(extras)  # name -> {"shape", "dtype"} (version-wide shape)
        self._row_bytes = manifest["row_record"]["row_bytes"]
        self._readers: dict[int, RowReader] = {}
        self._arrays: dict[tuple[int, str], ts.TensorStore] = {}

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, source row) of each id; source -1 for rows in no segment."""
        starts, counts = self._segments[:, 0], self._segments[:, 1]
        j = np.searchsorted(starts, ids, side="right") - 1
        inside = (j >= 0) & (ids < starts[j.clip(0)] + counts[j.clip(0)])
        j = j.clip(0)
        source = np.where(inside, self._segments[j, 2], -1)
        row = np.where(inside, self._segments[j, 3] + ids - starts[j], 0)
        return source, row

    def read(self, ids: np.ndarray) -> np.ndarray:
        out = np.zeros((len(ids), self._row_bytes), np.uint8)
        source, row = self.locate(ids)
        for s in np.unique(source[source >= 0]).tolist():
            mask = source == s
            out[mask] = self._reader(s).read(row[mask])
        return out

    def read_extra(self, name: str, ids: np.ndarray) -> np.ndarray:
        meta = self._extras[name]
        dtype = np.dtype(ts.dtype(meta["dtype"]).numpy_dtype)
        out = np.zeros((len(ids), *meta["shape"][1:]), dtype)
        source, row = self.locate(ids)
        futures = {
            s: self._array(s, name)[row[source == s]].read()
            for s in np.unique(source[source >= 0]).tolist()
        }
        for s, future in futures.items():
            out[source == s] = future.result()
        return out

    def _reader(self, s: int) -> RowReader:
        if s not in self._readers:
            src = self._sources[s]
            kvstore = array_kvstore(self._spec, src["data"], "rows", ROW_ARRAY)
            self._readers[s] = RowReader(
                kvstore, src["num_rows"], self._row_bytes, src["shard_rows"], self._context
            )
        return self._readers[s]

    def _array(self, s: int, name: str) -> ts.TensorStore:
        if (s, name) not in self._arrays:
            kvstore = array_kvstore(self._spec, self._sources[s]["data"], "rows", name)
            array = ts.open({"driver": "zarr3", "kvstore": kvstore}, open=True,
                            context=self._context).result()  # fmt: skip
            self._arrays[s, name] = array
        return self._arrays[s, name]

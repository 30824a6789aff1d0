"""The "rows" layout of a summary store version: one packed record per row, for random reads.

A row's core values (summary, scale, coverage, event_time, present) are packed, little-endian,
into one fixed-width record of ``row_bytes`` bytes; the records form one zarr3 array
``row [R, row_bytes] uint8`` whose chunks are *shards* of ``shard_rows`` rows
(``sharding_indexed`` codec), each shard holding one inner chunk per row, uncompressed, with
its index (offset, length per row; crc32c) at the end of the shard. A batch of random rows
is then one byte-range read per row, of exactly the row's bytes, however large the shard.
Extra per-row arrays (e.g. QLA states) are their own zarr3 arrays, sharded the same way.

Everything written is standard zarr3 (any zarr3 reader, TensorStore's included, reads the
``row`` array); `RowReader` is the fast path beside it: it reads each shard's index once, then
fetches rows by byte range, with ``os.preadv`` for the file kvstore and batched TensorStore
kvstore reads (one request per key, ranges coalesced by the driver) for any other. Tests hold
it equal to TensorStore's own zarr3 read and to the "plain" layout.

Writing goes through `ShardBuffer`: rows are held until their shard is complete, so each shard
is written once (no read-modify-write of a shard per block of rows).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

import numpy as np
import tensorstore as ts

from vista_jax.store_layout import SummaryStoreError

ROW_ARRAY = "row"
_MISSING = np.iinfo(np.uint64).max  # shard index entry of an inner chunk never written
_ABSENT, _NOT_LOADED = -1, -2  # RowReader offsets of rows never written / of unread shards
_INDEX_ENTRY_BYTES = 16  # offset and length, uint64 little-endian
_CRC_BYTES = 4
_BUFFERED_SHARDS = 4  # partial shards held before the fullest is flushed (out-of-order input)


# --------------------------------------------------------------------------- records


def record_dtype(k: int, d: int, stored: np.dtype, with_scale: bool) -> np.dtype:
    """The packed record of one row: summary bytes, [scale], coverage, event_time, present."""
    fields = [("summary", np.uint8, (k * d * np.dtype(stored).itemsize,))]
    if with_scale:
        fields.append(("scale", "<f4", (k,)))
    fields += [("coverage", "<i8"), ("event_time", "<i8"), ("present", "u1")]
    return np.dtype(fields)  # packed: no alignment padding


def record_fields(dtype: np.dtype) -> dict[str, dict]:
    """The record layout as manifest JSON: {name: {"offset", "bytes"}}."""
    return {
        name: {"offset": int(offset), "bytes": int(field.itemsize)}
        for name, (field, offset) in dtype.fields.items()
    }


def pack(values: Mapping[str, np.ndarray], dtype: np.dtype) -> np.ndarray:
    """Encoded core values of n rows -> records as uint8 [n, row_bytes]."""
    n = len(values["coverage"])
    records = np.zeros(n, dtype)
    records["summary"] = np.ascontiguousarray(values["summary"]).view(np.uint8).reshape(n, -1)
    if "scale" in dtype.names:
        records["scale"] = values["scale"]
    for name in ("coverage", "event_time", "present"):
        records[name] = values[name]
    return records.view(np.uint8).reshape(n, dtype.itemsize)


def unpack(raw: np.ndarray, dtype: np.dtype, k: int, d: int, stored: np.dtype) -> dict:
    """Records uint8 [n, row_bytes] -> {"summary" [n,K,D] stored dtype, "scale" [n,K] f32
    (int8 only), "coverage", "event_time" int64, "present" uint8}; all-zero records (never
    written) come out as zeros with present 0."""
    records = np.ascontiguousarray(raw).view(dtype).reshape(len(raw))
    out = {  # summary and scale are views into `raw`, rows `row_bytes` apart: no copy
        "summary": records["summary"].view(stored).reshape(len(raw), k, d),
        "coverage": records["coverage"].astype(np.int64),
        "event_time": records["event_time"].astype(np.int64),
        "present": records["present"].copy(),
    }
    if "scale" in dtype.names:
        out["scale"] = records["scale"]
    return out


# --------------------------------------------------------------------------- arrays


def sharded_spec(kvstore: dict, shape: tuple, dtype: np.dtype, shard_rows: int) -> dict:
    """zarr3 spec of a per-row array: shards of `shard_rows` rows, one inner chunk per row."""
    rest = [max(1, s) for s in shape[1:]]
    bytes_codec = {"name": "bytes", "configuration": {"endian": "little"}}
    return {
        "driver": "zarr3",
        "kvstore": kvstore,
        "metadata": {
            "shape": list(shape),
            "data_type": ts.dtype(dtype).name,
            "chunk_grid": {
                "name": "regular",
                "configuration": {"chunk_shape": [min(shard_rows, shape[0]), *rest]},
            },
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": [1, *rest],
                        "codecs": [bytes_codec]
                        if np.dtype(dtype).itemsize > 1
                        else [{"name": "bytes"}],
                        "index_codecs": [bytes_codec, {"name": "crc32c"}],
                        "index_location": "end",
                    },
                }
            ],
        },
    }


class ShardBuffer:
    """Holds rows of sharded arrays until their shard is complete, then writes the shard.

    Rows written twice keep the later value, as a direct write would. A shard still partial
    when more than `_BUFFERED_SHARDS` are pending (rows arriving out of order) is written as
    it is; TensorStore merges a later write into it.
    """

    def __init__(self, arrays: Mapping[str, ts.TensorStore], num_rows: int, shard_rows: int):
        self._arrays = arrays
        self._num_rows = num_rows
        self._shard_rows = shard_rows
        self._pending: dict[int, dict[int, dict[str, np.ndarray]]] = {}  # shard -> row -> values

    def write(self, ids: np.ndarray, values: Mapping[str, np.ndarray]) -> None:
        for j, row in enumerate(ids.tolist()):
            shard = self._pending.setdefault(row // self._shard_rows, {})
            shard[row] = {name: v[j].copy() for name, v in values.items()}  # not the block
        for shard in sorted({row // self._shard_rows for row in ids.tolist()}):
            if len(self._pending.get(shard, ())) == self._shard_size(shard):
                self._flush(shard)
        while len(self._pending) > _BUFFERED_SHARDS:
            self._flush(max(self._pending, key=lambda s: len(self._pending[s])))

    def close(self) -> None:
        for shard in sorted(self._pending):
            self._flush(shard)

    def _shard_size(self, shard: int) -> int:
        return min(self._shard_rows, self._num_rows - shard * self._shard_rows)

    def _flush(self, shard: int) -> None:
        rows = self._pending.pop(shard)
        ids = np.array(sorted(rows), np.int64)
        contiguous = ids[-1] - ids[0] + 1 == len(ids)
        index = slice(int(ids[0]), int(ids[-1]) + 1) if contiguous else ids
        futures = []
        for name, array in self._arrays.items():
            stacked = np.stack([rows[row][name] for row in ids.tolist()])
            futures.append(array[index].write(stacked))
        for future in futures:
            future.commit.result()


# --------------------------------------------------------------------------- fast reads


class RowReader:
    """Random-access reads of the ``row`` array by byte range, one request per row."""

    def __init__(self, kvstore: dict, num_rows: int, row_bytes: int, shard_rows: int, context):
        self._spec = kvstore  # of the array's directory (ending in "/")
        self._num_rows = num_rows
        self._row_bytes = row_bytes
        self._shard_rows = shard_rows
        self._local = kvstore.get("driver") == "file"
        self._kvstore = None if self._local else ts.KvStore.open(kvstore, context=context).result()
        # Byte offset of each row in its shard (_ABSENT: never written), from shard indexes
        # read on first use: 8 bytes of host memory per row.
        self._offsets = np.full(num_rows, _NOT_LOADED, np.int64)
        self._files: dict[int, int] = {}  # shard -> open file descriptor (file kvstore)

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Records of rows `ids` (int64, each in [0, num_rows)) as uint8 [B, row_bytes]; rows
        never written (no shard, or no inner chunk) are zeros."""
        out = np.empty((len(ids), self._row_bytes), np.uint8)
        offsets = self._offsets[ids]
        if np.any(offsets == _NOT_LOADED):
            for shard in np.unique(ids[offsets == _NOT_LOADED] // self._shard_rows).tolist():
                self._load_index(shard)
            offsets = self._offsets[ids]
        todo = np.flatnonzero(offsets >= 0)
        out[offsets < 0] = 0
        shards = ids // self._shard_rows
        if self._local:
            self._read_local(out, todo, shards, offsets)
        else:
            self._read_kvstore(out, todo, shards, offsets)
        return out

    def _read_local(self, out, todo, shards, offsets) -> None:
        flat, width = memoryview(out.reshape(-1)), self._row_bytes
        fds = [self._file(shard) for shard in shards[todo].tolist()]
        for j, fd, offset in zip(todo.tolist(), fds, offsets[todo].tolist(), strict=True):
            if os.preadv(fd, [flat[j * width : (j + 1) * width]], offset) != width:
                raise self._damaged(int(shards[j]), "a row past its end")

    def _read_kvstore(self, out, todo, shards, offsets) -> None:
        width = self._row_bytes
        with ts.Batch() as batch:
            futures = [
                self._kvstore.read(
                    self._key(int(shards[j])),
                    byte_range=slice(int(offsets[j]), int(offsets[j]) + width),
                    batch=batch,
                )
                for j in todo.tolist()
            ]
        for j, future in zip(todo.tolist(), futures, strict=True):
            value = future.result().value
            if len(value) != width:
                raise self._damaged(int(shards[j]), "a row past its end")
            out[j] = np.frombuffer(value, np.uint8)

    def _key(self, shard: int) -> str:
        return f"c/{shard}/0"  # zarr3 default chunk key encoding, grid [shard, 0]

    def _file(self, shard: int) -> int:
        if shard not in self._files:
            self._files[shard] = os.open(self._spec["path"] + self._key(shard), os.O_RDONLY)
        return self._files[shard]

    def _load_index(self, shard: int) -> None:
        """Reads a shard's index (offset, length per row) into the offsets of its rows, once:
        a published version is immutable. A shard without a file holds no row."""
        size = self._shard_rows * _INDEX_ENTRY_BYTES + _CRC_BYTES  # the last shard's too
        raw = self._read_tail(shard, size)
        if raw is not None and len(raw) != size:
            raise self._damaged(shard, "no complete index")
        rows = slice(shard * self._shard_rows, (shard + 1) * self._shard_rows)
        count = len(self._offsets[rows])
        if raw is None:
            self._offsets[rows] = _ABSENT
            return
        entries = np.frombuffer(raw[:-_CRC_BYTES], "<u8").reshape(self._shard_rows, 2)[:count]
        written = entries[:, 0] != _MISSING
        if np.any(written & (entries[:, 1] != self._row_bytes)):
            raise self._damaged(shard, f"a row that is not {self._row_bytes} bytes")
        self._offsets[rows] = np.where(written, entries[:, 0].astype(np.int64), _ABSENT)

    def _read_tail(self, shard: int, size: int) -> bytes | None:
        if self._local:
            try:
                fd = self._file(shard)
            except FileNotFoundError:
                return None
            length = os.fstat(fd).st_size
            return os.pread(fd, size, length - size) if length >= size else b""
        try:
            result = self._kvstore.read(self._key(shard), byte_range=slice(-size, None)).result()
        except ValueError:  # a byte range outside a value shorter than the index
            return b""
        return result.value if result.state == "value" else None

    def _damaged(self, shard: int, what: str) -> SummaryStoreError:
        return SummaryStoreError(
            f"row shard {self._key(shard)!r} under {self._spec.get('path', '')!r} is damaged "
            f"(it has {what}). Fix: rebuild the version under a new id (--mode=build_cache)"
        )

    def close(self) -> None:
        for fd in self._files.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._files.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules already torn down
            pass

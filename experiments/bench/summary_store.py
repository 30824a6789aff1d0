r"""Random-read and write throughput of the summary store, against an in-RAM gather.

  python -m experiments.bench.summary_store [--rows=50000] [--layouts=rows,ocdbt]

Writes `--rows` int8 rows of K x D summaries (K=128, D=64: 8 KB of values and 512 B of
scales a row) in each layout to a fresh local directory, then times random batches of
`--batch` (256) row ids, the same ids for every layout:

  read_rows_per_s          layout "rows": `SummaryStore.read_quantized` (int8 + scales,
                           coverage, event time; dequantization is left to the device)
  read_f32_rows_per_s      layout "rows": `SummaryStore.read` (dequantized on the host)
  layouts.<name>           per layout timed (e.g. "ocdbt"): `read` (f32) rows/s and the
                           in-RAM gather of that layout's arrays, timed in turns with it
  numpy_gather_rows_per_s  the same row records (same bytes) gathered from a numpy array in
                           RAM with the same ids: the ceiling
  write_rows_per_s         `write_version` of the whole layout-"rows" version from f32
                           rows, data generation excluded, host int8 quantization included
  quantize_rows_per_s      that host quantization alone, on the same rows (a build that
                           quantizes on device skips it)

  refresh_bytes_fraction   bytes a refresh of 1% of the rows (random ones, as if 1% of the
                           users got new events) writes, over the bytes of the full build:
                           everything under each version's prefix on disk (arrays, index,
                           metadata, row map, manifest); the other 99% are carried by
                           reference (`SummaryStore.write_refresh`)

`bytes_per_row` is measured on disk (the row shards, index included, over the rows);
`dense_bytes_per_row` is K*D. The default of 50k rows (436 MB) exceeds the store's 256 MB
read cache, so cached chunks do not flatter the per-array layouts; the files themselves sit in
the OS page cache, as the RAM ceiling does. The script uses only API that commits before the
"rows" layout also have for the per-array layouts, so the "before" figures come from running
it there with `--layouts=ocdbt` (results/summary_store_before_cpu.json). `serve` is
`experiments.bench.serving.measure` at this K and D (VISTA's `Scorer` against full target
attention over the raw history; `--serve=false` skips it). Prints progress to stderr and one
JSON object as the last stdout line.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import tensorstore as ts
from absl import app, flags

from experiments.bench import serving
from vista_jax.fingerprints import git_commit
from vista_jax.quantize import quantize_int8
from vista_jax.store import RowBlock, SummaryStore

FLAGS = flags.FLAGS
flags.DEFINE_integer("rows", 50_000, "Rows in the store.")
flags.DEFINE_integer("k", 128, "Summary tokens per row.")
flags.DEFINE_integer("d", 64, "Width of a summary token.")
flags.DEFINE_integer("batch", 256, "Rows per random read.")
flags.DEFINE_integer("batches", 200, "Timed random reads per layout (after 10 warm-up ones).")
flags.DEFINE_integer("shard_rows", 1024, "Rows per shard (layout rows; chunk_rows).")
flags.DEFINE_integer("chunk_rows", 64, "Rows per chunk of the per-array layouts (main's 64).")
flags.DEFINE_list("layouts", ["rows", "ocdbt"], "Layouts to write and time.")
flags.DEFINE_string("dir", "", "Where to write the stores (default: a fresh temp dir).")
flags.DEFINE_bool("serve", True, "Measure serving (experiments.bench.serving) into `serve`.")

BLOCK = 4096


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def blocks(num_rows: int, k: int, d: int):
    """Deterministic row blocks (a few blocks of f32 in memory at a time)."""
    for start in range(0, num_rows, BLOCK):
        ids = np.arange(start, min(start + BLOCK, num_rows))
        rng = np.random.default_rng(start)
        x = rng.standard_normal((len(ids), k, d), np.float32)
        yield RowBlock(ids, x, ids * 3)


def write(root: str, layout: str) -> tuple[float, dict]:
    chunk_rows = FLAGS.shard_rows if layout == "rows" else FLAGS.chunk_rows
    generated = list(blocks(FLAGS.rows, FLAGS.k, FLAGS.d)) if FLAGS.rows <= 100_000 else None
    t0 = time.perf_counter()
    manifest = SummaryStore.write_version(
        root, version="v1", summaries=iter(generated or blocks(FLAGS.rows, FLAGS.k, FLAGS.d)),
        num_rows=FLAGS.rows, config_hash="bench", summarizer_step=0, quantization="int8",
        chunk_rows=chunk_rows, layout=layout,
    )  # fmt: skip
    return time.perf_counter() - t0, manifest


def time_reads(reads: dict, batches) -> dict[str, float]:
    """Rows/s of each read function; they take turns on each batch, so load that changes
    during the run (this machine is shared) weighs on all of them alike."""
    for ids in batches[:10]:
        for read in reads.values():
            read(ids)
    seconds = dict.fromkeys(reads, 0.0)
    for ids in batches[10:]:
        for name, read in reads.items():
            t0 = time.perf_counter()
            read(ids)
            seconds[name] += time.perf_counter() - t0
    return {name: (len(batches) - 10) * FLAGS.batch / s for name, s in seconds.items()}


def per_array_gather(store: SummaryStore):
    """The ceiling of a per-array layout: its core arrays (the same bytes) in RAM, each
    gathered with the ids, as `read` does before decoding."""
    names = ("summary", "scale", "present", "coverage", "event_time")
    arrays = {n: store._arrays[n].read().result() for n in names if n in store._arrays}
    return lambda ids: [a[ids] for a in arrays.values()]


def disk_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def refresh_fraction(root: pathlib.Path) -> dict:
    """Refreshes 1% of the rows of version v1 (layout "rows") and compares bytes on disk."""
    rng = np.random.default_rng(1)
    written = np.sort(rng.choice(FLAGS.rows, max(1, FLAGS.rows // 100), replace=False))
    parent_row = np.arange(FLAGS.rows)
    parent_row[written] = -1
    x = rng.standard_normal((len(written), FLAGS.k, FLAGS.d), np.float32)
    t0 = time.perf_counter()
    SummaryStore.write_refresh(
        str(root), parent="v1", version="v1-refresh", rows=[RowBlock(written, x, written * 3)],
        written_rows=written, parent_row=parent_row, config_hash="bench-refreshed",
        data_fingerprint="", delta_fingerprint="bench", with_extras=False,
        chunk_rows=FLAGS.shard_rows,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    full = disk_bytes(root / "versions" / "v1")
    refresh = disk_bytes(root / "versions" / "v1-refresh")
    log(f"[rows] refresh of {len(written)} rows: {refresh} of {full} bytes in {seconds:.1f}s")
    return {
        "refresh_bytes_fraction": refresh / full,
        "refresh_rows_fraction": len(written) / FLAGS.rows,
        "refresh_bytes": refresh,
        "full_build_bytes": full,
        "refresh_rows_per_s": len(written) / seconds,
    }


def main(argv):
    del argv
    top = pathlib.Path(FLAGS.dir or tempfile.mkdtemp(prefix="summary_store_bench_"))
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, FLAGS.rows, FLAGS.batch) for _ in range(FLAGS.batches + 10)]
    result = {"layouts": {}, "write_rows_per_s_by_layout": {}}
    for layout in FLAGS.layouts:
        root = top / layout
        shutil.rmtree(root, ignore_errors=True)
        seconds, manifest = write(str(root), layout)
        result["write_rows_per_s_by_layout"][layout] = FLAGS.rows / seconds
        log(f"[{layout}] wrote {FLAGS.rows} rows in {seconds:.1f}s")
        store = SummaryStore.open(str(root), context=ts.Context(
            {"cache_pool": {"total_bytes_limit": 256 << 20}}))  # fmt: skip
        if layout != "rows":
            rates = time_reads({"f32": store.read, "ram": per_array_gather(store)}, batches)
            result["layouts"][layout] = {
                "read_f32_rows_per_s": rates["f32"],
                "numpy_gather_rows_per_s": rates["ram"],
            }
            log(f"[{layout}] read: {rates} rows/s")
            continue
        result["write_rows_per_s"] = FLAGS.rows / seconds
        data = root / manifest["data"] / "row"
        result["bytes_per_row"] = disk_bytes(data / "c") / FLAGS.rows
        result["manifest_bytes_per_row"] = manifest["bytes_per_row"]
        # The ceiling: the same row records, in RAM, gathered with the same ids.
        records = np.empty((FLAGS.rows, manifest["bytes_per_row"]), np.uint8)
        for start in range(0, FLAGS.rows, BLOCK):
            ids = np.arange(start, min(start + BLOCK, FLAGS.rows))
            records[ids] = store._rows.read(ids)
        rates = time_reads(
            {"quantized": store.read_quantized, "f32": store.read, "ram": records.__getitem__},
            batches,
        )
        del records
        result["layouts"][layout] = {
            "read_f32_rows_per_s": rates["f32"],
            "read_rows_per_s": rates["quantized"],
            "numpy_gather_rows_per_s": rates["ram"],
        }
        result["read_f32_rows_per_s"] = rates["f32"]
        result["read_rows_per_s"] = rates["quantized"]
        result["numpy_gather_rows_per_s"] = rates["ram"]
        result["read_over_ram_gather"] = rates["quantized"] / rates["ram"]
        log(f"[rows] read: {rates} rows/s")
        result |= refresh_fraction(root)
    seconds = 0.0
    for block in blocks(FLAGS.rows, FLAGS.k, FLAGS.d):  # generation excluded
        t0 = time.perf_counter()
        quantize_int8(block.summaries)
        seconds += time.perf_counter() - t0
    result["quantize_rows_per_s"] = FLAGS.rows / seconds
    result["dense_bytes_per_row"] = FLAGS.k * FLAGS.d
    result.setdefault("refresh_bytes_fraction", None)  # measured with layout "rows" only
    result["serve"] = None
    if FLAGS.serve:
        result["serve"] = serving.measure(serving.ServeBenchConfig(k=FLAGS.k, d=FLAGS.d))
    else:
        result["serve_reason"] = "skipped (--serve=false)"
    result["config"] = {
        "rows": FLAGS.rows, "k": FLAGS.k, "d": FLAGS.d, "batch": FLAGS.batch,
        "timed_batches": FLAGS.batches, "shard_rows": FLAGS.shard_rows,
        "chunk_rows_per_array_layouts": FLAGS.chunk_rows, "quantization": "int8",
        "kvstore": "file", "cache_pool_bytes": 256 << 20, "ids": "uniform, with repeats",
        "cpu_count": os.cpu_count(), "load_avg": list(os.getloadavg()),
        "python": platform.python_version(), "git_commit": git_commit(),
    }  # fmt: skip
    if not FLAGS.dir:
        shutil.rmtree(top, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)

"""Multi-process runs (docs/MULTIHOST.md) against one process, on loopback CPU collectives.

The end-to-end test launches `tests/multihost_driver.py` as 1 process x 4 CPU devices, then
as 2 processes x 2 devices under `jax.distributed` (gloo), and compares the loss curves of
`train_source` and the caches `build_cache` wrote. The other tests hold the pieces (input
shards, the store's group write) to their single-process references in this process.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import threading

import grain
import numpy as np
import pytest

from vista_jax import store_group
from vista_jax.data import inputs
from vista_jax.errors import ConfigError
from vista_jax.store import RowBlock, SummaryStore, SummaryStoreError

ROOT = pathlib.Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "multihost_driver.py"
TIMEOUT_S = 240  # per launch; a hung collective fails the test instead of the suite
# A config small enough to compile quickly; the cache has 24 rows in shards of 8, so each of
# two processes writes whole shards of its own.
CONFIG = [
    "--config=experiments/synthetic/config.py:tiny",
    "--config.mesh.shape=(4,1)",
    "--config.data.num_users=24",
    "--config.data.history_len=100",
    "--config.data.history_window=100",
    "--config.data.num_candidates=16",
    "--config.data.num_recent=8",
    "--config.summarizer.num_layers=1",
    "--config.summarizer.d_model=16",
    "--config.summarizer.num_seeds=4",
    "--config.summarizer.chunk_size=32",
    "--config.ranker.d_model=16",
    "--config.source.num_steps=3",
    "--config.cache.chunk_rows=8",
    "--config.cache.batch_size=8",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args_per_process: list[list[str]], env: dict, logs: pathlib.Path) -> None:
    """Runs the driver processes together; kills them all if one fails or they time out."""
    procs = []
    try:
        for i, args in enumerate(args_per_process):
            log = open(logs / f"log_{len(list(logs.iterdir()))}_{i}.txt", "w")  # noqa: SIM115
            procs.append((subprocess.Popen([sys.executable, str(DRIVER), *args], cwd=ROOT,
                                           env=env, stdout=log, stderr=subprocess.STDOUT), log))  # fmt: skip
        for proc, _ in procs:
            proc.wait(timeout=TIMEOUT_S)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    failed = [(p.args, p.returncode) for p, _ in procs if p.returncode != 0]
    if failed:
        tails = "\n".join(f.read_text()[-3000:] for f in sorted(logs.iterdir()))
        pytest.fail(f"driver failed: {failed}\n{tails}")


def _read_all(root) -> dict:
    store = SummaryStore.open(root)
    rows = store.read_quantized(np.arange(store.num_rows))
    return {"store": store, **rows._asdict()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process dir, two-process dir): metrics and workdirs of both launches."""
    tmp = tmp_path_factory.mktemp("multihost")
    logs = tmp / "logs"
    logs.mkdir()
    env = os.environ | {  # Both launches share compiled programs (init ops, mostly).
        "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }
    one, two = tmp / "one", tmp / "two"
    data = [f"--config.data.data_dir={tmp / 'data'}"]
    _launch(
        [[*CONFIG, *data, "--devices=4", f"--workdir={one / 'work'}", f"--out={one}"]], env, logs
    )
    address = f"127.0.0.1:{_free_port()}"
    data = [f"--config.data.data_dir={tmp / 'data_two'}"]  # Built by process 0 first.
    _launch(
        [
            [*CONFIG, *data, "--devices=2", f"--workdir={two / 'work'}", f"--out={two}",
             f"--copy_source_from={one / 'work'}", f"--coordinator_address={address}",
             "--num_processes=2", f"--process_id={i}"]  # fmt: skip
            for i in range(2)
        ],
        env,
        logs,
    )
    return one, two


def _metrics(directory: pathlib.Path, process: int) -> list[dict]:
    return json.loads((directory / f"metrics_{process}.json").read_text())


def test_two_processes_give_the_loss_curve_of_one(runs):
    one, two = runs
    reference = _metrics(one, 0)
    assert [m["step"] for m in reference] == [1, 2, 3]
    for process in (0, 1):
        curve = _metrics(two, process)
        assert [m["step"] for m in curve] == [m["step"] for m in reference]
        for got, want in zip(curve, reference, strict=True):
            for key in ("loss", "task_loss", "recon_loss", "grad_norm"):
                np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    losses = [m["loss"] for m in reference]
    assert len(set(losses)) == len(losses)  # The curve moves: equal curves mean something.


def test_two_processes_build_the_cache_of_one(runs):
    one, two = runs
    want = _read_all(one / "work" / "cache")
    # From the same summarizer checkpoint: the same rows, bit for bit.
    same = _read_all(two / "work_from_ref" / "cache")
    assert same["present"].all() and want["present"].all()
    for key in ("values", "scale", "coverage", "event_time"):
        np.testing.assert_array_equal(same[key], want[key], err_msg=key)
    manifest = same["store"].manifest
    assert manifest["present_rows"] == manifest["num_rows"] == 24
    assert manifest["watermark"] == want["store"].manifest["watermark"]
    # From the two-process training run: equal to float tolerance (the summarizers agree to
    # rounding), so the dequantized summaries agree to about one int8 step.
    trained = _read_all(two / "work" / "cache")
    np.testing.assert_array_equal(trained["coverage"], want["coverage"])
    got = trained["store"].read(np.arange(24)).summaries
    ref = want["store"].read(np.arange(24)).summaries
    step = np.abs(ref).max(axis=-1, keepdims=True) / 127
    assert np.all(np.abs(got - ref) <= 1.01 * step + 1e-6)


# -- the pieces, in this process ----------------------------------------------------------------
@pytest.mark.parametrize("count", [2, 4])
def test_input_shards_partition_each_global_batch(count):
    ds = grain.MapDataset.range(1000).shuffle(seed=3).repeat()
    whole = iter(inputs.batched(ds, 8))
    shards = [iter(inputs.batched(ds, 8, (i, count))) for i in range(count)]
    for _ in range(5):
        blocks = [next(s) for s in shards]
        np.testing.assert_array_equal(np.concatenate(blocks), next(whole))
    state = shards[1].get_state()
    assert state == whole.get_state()  # Counts global batches: resumable under any count.


def test_input_shards_refuse_an_indivisible_batch():
    with pytest.raises(ConfigError, match="divisible by 3"):
        inputs.batched(grain.MapDataset.range(10), 8, (0, 3))


@pytest.mark.parametrize(
    "num_rows, chunk_rows, count, expect",
    [
        (24, 8, 2, [(0, 16), (16, 24)]),
        (60, 16, 2, [(0, 32), (32, 60)]),
        (10, 16, 3, [(0, 10), (10, 10), (10, 10)]),  # one shard: process 0 writes it
        (40, 8, 3, [(0, 16), (16, 32), (32, 40)]),
    ],
)
def test_row_ranges_are_whole_disjoint_shards(num_rows, chunk_rows, count, expect):
    got = [store_group.row_range(num_rows, chunk_rows, i, count) for i in range(count)]
    assert [(r.start, r.stop) for r in got] == expect


class ThreadGroup:
    """`store_group.Group` over threads of this process: a stand-in for jax.distributed."""

    def __init__(self, count: int):
        self.count = count
        self._barrier = threading.Barrier(count)
        self._slots: list = [None] * count

    def member(self, index: int):
        group = self

        class Member:
            def __init__(self):
                self.index, self.count = index, group.count

            def broadcast(self, payload):
                return self.gather(payload)[0]

            def gather(self, payload):
                group._slots[index] = json.loads(json.dumps(payload))
                group._barrier.wait()
                out = list(group._slots)
                group._barrier.wait()
                return out

        return Member()


def _rows(num_rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    summaries = rng.normal(size=(num_rows, 3, 4)).astype(np.float32)
    return summaries, np.arange(num_rows) * 2, np.arange(num_rows) + 100


def _blocks(rows: range, summaries, coverage, times, size=5):
    for start in range(rows.start, rows.stop, size):
        ids = np.arange(start, min(start + size, rows.stop))
        yield RowBlock(ids, summaries[ids], coverage[ids], None, times[ids])


def _group_write(root, count, num_rows, fail_process=None, layout="rows"):
    summaries, coverage, times = _rows(num_rows)
    group = ThreadGroup(count)
    results, errors = [None] * count, [None] * count

    def work(i):
        member = group.member(i)
        rows = store_group.row_range(num_rows, 8, i, count)
        blocks = _blocks(rows, summaries, coverage, times)
        if i == fail_process:
            blocks = iter([RowBlock(np.array([rows.start]), np.full((1, 3, 4), np.nan, np.float32),
                                    np.zeros(1, np.int64), None, None)])  # fmt: skip
        try:
            results[i] = SummaryStore.write_version(
                root, version="v1", summaries=blocks, num_rows=num_rows, config_hash="h",
                summarizer_step=1, chunk_rows=8, layout=layout, group=member,
            )  # fmt: skip
        except Exception as e:
            errors[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results, errors


@pytest.mark.parametrize("layout", ["rows", "plain"])
def test_group_write_equals_one_writer(tmp_path, layout):
    num_rows = 29  # 4 shards of 8 (the last short) over 3 writers
    results, errors = _group_write(tmp_path / "group", 3, num_rows, layout=layout)
    assert errors == [None] * 3
    assert all(r == results[0] for r in results) and results[0]["present_rows"] == num_rows
    assert all(r.current == "v1" for r in results)
    summaries, coverage, times = _rows(num_rows)
    SummaryStore.write_version(
        tmp_path / "one", version="v1", summaries=summaries, coverage=coverage,
        event_time=times, config_hash="h", summarizer_step=1, chunk_rows=8, layout=layout,
    )  # fmt: skip
    got, want = SummaryStore.open(tmp_path / "group"), SummaryStore.open(tmp_path / "one")
    ids = np.arange(num_rows)
    for a, b in zip(got.read_quantized(ids), want.read_quantized(ids), strict=True):
        np.testing.assert_array_equal(a, b)
    assert got.manifest["watermark"] == want.manifest["watermark"] == 100 + num_rows - 1
    attempts = list((tmp_path / "group" / "versions" / "v1" / "attempts").iterdir())
    assert len(attempts) == 1  # one attempt, written by all three


def test_group_write_fails_everywhere_and_publishes_nothing(tmp_path):
    results, errors = _group_write(tmp_path / "group", 2, 24, fail_process=1)
    assert results == [None, None]
    assert "non-finite" in str(errors[1])
    assert isinstance(errors[0], SummaryStoreError) and "process 1 of 2" in str(errors[0])
    assert not (tmp_path / "group" / "CURRENT").exists()
    assert not list((tmp_path / "group").rglob("manifest.json"))
    assert not list((tmp_path / "group").rglob("zarr.json"))  # the attempt was discarded


def test_group_write_refuses_ocdbt(tmp_path):
    _, errors = _group_write(tmp_path / "group", 2, 24, layout="ocdbt")
    assert all("ocdbt" in str(e) for e in errors)

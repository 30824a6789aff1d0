"""Multi-process runs (docs/MULTIHOST.md) against one process, on loopback CPU collectives.

The end-to-end test launches `tests/multihost_driver.py` as 1 process x 4 CPU devices and,
at the same time, as 2 processes x 2 devices under `jax.distributed` (gloo); it compares the
loss curves of `train_source`, and the cache the 2 processes built with the one a single
process builds here from their summarizer checkpoint. The other tests hold the pieces (input
shards, the store's group write) to their single-process references in this process.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading

import grain
import jax
import numpy as np
import pytest

from vista_jax import distributed, pipeline, sharding, store_group
from vista_jax.config import from_config_dict
from vista_jax.data import inputs
from vista_jax.errors import ConfigError
from vista_jax.store import RowBlock, SummaryStore, SummaryStoreError

ROOT = pathlib.Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "multihost_driver.py"
TIMEOUT_S = 600  # per launch (about a minute idle, minutes on a loaded CPU); a hang fails it
# A config small enough to compile quickly; the cache has 24 rows in shards of 8, so each of
# two processes writes whole shards of its own.
OVERRIDES = {
    "mesh.shape": (4, 1),
    "data.num_users": 24,
    "data.history_len": 100,
    "data.history_window": 100,
    "data.num_candidates": 16,
    "data.num_recent": 8,
    "summarizer.num_layers": 1,
    "summarizer.d_model": 16,
    "summarizer.num_seeds": 4,
    "summarizer.chunk_size": 32,
    "ranker.d_model": 16,
    "source.num_steps": 3,
    "cache.chunk_rows": 8,
    "cache.batch_size": 8,
}
CONFIG = ["--config=experiments/synthetic/config.py:tiny"] + [
    f"--config.{k}={v}".replace(" ", "") for k, v in OVERRIDES.items()
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args_per_process: list[list[str]], env: dict, logs: pathlib.Path) -> None:
    """Runs the driver processes together; kills them all if one fails or they time out."""
    procs, files = [], []
    try:
        for i, args in enumerate(args_per_process):
            files.append(open(logs / f"process_{i}.txt", "w"))  # noqa: SIM115
            command = [sys.executable, str(DRIVER), *args]
            out = files[-1]
            procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out))
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for f in files:
            f.close()
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        tails = "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(logs.iterdir()))
        pytest.fail(f"driver processes (index, exit status) {failed} failed:\n{tails}")


def _read_all(root) -> dict:
    store = SummaryStore.open(root)
    rows = store.read_quantized(np.arange(store.num_rows))
    return {"store": store, **rows._asdict()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process dir, two-process dir): the metrics and workdir of each launch, run at
    the same time (each process compiles alone: 3 processes on the test's 2 cores)."""
    tmp = tmp_path_factory.mktemp("multihost")
    logs = tmp / "logs"
    logs.mkdir()
    one, two = tmp / "one", tmp / "two"
    address = f"127.0.0.1:{_free_port()}"
    single = [f"--config.data.data_dir={one / 'data'}", "--devices=4"]
    multi = [f"--config.data.data_dir={two / 'data'}", "--devices=2",  # process 0 builds it
             f"--coordinator_address={address}", "--num_processes=2"]  # fmt: skip
    _launch(
        [[*CONFIG, *single, f"--workdir={one / 'work'}", f"--out={one}"]]
        + [
            [*CONFIG, *multi, f"--process_id={i}", f"--workdir={two / 'work'}", f"--out={two}"]
            for i in range(2)
        ],
        os.environ,
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


def _typed_config(data_dir):
    from experiments.synthetic import config as synthetic

    config = synthetic.get_config("tiny")
    for key, value in OVERRIDES.items():
        section, name = key.split(".")
        setattr(config[section], name, value)
    config.data.data_dir = str(data_dir)
    return from_config_dict(config)


def test_two_processes_build_the_cache_of_one(runs, tmp_path):
    one, two = runs
    got = _read_all(two / "work" / "cache")
    assert got["present"].all()
    manifest = got["store"].manifest
    assert manifest["present_rows"] == manifest["num_rows"] == 24
    shards = list((two / "work" / "cache").rglob("row/c/*/*"))
    assert len(shards) == 3  # 24 rows in shards of 8: process 0 wrote 2, process 1 one
    # One process, from the same summarizer checkpoint: the same rows, bit for bit.
    config = _typed_config(two / "data")
    shutil.copytree(two / "work" / "source", tmp_path / "source")
    pipeline.build_cache(config, tmp_path, pipeline.load_data(config, tmp_path))
    want = _read_all(tmp_path / "cache")
    for key in ("values", "scale", "present", "coverage", "event_time"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert manifest["watermark"] == want["store"].manifest["watermark"]
    # Against the single-process run: its summarizer trained to the same float tolerance, so
    # the dequantized summaries agree to about one int8 step.
    ref = _read_all(one / "work" / "cache")
    np.testing.assert_array_equal(ref["coverage"], got["coverage"])
    a, b = (r["store"].read(np.arange(24)).summaries for r in (got, ref))
    assert np.all(np.abs(a - b) <= 1.01 * np.abs(b).max(axis=-1, keepdims=True) / 127 + 1e-6)


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


# -- joining a run ------------------------------------------------------------------------------
def test_run_py_flags_make_the_distributed_options():
    # In a fresh interpreter: parsing sets the process-wide absl flags.
    argv = ["run.py", "--config=experiments/synthetic/config.py:tiny", "--workdir=/tmp/unused",
            "--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=1",
            "--local_device_ids=0,1"]  # fmt: skip
    code = (
        "import json, sys, run; run.define_flags(); run.parse_flags(sys.argv[1:]); "
        "o = run.distributed_options(); "
        "print(json.dumps([o.requested, o.coordinator_address, o.num_processes, "
        "o.process_id, list(o.local_device_ids)]))"
    )
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True,
                         text=True, timeout=TIMEOUT_S, check=True)  # fmt: skip
    requested, address, count, index, local = json.loads(out.stdout.strip().splitlines()[-1])
    assert requested and (address, count, index, local) == ("127.0.0.1:1234", 2, 1, [0, 1])


def test_one_process_never_initializes(monkeypatch):
    def fail(**kwargs):
        raise AssertionError("jax.distributed.initialize called")

    monkeypatch.setattr(jax.distributed, "initialize", fail)
    assert not distributed.initialize(distributed.DistributedOptions())
    assert distributed.broadcast_text("x") == "x" and distributed.gather_text("x") == ["x"]
    assert distributed.batch_shard(
        sharding.make_mesh((4, 1), ("data", "model"), jax.devices()[:4])
    ) == (0, 1)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_processes=2, process_id=2), "process_id must lie in"),
        (dict(coordinator_address="node0"), "host:port"),
        (dict(num_processes=0), "num_processes must be >= 1"),
    ],
)
def test_bad_distributed_flags_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        distributed.initialize(distributed.DistributedOptions(**options))


def test_a_multi_process_mesh_must_span_every_device(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"needs a mesh over all 8 devices.*\(8, 1\)"):
        sharding.make_mesh((1, 1), ("data", "model"))

"""Publication races of the summary store, each reproduced deterministically.

Two builds with one version id; an older build finishing after a newer one (and the
converse); a kill between the manifest and CURRENT; a reader holding a version that garbage
collection removed; a killed build's leftovers; retention. Blocks are fed by generators, so
one build can run (or pause) in the middle of another at a chosen point.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import tensorstore as ts
from subprocesses import TIMEOUT_S

import vista_jax.store as store_module
from vista_jax.store import RowBlock, SummaryStore, SummaryStoreError

R, K, D = 100, 2, 4
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(params=["file", "memory"])
def store_root(request, tmp_path):
    """(root, context): a local directory, or a memory kvstore private to the test."""
    if request.param == "file":
        return str(tmp_path / "store"), ts.Context()
    return {"driver": "memory", "path": "cache/"}, ts.Context()


def _rows(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((R, K, D)).astype(np.float32)


def _write(root, context, version, summaries, **kwargs):
    if not isinstance(summaries, np.ndarray):
        kwargs.setdefault("num_rows", R)
    else:
        kwargs.setdefault("coverage", np.arange(R, dtype=np.int64))
    kwargs.setdefault("config_hash", "cfg")
    kwargs.setdefault("summarizer_step", 1)
    kwargs.setdefault("quantization", "none")  # exact round trips: data identity is checked
    return SummaryStore.write_version(
        root, version=version, summaries=summaries, context=context, **kwargs
    )


def _halves(x: np.ndarray, between):
    """Row blocks of `x` in two halves; `between()` runs after the first is written."""
    ids = np.arange(R)
    yield RowBlock(ids[: R // 2], x[: R // 2], ids[: R // 2])
    between()
    yield RowBlock(ids[R // 2 :], x[R // 2 :], ids[R // 2 :])


def _kvstore(root, context) -> ts.KvStore:
    """The store root as a kvstore, keys relative to it."""
    spec = root if isinstance(root, dict) else {"driver": "file", "path": root + "/"}
    return ts.KvStore.open(spec, context=context).result()


def _keys(root, context, prefix: str = "") -> list[str]:
    keys = (k.decode() for k in _kvstore(root, context).list().result())
    return [k for k in keys if k.startswith(prefix)]


def _current(root, context) -> str:
    return SummaryStore.open(root, context=context).version


def _assert_reads(store: SummaryStore, x: np.ndarray) -> None:
    batch = store.read(np.arange(R))
    assert batch.present.all()
    np.testing.assert_array_equal(batch.summaries, x)


def _assert_user_message(error: BaseException) -> None:
    message = str(error)
    assert "\n" not in message and "Fix: " in message, message


# --------------------------------------------------------------------------- same id


def test_two_builds_with_one_version_id_never_overwrite_the_published_one(store_root):
    root, context = store_root
    x_first, x_second = _rows(1), _rows(2)
    held = {}

    def first_build_runs_to_completion():
        # While the second build is half written, the first publishes v1 and a reader opens it.
        _write(root, context, "v1", x_first)
        held["reader"] = SummaryStore.open(root, context=context)
        _assert_reads(held["reader"], x_first)

    try:
        _write(root, context, "v1", _halves(x_second, first_build_runs_to_completion))
        error = None
    except SummaryStoreError as e:
        error = e
    _assert_reads(held["reader"], x_first)  # the reader holding v1 is untouched
    _assert_reads(SummaryStore.open(root, context=context), x_first)  # and so is v1
    assert error is not None and "'v1' is already published" in str(error)
    _assert_user_message(error)
    # The refused build deleted its own arrays: only the published attempt is left.
    attempts = {k.split("/")[3] for k in _keys(root, context, "versions/v1/attempts/")}
    assert attempts == {held["reader"].manifest["attempt"]}


def test_identical_rerun_completes_without_a_second_copy(store_root):
    root, context = store_root
    x = _rows(3)
    first = _write(root, context, "v1", x)
    again = _write(root, context, "v1", x)
    assert again == first and again.rerun and not again.moved_current
    assert {k.split("/")[3] for k in _keys(root, context, "versions/v1/attempts/")} == {
        first["attempt"]
    }


# --------------------------------------------------------------------------- order of builds


def test_older_build_finishing_after_a_newer_one_leaves_current(store_root):
    root, context = store_root
    _write(root, context, "v0", _rows(0))
    x_old, x_new = _rows(1), _rows(2)
    result = _write(
        root, context, "v-old", _halves(x_old, lambda: _write(root, context, "v-new", x_new))
    )
    assert _current(root, context) == "v-new"
    assert (result.current, result.moved_current) == ("v-new", False)
    _assert_reads(SummaryStore.open(root, version="v-old", context=context), x_old)
    _assert_reads(SummaryStore.open(root, context=context), x_new)
    assert result["build_clock"] < SummaryStore.open(root, context=context).manifest["build_clock"]


def test_newer_build_finishing_after_an_older_one_takes_current(store_root):
    root, context = store_root
    _write(root, context, "v0", _rows(0))
    events = {name: threading.Event() for name in ("old_mid", "old_go", "new_mid", "new_go")}
    results, errors = {}, []

    def build(version, seed, mid, go):
        def pause():
            events[mid].set()
            assert events[go].wait(30)

        try:
            results[version] = _write(root, context, version, _halves(_rows(seed), pause))
        except BaseException as e:  # surfaced by the main thread
            errors.append(e)
            events[mid].set()

    old = threading.Thread(target=build, args=("v-old", 1, "old_mid", "old_go"))
    new = threading.Thread(target=build, args=("v-new", 2, "new_mid", "new_go"))
    old.start()
    assert events["old_mid"].wait(30)
    new.start()  # starts after the old build: it is newer
    assert events["new_mid"].wait(30)
    events["old_go"].set()
    old.join(30)
    assert not errors and _current(root, context) == "v-old"
    events["new_go"].set()
    new.join(30)
    assert not errors, errors
    assert _current(root, context) == "v-new" and results["v-new"].moved_current


# --------------------------------------------------------------------------- kill


def test_rerun_after_a_kill_between_manifest_and_current_completes(store_root, monkeypatch):
    root, context = store_root
    _write(root, context, "v0", _rows(0))
    x = _rows(1)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before CURRENT was written")

    with monkeypatch.context() as patch:
        patch.setattr(store_module, "write_current", killed)
        with pytest.raises(KeyboardInterrupt):
            _write(root, context, "v1", x)
    assert _current(root, context) == "v0"  # v1 is published, CURRENT not yet moved
    result = _write(root, context, "v1", x)  # the rerun
    assert result.moved_current and result.rerun
    _assert_reads(SummaryStore.open(root, context=context), x)


def test_killed_build_leaves_an_attempt_that_collection_removes(tmp_path):
    root, context = str(tmp_path / "store"), ts.Context()
    _write(root, context, "v1", _rows(1))
    script = f"""
        import os, signal
        import numpy as np
        from vista_jax.store import RowBlock, SummaryStore

        def blocks():
            yield RowBlock(np.arange(50), np.ones((50, {K}, {D}), np.float32), np.zeros(50, int))
            os.kill(os.getpid(), signal.SIGKILL)

        SummaryStore.write_version({root!r}, version="v2", summaries=blocks(), num_rows={R},
                                   config_hash="cfg", summarizer_step=1)
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, timeout=TIMEOUT_S
    )
    assert proc.returncode == -signal.SIGKILL
    assert _keys(root, context, "versions/v2/attempts/")
    assert _current(root, context) == "v1"
    # Younger than the grace period: it may be a build still running.
    assert SummaryStore.collect_garbage(root, keep_last=1, context=context).attempts == []
    report = SummaryStore.collect_garbage(root, keep_last=1, grace_seconds=0, context=context)
    assert len(report.attempts) == 1 and report.attempts[0].startswith("versions/v2/attempts/")
    assert (report.versions, report.kept) == ([], ["v1"])
    assert _keys(root, context, "versions/v2/") == []
    assert not (tmp_path / "store" / "versions" / "v2").exists()  # nor its directories
    _write(root, context, "v2", _rows(2))  # the id is free again
    assert _current(root, context) == "v2"


def test_failed_write_deletes_its_own_attempt(store_root):
    root, context = store_root

    def crash():
        raise RuntimeError("summarizer crashed")

    with pytest.raises(RuntimeError, match="summarizer crashed"):
        _write(root, context, "v1", _halves(_rows(1), crash))
    assert _keys(root, context, "versions/") == []


# --------------------------------------------------------------------------- collection


def test_reader_of_a_collected_version_gets_a_clear_error(store_root):
    root, context = store_root
    x1 = _rows(1)
    _write(root, context, "v1", x1, extra_arrays={"state": np.ones((R, 3), np.float32)})
    reader = SummaryStore.open(root, context=context)
    _assert_reads(reader, x1)
    _write(root, context, "v2", _rows(2))
    _write(root, context, "v3", _rows(3))
    report = SummaryStore.collect_garbage(root, keep_last=1, context=context)
    assert (report.versions, report.attempts, report.kept) == (["v1", "v2"], [], ["v3"])
    for read in (lambda: reader.read(np.arange(5)), lambda: reader.read_extra("state", [0])):
        with pytest.raises(SummaryStoreError, match="'v1' .*garbage-collected.*reopen") as error:
            read()
        _assert_user_message(error.value)
    assert _keys(root, context, "versions/v1/") == [] == _keys(root, context, "versions/v2/")
    with pytest.raises(SummaryStoreError, match="'v1' .* is not published"):
        SummaryStore.open(root, version="v1", context=context)
    _assert_reads(SummaryStore.open(root, context=context), _rows(3))


def test_reader_never_returns_zeros_for_a_deleted_version(store_root):
    root, context = store_root
    _write(root, context, "v1", _rows(1))
    reader = SummaryStore.open(root, context=context)
    kvstore = _kvstore(root, context)
    kvstore.delete_range(ts.KvStore.KeyRange("versions/v1/", "versions/v10")).result()
    with pytest.raises(SummaryStoreError, match="'v1' .*garbage-collected"):
        reader.read(np.arange(R))


def test_retention_keeps_current_newer_versions_and_pins(store_root):
    root, context = store_root
    for i in range(1, 6):
        _write(root, context, f"v{i}", _rows(i))
    SummaryStore.set_current(root, "v3", context=context)  # a rollback
    kwargs = dict(keep_last=1, keep=["v1"], context=context)
    planned = SummaryStore.collect_garbage(root, dry_run=True, **kwargs)
    assert (planned.versions, planned.kept) == (["v2"], ["v5", "v4", "v3", "v1"])
    _assert_reads(SummaryStore.open(root, version="v2", context=context), _rows(2))
    assert SummaryStore.collect_garbage(root, **kwargs) == planned
    with pytest.raises(SummaryStoreError, match="not published"):
        SummaryStore.open(root, version="v2", context=context)
    assert _current(root, context) == "v3"
    SummaryStore.set_current(root, "v5", context=context)
    assert SummaryStore.collect_garbage(root, keep_last=0, context=context).kept == ["v5"]


def test_format_2_version_is_read_and_collected(store_root):
    root, context = store_root
    x = _rows(1)
    manifest = _write(root, context, "v1", x)
    kvstore = _kvstore(root, context)
    for key in _keys(root, context, manifest["data"]):  # move arrays to versions/v1/data/
        value = kvstore.read(key).result().value
        kvstore.write("versions/v1/data/" + key[len(manifest["data"]) :], value).result()
    kvstore.delete_range(
        ts.KvStore.KeyRange("versions/v1/attempts/", "versions/v1/attempts0")
    ).result()
    attempt_keys = ("attempt", "data", "build_clock", "content_hash")
    legacy = {k: v for k, v in manifest.items() if k not in attempt_keys}
    kvstore.write("versions/v1/manifest.json", json.dumps(legacy | {"format_version": 2})).result()
    _assert_reads(SummaryStore.open(root, context=context), x)
    _write(root, context, "v2", _rows(2))  # a format-2 version is older than any other
    assert SummaryStore.collect_garbage(root, keep_last=1, context=context).versions == ["v1"]
    assert _keys(root, context, "versions/v1/") == []

"""Refresh in place: a delta folded into the cache equals a full rebuild on the merged log,
shares untouched rows by reference, refuses bad deltas, survives reruns and collection."""

import pathlib
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from flax import nnx

import vista_jax.store as store_module
from experiments.eventlog import config as eventlog_config
from vista_jax import cache, checkpoints, pipeline
from vista_jax.config import from_config_dict
from vista_jax.errors import UserError
from vista_jax.models.summarizer import Summarizer
from vista_jax.store import RowBlock, SummaryStore, SummaryStoreError

USERS, TOUCHED = 20, (1, 5, 12)
HEADER = "user,item,timestamp,rating,category"


# --------------------------------------------------------------------------- event logs


def _event(user: int, item: int, time: int, rating: int) -> str:
    return f"u{user},i{item},{time},{rating},g{item % 4}"


def _base_lines() -> list[str]:
    rng = np.random.default_rng(0)
    lines = []
    for u in range(USERS):
        for j in range(int(rng.integers(10, 22))):
            item = int(rng.integers(1, 31))
            lines.append(_event(u, item, 1000 + 50 * j + u, int(rng.integers(1, 6))))
    return lines


def _delta_lines() -> list[str]:
    """New events of TOUCHED users, the first tied with the user's last base event."""
    rng = np.random.default_rng(1)
    last = {}
    for line in _base_lines():
        user, _, time, *_ = line.split(",")
        last[user] = max(last.get(user, 0), int(time))
    lines = []
    for u in TOUCHED:
        time = last[f"u{u}"]
        for j in range(int(rng.integers(4, 12))):
            item = int(rng.integers(1, 31))
            lines.append(_event(u, item, time + 7 * j, int(rng.integers(1, 6))))
    return lines


def _write_csv(path: pathlib.Path, lines: list[str]) -> str:
    path.write_text("\n".join([HEADER, *lines]) + "\n")
    return str(path)


def _config(tmp, window: int):
    config = eventlog_config.get_config("tiny")
    config.data.path = _write_csv(tmp / "events.csv", _base_lines())
    config.data.data_dir = str(tmp / "data")
    config.data.history_window = window
    config.data.snapshot_every = 4
    config.source.num_steps = 2
    config.source.batch_size = 8
    config.cache.chunk_rows = 16
    config.cache.batch_size = 32
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A source checkpoint holding a summarizer (random init: the refresh is checked against
    a rebuild with the same weights), copied into each workdir."""
    tmp = tmp_path_factory.mktemp("refresh")
    config = from_config_dict(_config(tmp, 64))
    summarizer = Summarizer(config.summarizer_for(pipeline.load_data(config, tmp)), nnx.Rngs(3))
    with checkpoints.manager(tmp / "trained" / "source", ("summarizer",)) as mngr:
        state = checkpoints.params_of(summarizer)
        mngr.save(3, args=ocp.args.Composite(summarizer=ocp.args.StandardSave(state)))
        mngr.wait_until_finished()
    return tmp


def _workdir(trained, name: str, window: int, build: bool = True):
    """A workdir with the trained source and (when `build`) a cache built on the base log."""
    workdir = trained / name
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree(trained / "trained" / "source", workdir / "source")
    config = _config(trained, window)
    if build:
        pipeline.train_and_evaluate(config, workdir, "build_cache")
    return config, workdir


def _refresh(config, workdir, delta_path):
    config = config.copy_and_resolve_references()
    config.data.delta_path = str(delta_path)
    pipeline.train_and_evaluate(config, workdir, "refresh_cache")
    return SummaryStore.open(cache.cache_root(workdir))


def _full_rebuild(trained, window: int):
    """build_cache on one file holding the base log then the delta."""
    config, workdir = _workdir(trained, f"full_{window}", window, build=False)
    config.data.path = _write_csv(trained / "merged.csv", _base_lines() + _delta_lines())
    pipeline.train_and_evaluate(config, workdir, "build_cache")
    return SummaryStore.open(cache.cache_root(workdir))


def _attempt_dir(workdir, store: SummaryStore) -> pathlib.Path:
    return pathlib.Path(cache.cache_root(workdir)) / store.manifest["data"]


# --------------------------------------------------------------------------- (a) and (b)


@pytest.mark.parametrize("window", [64, 8], ids=["whole_history", "sliding_window"])
def test_refresh_equals_full_rebuild_and_shares_untouched_rows(trained, window):
    config, workdir = _workdir(trained, f"refresh_{window}", window)
    parent = SummaryStore.open(cache.cache_root(workdir))
    delta = _write_csv(trained / "delta.csv", _delta_lines())
    refreshed = _refresh(config, workdir, delta)
    full = _full_rebuild(trained, window)

    info = refreshed.manifest["refresh"]
    assert info["parent"] == parent.version and info["delta_fingerprint"].startswith("sha256:")
    assert refreshed.lineage["refresh"] == {k: info[k] for k in ("parent", "delta_fingerprint")}
    assert parent.lineage["refresh"] is None
    assert refreshed.extra_names == full.extra_names == parent.extra_names
    assert bool(full.extra_names) == (window == 64)  # whole history: states folded
    for key in ("config_hash", "data_fingerprint", "num_rows", "k", "d", "quantization"):
        assert refreshed.manifest[key] == full.manifest[key], key
    assert refreshed.watermark == full.watermark

    rows = np.arange(full.num_rows)
    got, want = refreshed.read_quantized(rows), full.read_quantized(rows)
    np.testing.assert_array_equal(got.present, want.present)
    np.testing.assert_array_equal(got.coverage, want.coverage)
    np.testing.assert_array_equal(got.event_time, want.event_time)
    # Equal up to float summation order, then int8: within one quantization step.
    step = np.maximum(got.scale, want.scale)[..., None]
    diff = np.abs(refreshed.read(rows).summaries - full.read(rows).summaries)
    assert np.all(diff <= 1.01 * step + 1e-6), diff.max()
    for name in full.extra_names:
        np.testing.assert_allclose(
            refreshed.read_extra(name, rows), full.read_extra(name, rows), rtol=1e-4, atol=1e-4
        )

    # (b) Untouched users' rows are the parent's bytes, read from the parent's shards.
    touched = {sorted(f"u{u}" for u in range(USERS)).index(f"u{u}") for u in TOUCHED}
    old_offsets, new_offsets = _row_offsets(parent, full, workdir, config)
    old_rows = np.concatenate([np.arange(old_offsets[u], old_offsets[u + 1])
                               for u in range(USERS) if u not in touched])  # fmt: skip
    new_rows = np.concatenate([np.arange(new_offsets[u], new_offsets[u + 1])
                               for u in range(USERS) if u not in touched])  # fmt: skip
    assert not np.array_equal(old_rows, new_rows)  # later users' row ids shifted
    np.testing.assert_array_equal(refreshed._rows.read(new_rows), parent._rows.read(old_rows))
    # Only the rows of touched users at new snapshot positions were written.
    written = info["rows_written"]
    new_positions = sum(
        len(set(_snapshots(new_offsets, full, u)) - set(_snapshots(old_offsets, parent, u)))
        for u in touched
    )
    assert 0 < written == new_positions < sum(new_offsets[u + 1] - new_offsets[u] for u in touched)
    record = refreshed.manifest["row_record"]
    shards = -(-written // record["shard_rows"])
    shard_bytes = sum(
        f.stat().st_size for f in (_attempt_dir(workdir, refreshed) / "row").rglob("c/*/*")
    )
    assert shard_bytes == written * record["row_bytes"] + shards * (record["shard_rows"] * 16 + 4)


def _row_offsets(parent, full, workdir, config):
    """Row offsets of the base and the merged log (users' rows are contiguous)."""
    base, merged = (
        _data(config, path) for path in (config.data.path, workdir.parent / "merged.csv")
    )
    assert base.num_rows == parent.num_rows and merged.num_rows == full.num_rows
    return base.row_offsets, merged.row_offsets


def _data(config, path):
    config = config.copy_and_resolve_references()
    config.data.path = str(path)
    return pipeline.load_data(from_config_dict(config), None)


def _snapshots(offsets, store, user):
    rows = np.arange(offsets[user], offsets[user + 1])
    return store.read_quantized(rows).coverage.tolist()


# --------------------------------------------------------------------------- (c) bad deltas


@pytest.fixture(scope="module")
def built(trained):
    """A workdir whose cache was built on the base log (tests copy it before changing it)."""
    return _workdir(trained, "built", 64)


def _versions(workdir) -> list[str]:
    return sorted(p.name for p in (pathlib.Path(cache.cache_root(workdir)) / "versions").iterdir())


def _bad_deltas(tmp: pathlib.Path) -> dict[str, tuple[str, str]]:
    """name -> (delta path, a phrase its error names)."""
    late = _event(3, 4, 1000, 5)  # before u3's last base event
    cases = {
        "unknown_user": ([_event(99, 4, 10**6, 5)], "user(s) not in the base log"),
        "unknown_item": ([_event(3, 999, 10**6, 5)], "item(s) not in the base log"),
        "older_than_the_users_last_event": ([late], "predate their user's last event"),
    }
    out = {name: (_write_csv(tmp / f"{name}.csv", lines), phrase)
           for name, (lines, phrase) in cases.items()}  # fmt: skip
    no_rating = tmp / "no_rating.csv"
    no_rating.write_text("user,item,timestamp\nu3,i4,1000000\n")
    out["wrong_columns"] = (str(no_rating), "feedback column(s)")
    out["missing_file"] = (str(tmp / "absent.csv"), "absent.csv")
    return out


@pytest.mark.parametrize(
    "case",
    ["unknown_user", "unknown_item", "older_than_the_users_last_event", "wrong_columns",
     "missing_file"],
)  # fmt: skip
def test_bad_delta_is_a_clear_error_and_publishes_nothing(built, tmp_path, case):
    config, workdir = built
    before, current = _versions(workdir), SummaryStore.open(cache.cache_root(workdir)).version
    path, phrase = _bad_deltas(tmp_path)[case]
    with pytest.raises(UserError) as error:
        _refresh(config, workdir, path)
    message = str(error.value)
    assert phrase in message and "Fix: " in message, message
    assert _versions(workdir) == before
    assert SummaryStore.open(cache.cache_root(workdir)).version == current


def test_refresh_without_a_delta_is_refused(built):
    config, workdir = built
    with pytest.raises(UserError, match="delta_path"):
        pipeline.train_and_evaluate(config, workdir, "refresh_cache")


# --------------------------------------------------------------------------- (d) kill, rerun


def test_rerun_after_a_kill_before_current_completes_and_a_rerun_after_is_a_no_op(
    built, trained, monkeypatch
):
    config, src = built
    workdir = trained / "rerun"
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree(src, workdir)
    parent = SummaryStore.open(cache.cache_root(workdir)).version
    delta = _write_csv(trained / "delta.csv", _delta_lines())

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after the manifest, before CURRENT

    monkeypatch.setattr(store_module, "_advance_current", killed)
    with pytest.raises(KeyboardInterrupt):
        _refresh(config, workdir, delta)
    monkeypatch.undo()
    published = [v for v in _versions(workdir) if v != parent]
    assert len(published) == 1 and SummaryStore.open(cache.cache_root(workdir)).version == parent
    manifest = SummaryStore.open(cache.cache_root(workdir), version=published[0]).manifest

    store = _refresh(config, workdir, delta)  # the rerun adopts the manifest, moves CURRENT
    assert store.version == published[0] and store.manifest == manifest
    attempts = pathlib.Path(cache.cache_root(workdir)) / "versions" / published[0] / "attempts"
    assert len(list(attempts.iterdir())) == 1  # the rerun's own attempt was discarded
    assert _refresh(config, workdir, delta).version == published[0]  # applied: nothing to do
    assert len(_versions(workdir)) == 2


# --------------------------------------------------------------------------- store level

R, K, D = 40, 2, 4


@pytest.fixture(params=["file", "memory"])
def store_root(request, tmp_path):
    if request.param == "file":
        return str(tmp_path / "store"), ts.Context()
    return {"driver": "memory", "path": "cache/"}, ts.Context()


def _x(seed: int, n: int = R) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, K, D)).astype(np.float32)


def _extras(x: np.ndarray) -> dict:
    return {"state": x[:, 0] * 2}


def _build(root, context, version, x):
    return SummaryStore.write_version(
        root, version=version, summaries=x, coverage=np.arange(len(x)), config_hash="h",
        summarizer_step=1, extra_arrays=_extras(x), quantization="none", chunk_rows=8,
        event_time=np.arange(len(x)) + 100, context=context,
    )  # fmt: skip


def _refresh_rows(root, context, parent, version, expected, parent_row, written, seed, **kw):
    """A refresh writing rows `written` (fresh values) and carrying `parent_row`; updates the
    expected f32 rows of the new version and returns them."""
    new = _x(seed, len(written))
    blocks = kw.pop("blocks", None) or [
        RowBlock(written, new, written + 1000, _extras(new), written + 5000)
    ]
    SummaryStore.write_refresh(
        root, parent=parent, version=version, rows=blocks, written_rows=written,
        parent_row=parent_row, config_hash="h2", data_fingerprint="data",
        delta_fingerprint=f"delta-{seed}", chunk_rows=8, context=context, **kw,
    )  # fmt: skip
    out = np.where((parent_row >= 0)[:, None, None], expected[parent_row.clip(0)], 0)
    out[written] = new
    return out


def _chain(root, context):
    """v1 (R rows), v2: 2 rows inserted at 5 (later rows shift), v3: row 20 rewritten."""
    x1 = _x(0)
    _build(root, context, "v1", x1)
    row2 = np.concatenate([np.arange(5), [-1, -1], np.arange(5, R)])
    x2 = _refresh_rows(root, context, "v1", "v2", x1, row2, np.array([5, 6]), 1)
    row3 = np.arange(R + 2)
    row3[20] = -1
    x3 = _refresh_rows(root, context, "v2", "v3", x2, row3, np.array([20]), 2)
    return x3


def _assert_store(store: SummaryStore, x: np.ndarray) -> None:
    rows = np.arange(len(x))
    batch = store.read(rows)
    assert batch.present.all()
    np.testing.assert_array_equal(batch.summaries, x)
    np.testing.assert_array_equal(store.read_extra("state", rows), x[:, 0] * 2)


def test_refresh_of_a_refresh_reads_through_one_flattened_map(store_root):
    root, context = store_root
    x3 = _chain(root, context)
    store = SummaryStore.open(root, context=context)
    assert store.version == "v3" and store.num_rows == R + 2
    _assert_store(store, x3)
    info = store.manifest["refresh"]
    assert info["parent"] == "v2" and info["rows_written"] == 1
    assert {s["data"].split("/")[1] for s in info["sources"]} == {"v1", "v2"}  # no map hop
    coverage = store.read_quantized(np.arange(R + 2)).coverage
    assert coverage[20] == 1020 and coverage[5] == 1005 and coverage[7] == 5  # carried stamp


def test_collection_keeps_data_a_live_refresh_references(store_root):
    root, context = store_root
    x3 = _chain(root, context)
    report = SummaryStore.collect_garbage(root, keep_last=1, grace_seconds=0, context=context)
    assert report.versions == ["v1", "v2"] and report.attempts == [] and report.kept == ["v3"]
    _assert_store(SummaryStore.open(root, context=context), x3)
    with pytest.raises(SummaryStoreError):
        SummaryStore.open(root, version="v1", context=context)
    # Once nothing references them, the parents' attempts go too.
    _build(root, context, "v4", _x(9))
    report = SummaryStore.collect_garbage(root, keep_last=1, grace_seconds=0, context=context)
    assert report.versions == ["v3"]
    assert sorted(a.split("/")[1] for a in report.attempts) == ["v1", "v2"]
    keys = [k.decode() for k in _kvstore(root, context).list().result()]
    assert not [k for k in keys if k.startswith(("versions/v1", "versions/v2", "versions/v3"))]


def test_refresh_whose_parent_is_collected_meanwhile_is_withdrawn(store_root):
    root, context = store_root
    x1 = _x(0)
    _build(root, context, "v1", x1)
    new = _x(1, 1)

    def blocks():
        _build(root, context, "other", _x(5))  # moves CURRENT, then v1 is collected
        SummaryStore.collect_garbage(root, keep_last=1, grace_seconds=0, context=context)
        yield RowBlock(np.array([3]), new, np.array([3]), _extras(new), np.array([3]))

    with pytest.raises(SummaryStoreError, match="garbage-collected while the refresh"):
        _refresh_row_3(root, context, x1, blocks())
    _assert_v2_unpublished(root, context, current="other")


def test_failed_refresh_write_publishes_nothing_and_deletes_its_attempt(store_root):
    root, context = store_root
    x1 = _x(0)
    _build(root, context, "v1", x1)

    def blocks():
        raise RuntimeError("summarizer crashed")
        yield

    with pytest.raises(RuntimeError):
        _refresh_row_3(root, context, x1, blocks())
    _assert_v2_unpublished(root, context, current="v1")


def _refresh_row_3(root, context, x1, blocks):
    """Refreshes v1 into v2 rewriting row 3 from `blocks` (every other row carried)."""
    parent_row = np.arange(R)
    parent_row[3] = -1
    _refresh_rows(root, context, "v1", "v2", x1, parent_row, np.array([3]), 1, blocks=blocks)


def _assert_v2_unpublished(root, context, current: str):
    keys = [k.decode() for k in _kvstore(root, context).list().result()]
    assert not [k for k in keys if k.startswith("versions/v2")]
    assert SummaryStore.open(root, context=context).version == current


def test_refresh_from_a_version_that_is_not_current_is_refused(store_root):
    root, context = store_root
    _build(root, context, "v1", _x(0))
    _build(root, context, "v2", _x(1))
    with pytest.raises(SummaryStoreError, match="found CURRENT at 'v2'"):
        _refresh_rows(root, context, "v1", "v3", _x(0), np.arange(R), np.array([], np.int64), 1)


def _kvstore(root, context) -> ts.KvStore:
    spec = root if isinstance(root, dict) else {"driver": "file", "path": root + "/"}
    return ts.KvStore.open(spec, context=context).result()

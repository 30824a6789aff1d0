"""The summary store on S3, end to end, against moto's S3 server started here on loopback.

Every publication race of `store_publish_test` is replayed on an S3 root; the conditional
writes the protocol relies on are checked where they matter, at the server: a hook in front of
moto runs a competing writer *between* TensorStore's requests (after its HEAD check, before its
conditional PUT), so the race is closed by the server's If-None-Match / If-Match evaluation or
not at all. The cache stage of the pipeline writes to S3 (`cache.root`) and the downstream
stages read from it.

Moto evaluates a conditional PUT by checking, then writing, in whichever of its server threads
runs the request; S3 evaluates it atomically. The gate below hands moto one request at a time,
which gives moto S3's atomicity (and the concurrent tests deterministic outcomes).
"""

import inspect
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import uuid

import numpy as np
import pytest
import tensorstore as ts
from subprocesses import TIMEOUT_S

moto_server = pytest.importorskip(
    "moto.server", reason="moto[server] is not installed (pip install -r requirements.txt)"
)
import boto3  # noqa: E402  (a dependency of moto)
import store_publish_test as publish  # noqa: E402

from vista_jax import cache, pipeline  # noqa: E402
from vista_jax.config import from_config_dict  # noqa: E402
from vista_jax.serving import Scorer  # noqa: E402
from vista_jax.store import SummaryStore, SummaryStoreError, quantize_int8  # noqa: E402
from vista_jax.store_layout import (  # noqa: E402
    CURRENT_KEY,
    manifest_key,
    read_stamped,
    write_current,
    write_if,
)

BUCKET = "vista-store-test"
REGION = "us-east-1"
R, K, D = 100, 2, 4


class _Gate:
    """Moto's WSGI app behind a lock (one request at a time, as S3's atomic conditional
    writes), with hooks that run before a chosen request reaches moto."""

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()
        self.hooks = []  # [(method, key suffix, callable)]: each runs once
        self.log = []  # (method, key, conditional headers) of every request, in order

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        headers = {
            name: environ[f"HTTP_{name.upper().replace('-', '_')}"]
            for name in ("If-Match", "If-None-Match")
            if f"HTTP_{name.upper().replace('-', '_')}" in environ
        }
        self.log.append((method, path, headers))
        for hook in list(self.hooks):
            if hook[0] == method and path.endswith(hook[1]):
                self.hooks.remove(hook)
                hook[2]()  # outside the lock: the hook's own requests go through
        with self.lock:
            return list(self.app(environ, start_response))

    def before(self, method: str, key: str, action) -> None:
        """Runs `action()` when the next `method` request for a key ending in `key` arrives,
        before moto sees it."""
        self.hooks.append((method, "/" + key, action))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto():
    """(endpoint URL, gate) of a moto S3 server on 127.0.0.1, with the test bucket."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")  # read by {"type": "environment"}
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request
        server = moto_server.ThreadedMotoServer("127.0.0.1", _free_port(), verbose=False)
        server.start()
        try:
            wsgi = server._server  # werkzeug's server: it calls .app for each request
            gate = wsgi.app = _Gate(wsgi.app)
            endpoint = "http://{}:{}".format(*server.get_host_and_port())
            s3 = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
            s3.create_bucket(Bucket=BUCKET)
            yield endpoint, gate
        finally:
            server.stop()


def _spec(endpoint: str, conditional: bool | None = None) -> dict:
    """An S3 root under a fresh prefix; `conditional` sets TensorStore's
    ``use_conditional_write`` (None: its default for a non-AWS endpoint, a HEAD check then a
    conditional PUT; True: the conditional PUT alone, as on AWS; False: no condition sent)."""
    spec = {
        "driver": "s3",
        "bucket": BUCKET,
        "path": f"t-{uuid.uuid4().hex[:12]}/cache/",
        "endpoint": endpoint,
        "aws_region": REGION,
        "aws_credentials": {"type": "environment"},
    }
    if conditional is not None:
        spec["use_conditional_write"] = conditional
    return spec


@pytest.fixture
def s3_root(moto):
    endpoint, gate = moto
    yield _spec(endpoint), ts.Context()
    gate.hooks.clear()


def _base(spec: dict, context) -> ts.KvStore:
    return ts.KvStore.open(spec, context=context).result()


# --------------------------------------------------------------------------- build and read


def test_build_publish_and_read_on_s3(s3_root, tmp_path):
    root, context = s3_root
    rng = np.random.default_rng(0)
    x = rng.standard_normal((R, K, D)).astype(np.float32)
    rows = np.arange(0, R, 2)  # odd rows are never written: they read as absent
    kwargs = dict(
        version="v1",
        summaries=x[rows],
        row_ids=rows,
        num_rows=R,
        coverage=rows * 3,
        event_time=1000 + rows,
        extra_arrays={"state": rng.standard_normal((len(rows), 3)).astype(np.float32)},
        config_hash="cfg",
        summarizer_step=5,
        chunk_rows=16,
    )
    written = SummaryStore.write_version(root, context=context, **kwargs)
    assert written.moved_current and written["present_rows"] == len(rows)
    store = SummaryStore.open(root, expected_config_hash="cfg", context=context)
    assert store.version == "v1" and json.loads(store.lineage["root"])["driver"] == "s3"
    ids = np.array([4, 1, 98, 0, 150])  # 1 was never written, 150 is past the end
    batch = store.read_quantized(ids)
    q, scale = quantize_int8(x[[4, 98, 0]])
    np.testing.assert_array_equal(batch.present, [True, False, True, True, False])
    np.testing.assert_array_equal(batch.values[[0, 2, 3]], q)
    np.testing.assert_array_equal(batch.scale[[0, 2, 3]], scale)
    np.testing.assert_array_equal(batch.values[[1, 4]], 0)
    np.testing.assert_array_equal(batch.coverage, [12, 0, 294, 0, 0])
    np.testing.assert_array_equal(batch.event_time[[0, 2, 3]], [1004, 1098, 1000])
    state = store.read_extra("state", ids)
    np.testing.assert_array_equal(state[[0, 2, 3]], kwargs["extra_arrays"]["state"][[2, 49, 0]])
    np.testing.assert_array_equal(state[[1, 4]], 0)
    # The same build on a local path stores the same content, byte for byte.
    local = SummaryStore.write_version(tmp_path / "store", **kwargs)
    assert local["content_hash"] == written["content_hash"]
    local_batch = SummaryStore.open(tmp_path / "store").read_quantized(np.arange(R))
    s3_batch = store.read_quantized(np.arange(R))
    for a, b in zip(local_batch, s3_batch, strict=True):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- the races, replayed

SCENARIOS = [
    publish.test_two_builds_with_one_version_id_never_overwrite_the_published_one,
    publish.test_identical_rerun_completes_without_a_second_copy,
    publish.test_older_build_finishing_after_a_newer_one_leaves_current,
    publish.test_newer_build_finishing_after_an_older_one_takes_current,
    publish.test_rerun_after_a_kill_between_manifest_and_current_completes,
    publish.test_failed_write_deletes_its_own_attempt,
    publish.test_reader_of_a_collected_version_gets_a_clear_error,
    publish.test_reader_never_returns_zeros_for_a_deleted_version,
    publish.test_retention_keeps_current_newer_versions_and_pins,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__.removeprefix("test_"))
def test_publication_race_on_s3(scenario, s3_root, monkeypatch):
    """The scenario of `store_publish_test`, on an S3 root instead of a file or memory one."""
    wants = inspect.signature(scenario).parameters
    scenario(s3_root, **({"monkeypatch": monkeypatch} if "monkeypatch" in wants else {}))


def test_killed_build_on_s3_leaves_an_attempt_that_collection_removes(s3_root):
    """A build SIGKILLed mid-write (another process) leaves unpublished objects; CURRENT and
    readers never see them; collection past the grace period removes them; the id is free."""
    root, context = s3_root
    publish._write(root, context, "v1", publish._rows(1))
    script = f"""
        import os, signal
        import numpy as np
        from vista_jax.store import RowBlock, SummaryStore

        def blocks():
            yield RowBlock(np.arange(50), np.ones((50, {K}, {D}), np.float32), np.zeros(50, int))
            os.kill(os.getpid(), signal.SIGKILL)

        SummaryStore.write_version({root!r}, version="v2", summaries=blocks(), num_rows={R},
                                   config_hash="cfg", summarizer_step=1, chunk_rows=10)
    """
    env = {**os.environ, "PYTHONPATH": str(publish.REPO)}
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, timeout=TIMEOUT_S
    )
    assert run.returncode == -signal.SIGKILL
    assert publish._keys(root, context, "versions/v2/attempts/")  # shards of the first rows
    assert publish._current(root, context) == "v1"
    report = SummaryStore.collect_garbage(root, keep_last=1, grace_seconds=0, context=context)
    assert len(report.attempts) == 1 and report.attempts[0].startswith("versions/v2/attempts/")
    assert publish._keys(root, context, "versions/v2/") == []
    publish._write(root, context, "v2", publish._rows(2))
    publish._assert_reads(SummaryStore.open(root, context=context), publish._rows(2))


# --------------------------------------------------------------------------- conditional writes


@pytest.mark.parametrize("conditional", [None, True, False], ids=["default", "put_only", "off"])
def test_current_swap_is_closed_by_the_server(moto, conditional):
    """A competing writer moves CURRENT after TensorStore's check, before its PUT: the PUT's
    If-Match refuses the stale swap. Without the condition (`off`) the stale swap would win:
    the server's check, not the client's, closes the race."""
    endpoint, gate = moto
    spec, context = _spec(endpoint, conditional), ts.Context()
    base, competitor = _base(spec, context), _base(spec, ts.Context())
    write_current(base, "v1")
    _, generation = read_stamped(base, CURRENT_KEY)
    gate.before("PUT", spec["path"] + CURRENT_KEY, lambda: write_current(competitor, "v-new"))
    swapped = write_current(base, "v-old", if_equal=generation)
    current, _ = read_stamped(base, CURRENT_KEY)
    if conditional is False:
        assert swapped and current == "v-old\n"  # the race this protocol must not have
        return
    assert not swapped and current == "v-new\n"
    puts = [h for m, p, h in gate.log if m == "PUT" and p.endswith(spec["path"] + CURRENT_KEY)]
    assert [bool(h.get("If-Match")) for h in puts] == [False, True, False]  # v1, ours, competitor


@pytest.mark.parametrize("conditional", [None, True], ids=["default", "put_only"])
@pytest.mark.parametrize("same_content", [False, True], ids=["other", "identical"])
def test_manifest_is_created_only_if_absent_on_s3(moto, conditional, same_content):
    """Another build of the same version id publishes between this build's check and its
    manifest PUT: If-None-Match refuses this one (other content), or it adopts the published
    manifest (identical content); the published version is never overwritten."""
    endpoint, gate = moto
    spec, context = _spec(endpoint, conditional), ts.Context()
    x_first = publish._rows(1)
    x_second = x_first if same_content else publish._rows(2)
    first = {}

    def first_build_publishes():
        first["manifest"] = publish._write(spec, ts.Context(), "v1", x_first)

    gate.before("PUT", spec["path"] + manifest_key("v1"), first_build_publishes)
    if same_content:
        second = publish._write(spec, context, "v1", x_second)
        assert second.rerun and second == first["manifest"]
    else:
        with pytest.raises(SummaryStoreError, match="'v1' is already published"):
            publish._write(spec, context, "v1", x_second)
    store = SummaryStore.open(spec, context=context)
    assert store.manifest == first["manifest"]
    publish._assert_reads(store, x_first)
    puts = [
        h for m, p, h in gate.log if m == "PUT" and p.endswith(spec["path"] + manifest_key("v1"))
    ]
    assert [h.get("If-None-Match") for h in puts] == ["*", "*"]  # this build's, the first's
    attempts = {k.split("/")[3] for k in publish._keys(spec, context, "versions/v1/attempts/")}
    assert attempts == {first["manifest"]["attempt"]}  # the losing build deleted its own


def test_concurrent_swaps_of_current_have_one_winner(moto):
    endpoint, _ = moto
    spec = _spec(endpoint, conditional=True)
    base = _base(spec, ts.Context())
    write_current(base, "v0")
    _, generation = read_stamped(base, CURRENT_KEY)
    start, won = threading.Barrier(6), {}

    def swap(i):
        mine = _base(spec, ts.Context())
        start.wait(30)
        won[i] = write_current(mine, f"v{i + 1}", if_equal=generation)

    threads = [threading.Thread(target=swap, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(won.values()) == [False] * 5 + [True]
    winner = next(i for i, ok in won.items() if ok)
    assert read_stamped(base, CURRENT_KEY)[0] == f"v{winner + 1}\n"


def test_concurrent_builds_of_one_version_id_publish_exactly_one(moto):
    endpoint, _ = moto
    spec = _spec(endpoint, conditional=True)
    start, outcome = threading.Barrier(3), {}

    def build(seed):
        start.wait(30)
        try:
            outcome[seed] = publish._write(spec, ts.Context(), "v1", publish._rows(seed))
        except SummaryStoreError as e:
            outcome[seed] = e

    threads = [threading.Thread(target=build, args=(seed,)) for seed in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    published = [s for s, o in outcome.items() if isinstance(o, dict)]
    assert len(published) == 1 and len(outcome) == 3, outcome
    for seed, result in outcome.items():
        if seed != published[0]:
            assert "'v1' is already published" in str(result)
    store = SummaryStore.open(spec, context=ts.Context())
    assert store.manifest == outcome[published[0]]
    publish._assert_reads(store, publish._rows(published[0]))
    keys = publish._keys(spec, ts.Context(), "versions/v1/attempts/")
    attempts = {k.split("/")[3] for k in keys}
    assert attempts == {store.manifest["attempt"]}


def test_conditional_delete_is_a_check_then_delete_on_s3(moto):
    """What S3 does NOT give (docs/ARCHITECTURE.md, *Backends*): TensorStore deletes
    conditionally by a HEAD check, then a plain DELETE. A manifest replaced in between is
    deleted anyway. Only `collect_garbage` deletes conditionally, and a manifest is replaced
    only by deleting it first, which only a collector does: hence one collector at a time."""
    endpoint, gate = moto
    spec, context = _spec(endpoint, conditional=True), ts.Context()
    base, other = _base(spec, context), _base(spec, ts.Context())
    key = manifest_key("v1")
    _, generation = read_stamped(base, key)
    assert write_if(base, key, b"first", generation)
    _, generation = read_stamped(base, key)

    def replaced():
        other.write(key, None).result()
        other.write(key, b"second").result()

    gate.before("DELETE", spec["path"] + key, replaced)
    assert write_if(base, key, None, generation)  # reported as a delete of "first"...
    assert read_stamped(base, key)[0] is None  # ...and "second" is gone too


# --------------------------------------------------------------------------- the pipeline


def test_cache_stage_writes_to_s3_and_serving_reads_it(moto, tiny_run, tmp_path):
    """`--config.cache.root=<kvstore spec JSON>`: build_cache publishes to S3 (nothing under
    the workdir), its rows equal the local cache's, and a scorer on the S3 version scores
    exactly as one on the local version."""
    endpoint, _ = moto
    config, workdir, _ = tiny_run
    work = tmp_path / "work"
    for stage in ("source", "downstream", "recent_only"):
        shutil.copytree(workdir / stage, work / stage)
    s3_config = config.copy_and_resolve_references()
    spec = _spec(endpoint)
    s3_config.cache.root = json.dumps(spec)
    pipeline.train_and_evaluate(s3_config, work, "build_cache")
    assert not (work / "cache").exists()
    typed = from_config_dict(s3_config)
    data = pipeline.load_data(typed, work)
    scfg = typed.summarizer_for(data)
    on_s3 = cache.open_cache(work, scfg, data, root=typed.cache.root)
    local = cache.open_cache(workdir, scfg, data)
    assert json.loads(on_s3.lineage["root"]) == spec
    rows = np.arange(data.num_rows)
    for a, b in zip(on_s3.read_quantized(rows), local.read_quantized(rows), strict=True):
        np.testing.assert_array_equal(a, b)
    users = np.arange(min(8, data.num_users))
    candidates = np.arange(1, 6)
    from_s3 = Scorer.load(s3_config, work, data, version=on_s3.version)
    from_local = Scorer.load(config, workdir, data)
    assert from_s3.store.version == on_s3.version != from_local.store.version
    a, b = from_s3.score(users, candidates), from_local.score(users, candidates)
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.recent_only, b.recent_only)


@pytest.mark.parametrize("layout", ["ocdbt", "plain"])
def test_other_layouts_round_trip_on_s3(s3_root, layout):
    root, context = s3_root
    x = publish._rows(4)
    publish._write(root, context, "v1", x, layout=layout, extra_arrays={"s": x[:, 0]})
    store = SummaryStore.open(root, context=context)
    publish._assert_reads(store, x)
    np.testing.assert_array_equal(store.read_extra("s", np.arange(R)), x[:, 0])

"""Tests for vista_jax.store: quantization bounds, round trips, absence, atomic publishing."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from vista_jax.errors import UserError
from vista_jax.store import (
    NO_EVENTS,
    RowBlock,
    SummaryStore,
    SummaryStoreError,
    dequantize_int8,
    quantize_int8,
)

R, K, D = 150, 4, 8


def _summaries(num_rows=R, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Tokens of very different magnitudes: one scale per token must cope with all of them.
    token_scale = 10.0 ** rng.uniform(-3, 2, size=(num_rows, K, 1))
    return (rng.standard_normal((num_rows, K, D)) * token_scale).astype(np.float32)


def _write(root, version="v1", summaries=None, context=None, **kwargs):
    summaries = _summaries() if summaries is None else summaries
    if "coverage" not in kwargs:
        kwargs["coverage"] = np.arange(len(summaries), dtype=np.int64) * 3
    kwargs.setdefault("config_hash", "cfg-a")
    kwargs.setdefault("summarizer_step", 7)
    return SummaryStore.write_version(
        root, version=version, summaries=summaries, context=context, **kwargs
    )


@pytest.fixture
def memory_root():
    """A memory kvstore private to the test (memory stores live in their context)."""
    return {"driver": "memory", "path": "cache/"}, ts.Context()


def _assert_int8_bound(x, deq, scale):
    # |x - deq| <= scale / 2 per element (rounding), with float32 slack.
    assert np.all(np.abs(x - deq) <= scale[..., None] * (0.5 + 1e-5))


# --------------------------------------------------------------------------- quantization


def test_quantize_int8_error_bound_and_zero_tokens():
    x = _summaries()
    x[3, 1] = 0.0
    q, scale = quantize_int8(x)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (R, K)
    deq = dequantize_int8(q, scale)
    _assert_int8_bound(x, deq, scale)
    assert np.all(deq[3, 1] == 0.0)
    assert np.abs(q).max() == 127  # each token's largest element uses the full range


def test_quantize_int8_on_jax_arrays_matches_numpy():
    x = _summaries(num_rows=5)
    q_np, s_np = quantize_int8(x)
    q_jx, s_jx = quantize_int8(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(q_jx), q_np)
    np.testing.assert_allclose(np.asarray(dequantize_int8(q_jx, s_jx)), dequantize_int8(q_np, s_np))


# --------------------------------------------------------------------------- round trips


def test_int8_round_trip_local_path(tmp_path):
    x = _summaries()
    manifest = _write(tmp_path / "store", summaries=x)
    store = SummaryStore.open(tmp_path / "store", expected_config_hash="cfg-a")
    assert (store.version, store.num_rows, store.k, store.d) == ("v1", R, K, D)
    assert manifest["summarizer_step"] == 7 and manifest["quantization"] == "int8"
    assert (manifest["num_rows"], manifest["chunk_rows"]) == (R, 64)
    assert "num_users" not in manifest and "chunk_users" not in manifest
    ids = np.array([149, 0, 77, 77])
    batch = store.read(ids)
    assert batch.summaries.dtype == np.float32 and batch.present.all()
    _assert_int8_bound(x[ids], batch.summaries, quantize_int8(x[ids])[1])
    np.testing.assert_array_equal(batch.coverage, ids * 3)


@pytest.mark.parametrize("quantization", ["bf16", "none"])
def test_bf16_and_float_round_trip(memory_root, quantization):
    root, context = memory_root
    x = _summaries()
    _write(root, summaries=x, quantization=quantization, context=context)
    store = SummaryStore.open(root, context=context)
    got = store.read(np.arange(R)).summaries
    if quantization == "none":
        np.testing.assert_array_equal(got, x)
    else:  # bfloat16 keeps 8 significant bits: relative error <= 2^-8 after rounding
        np.testing.assert_array_less(np.abs(got - x), np.abs(x) * 2.0**-8 + 1e-30)
    assert store.manifest["arrays"]["summary"]["dtype"] == {"bf16": "bfloat16"}.get(
        quantization, "float32"
    )


def test_absent_and_out_of_range_rows_read_as_zeros(memory_root):
    root, context = memory_root
    written = np.array([1, 3, 5])
    x = _summaries(num_rows=3) + 1.0
    state = np.ones((3, 2), np.float32)
    _write(
        root, summaries=x, row_ids=written, num_rows=10, context=context,
        extra_arrays={"state_l0": state},
    )  # fmt: skip
    store = SummaryStore.open(root, context=context)
    batch = store.read(np.array([0, 1, 3, 9, 10, 10**9, 5]))
    np.testing.assert_array_equal(batch.present, [False, True, True, False, False, False, True])
    assert np.all(batch.summaries[~batch.present] == 0.0)
    assert np.all(batch.coverage[~batch.present] == 0)
    np.testing.assert_array_equal(batch.coverage[batch.present], [0, 3, 6])
    np.testing.assert_array_equal(
        store.read_extra("state_l0", np.array([0, 1, 10])), [[0, 0], [1, 1], [0, 0]]
    )
    with pytest.raises(ValueError, match="negative row id"):
        store.read(np.array([2, -1]))
    assert store.read(np.array([], np.int64)).summaries.shape == (0, K, D)


def test_memory_url_and_plain_layout(memory_root):
    _, context = memory_root
    x = _summaries()
    _write("memory://other/", summaries=x, layout="plain", quantization="none", context=context)
    store = SummaryStore.open({"driver": "memory", "path": "other"}, context=context)
    np.testing.assert_array_equal(store.read(np.array([42])).summaries[0], x[42])


def test_extra_arrays_round_trip(memory_root):
    root, context = memory_root
    rng = np.random.default_rng(1)
    extras = {
        "state_l0": rng.standard_normal((R, 2, 3, 5)).astype(np.float32),
        "count_l0": rng.integers(0, 1000, R).astype(np.int64),
    }
    manifest = _write(root, extra_arrays=extras, context=context)
    assert manifest["extra_arrays"]["state_l0"] == {"shape": [R, 2, 3, 5], "dtype": "float32"}
    store = SummaryStore.open(root, context=context)
    assert set(store.extra_names) == set(extras)
    ids = np.array([10, 0, 149, R + 5])
    for name, values in extras.items():
        got = store.read_extra(name, ids)
        np.testing.assert_array_equal(got[:3], values[ids[:3]])
        assert np.all(got[3] == 0)
    with pytest.raises(SummaryStoreError, match="no extra array 'state_l9'"):
        store.read_extra("state_l9", ids)


def test_blockwise_write_matches_whole_array_write(memory_root):
    root, context = memory_root
    x = _summaries()
    state = np.arange(R * 6, dtype=np.float32).reshape(R, 6)
    # Blocks of 37 rows (not chunk aligned), in shuffled order, ids within a block unsorted.
    order = np.random.default_rng(2).permutation(R)

    def blocks():
        for start in range(0, R, 37):
            ids = order[start : start + 37]
            yield RowBlock(ids, x[ids], ids * 3, {"state_l0": state[ids]})

    _write(root, summaries=blocks(), coverage=None, num_rows=R, chunk_rows=16, context=context)
    store = SummaryStore.open(root, context=context)
    batch = store.read(np.arange(R))
    assert batch.present.all()
    _assert_int8_bound(x, batch.summaries, quantize_int8(x)[1])
    np.testing.assert_array_equal(batch.coverage, np.arange(R) * 3)
    np.testing.assert_array_equal(store.read_extra("state_l0", np.arange(R)), state)


def test_bad_blocks_are_refused(memory_root):
    root, context = memory_root
    bad = _summaries(num_rows=4)
    bad[2, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        _write(root, summaries=bad, context=context)
    with pytest.raises(ValueError, match=r"row ids must lie in \[0, 4\)"):
        _write(root, summaries=_summaries(3), row_ids=np.array([0, 1, 4]), num_rows=4,
               context=context)  # fmt: skip


# --------------------------------------------------------------------------- refusals


def test_config_hash_mismatch_is_refused(memory_root):
    root, context = memory_root
    _write(root, context=context)
    with pytest.raises(SummaryStoreError, match="config_hash 'cfg-a'.*expects 'cfg-b'"):
        SummaryStore.open(root, expected_config_hash="cfg-b", context=context)


def test_nothing_published_is_refused(memory_root):
    root, context = memory_root
    with pytest.raises(SummaryStoreError, match="no summary version is published"):
        SummaryStore.open(root, context=context)


def test_store_errors_are_user_errors(memory_root):
    # The command line prints a UserError as one line instead of a traceback.
    root, context = memory_root
    assert issubclass(SummaryStoreError, UserError)
    with pytest.raises(UserError, match="no summary version is published"):
        SummaryStore.open(root, context=context)


def test_corrupt_or_missing_manifest_is_refused(memory_root):
    root, context = memory_root
    _write(root, context=context)
    with pytest.raises(SummaryStoreError, match="'v9' .* is not published"):
        SummaryStore.open(root, version="v9", context=context)
    kvstore = ts.KvStore.open(root, context=context).result()
    kvstore.write("versions/v1/manifest.json", b"{not json").result()
    with pytest.raises(SummaryStoreError, match="manifest of version 'v1' .* is corrupt"):
        SummaryStore.open(root, context=context)
    kvstore.write("versions/v1/manifest.json", json.dumps({"version": "v1"}).encode()).result()
    with pytest.raises(SummaryStoreError, match="corrupt or of another format"):
        SummaryStore.open(root, context=context)


def test_user_keyed_format_1_manifest_is_refused(memory_root):
    root, context = memory_root
    manifest = _write(root, context=context)
    old = {k: v for k, v in manifest.items() if k not in ("num_rows", "chunk_rows")}
    old |= {"format_version": 1, "num_users": R, "chunk_users": 64}
    kvstore = ts.KvStore.open(root, context=context).result()
    kvstore.write("versions/v1/manifest.json", json.dumps(old).encode()).result()
    with pytest.raises(SummaryStoreError, match=r"format_version 1, this reader reads 2, 3, 4\)"):
        SummaryStore.open(root, context=context)


def test_published_version_is_not_overwritten(memory_root):
    root, context = memory_root
    x = _summaries()
    _write(root, summaries=x, context=context)
    with pytest.raises(SummaryStoreError, match="'v1' is already published .*Fix: write a new"):
        _write(root, summaries=_summaries(seed=5), context=context)
    with pytest.raises(SummaryStoreError, match=r"'v1' is already published .*\(config_hash"):
        _write(root, summaries=x, config_hash="cfg-b", context=context)
    np.testing.assert_array_equal(
        SummaryStore.open(root, context=context).read(np.arange(R)).present, np.ones(R, bool)
    )


# --------------------------------------------------------------------------- atomic publishing


def test_failed_write_leaves_old_version_current(tmp_path):
    root = tmp_path / "store"
    x1 = _summaries(seed=1)
    _write(root, summaries=x1, quantization="none")

    def failing_blocks():
        yield RowBlock(np.arange(64), _summaries(seed=2)[:64], np.zeros(64, np.int64))
        raise RuntimeError("summarizer crashed")

    with pytest.raises(RuntimeError, match="summarizer crashed"):
        _write(root, version="v2", summaries=failing_blocks(), coverage=None, num_rows=R)
    store = SummaryStore.open(root)
    assert store.version == "v1"
    np.testing.assert_array_equal(store.read(np.arange(R)).summaries, x1)
    with pytest.raises(SummaryStoreError, match="'v2' .* is not published"):
        SummaryStore.open(root, version="v2")
    # A retry under the same id writes its own attempt; the failed one deleted its arrays.
    x2 = _summaries(seed=3)
    _write(root, version="v2", summaries=x2, quantization="none")
    np.testing.assert_array_equal(SummaryStore.open(root).read(np.arange(R)).summaries, x2)


def test_new_version_becomes_current_only_when_published(memory_root):
    root, context = memory_root
    _write(root, context=context)
    x2 = _summaries(seed=4)
    seen_during_write = []

    def blocks():
        for start in range(0, R, 50):
            # Mid-build, readers still get v1 and v2 has no manifest.
            seen_during_write.append(SummaryStore.open(root, context=context).version)
            ids = np.arange(start, min(start + 50, R))
            yield RowBlock(ids, x2[ids], ids)

    manifest = _write(
        root, version="v2", summaries=blocks(), coverage=None, num_rows=R, context=context
    )
    assert seen_during_write == ["v1"] * 3
    assert SummaryStore.open(root, context=context).manifest == manifest
    # Rolling back is pointing CURRENT at an older published version.
    SummaryStore.set_current(root, "v1", context=context)
    assert SummaryStore.open(root, context=context).version == "v1"
    with pytest.raises(SummaryStoreError, match="not published"):
        SummaryStore.set_current(root, "v3", context=context)


# --------------------------------------------------------------------------- lineage


def test_manifest_names_the_lineage_of_its_rows(memory_root):
    root, context = memory_root
    written = np.arange(0, R, 3)  # a third of the rows: present_rows counts them
    x = _summaries(num_rows=len(written))
    stamps = 1_000 + written * 10
    manifest = _write(
        root, summaries=x, row_ids=written, num_rows=R, coverage=written, event_time=stamps,
        summarizer_checkpoint="/runs/a/source", data_fingerprint="syn-1234",
        watermark=5_000, context=context,
    )  # fmt: skip
    lineage = SummaryStore.open(root, context=context).lineage
    expected = {
        "version": "v1", "summarizer_checkpoint": "/runs/a/source", "summarizer_step": 7,
        "config_hash": "cfg-a", "data_fingerprint": "syn-1234", "k": K, "d": D,
        "quantization": "int8", "num_rows": R, "present_rows": len(written),
        "bytes_per_row": K * D + 4 * K + 17, "watermark": 5_000,
    }  # fmt: skip
    assert {key: lineage[key] for key in expected} == expected
    assert {key: manifest[key] for key in expected} == expected
    assert lineage["content_hash"] == manifest["content_hash"]


def test_watermark_defaults_to_the_newest_covered_event_and_bounds_every_row(memory_root):
    root, context = memory_root
    stamps = np.arange(R) * 10
    stamps[4] = NO_EVENTS  # a row covering no event does not move the watermark
    _write(root, event_time=stamps, context=context)
    assert SummaryStore.open(root, context=context).watermark == (R - 1) * 10
    with pytest.raises(ValueError, match="after the watermark"):
        _write(root, version="v2", event_time=stamps, watermark=100, context=context)


def test_bytes_per_row_of_the_per_array_layouts(memory_root):
    root, context = memory_root
    manifest = _write(root, layout="plain", quantization="bf16", context=context)
    assert manifest["bytes_per_row"] == K * D * 2 + 1 + 8 + 8  # no scale for bf16

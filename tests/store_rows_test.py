"""The "rows" layout (fast random reads) against the plain per-array layout and zarr3 itself.

The fast path reads packed row records by byte range (os.preadv on local files, batched
kvstore reads elsewhere); every test holds it equal to a reference: the "plain" layout of the
same rows, or TensorStore's own zarr3 read of the same array.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from vista_jax.quantize import dequantize_int8
from vista_jax.store import NO_EVENTS, UNKNOWN_TIME, RowBlock, SummaryStore, SummaryStoreError
from vista_jax.store_layout import LINEAGE_KEYS, data_prefix

R, K, D, SHARD = 150, 4, 8, 16


@pytest.fixture(params=["file", "memory"])
def root_factory(request, tmp_path):
    """name -> (root, context) of a fresh store on a local directory or a memory kvstore."""
    context = ts.Context()

    def make(name: str):
        if request.param == "file":
            return str(tmp_path / name), context
        return {"driver": "memory", "path": f"{name}/"}, context

    return make


def _data(seed=0):
    rng = np.random.default_rng(seed)
    written = np.sort(rng.choice(R, R - 30, replace=False))  # 30 rows never written
    n = len(written)
    x = (rng.standard_normal((n, K, D)) * 10.0 ** rng.uniform(-2, 2, (n, K, 1))).astype(np.float32)
    return dict(
        row_ids=written,
        summaries=x,
        coverage=rng.integers(0, 1000, n),
        event_time=np.where(rng.random(n) < 0.1, NO_EVENTS, rng.integers(0, 10**9, n)),
        extra_arrays={"state_l0": rng.standard_normal((n, 2, 3)).astype(np.float32)},
    )


def _write(root, context, layout, quantization="int8", version="v1", **data):
    return SummaryStore.write_version(
        root, version=version, num_rows=R, config_hash="cfg", summarizer_step=3,
        quantization=quantization, layout=layout, chunk_rows=SHARD, context=context, **data,
    )  # fmt: skip


def _query_ids(seed=1):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.integers(0, R, 200), [0, R - 1, R, R + 7, 5, 5]])


@pytest.mark.parametrize("quantization", ["int8", "bf16", "none"])
def test_rows_layout_reads_equal_the_plain_layout(root_factory, quantization):
    data = _data()
    plain_root, context = root_factory("plain")
    rows_root, _ = root_factory("rows")
    _write(plain_root, context, "plain", quantization, **data)
    _write(rows_root, context, "rows", quantization, **data)
    plain = SummaryStore.open(plain_root, context=context)
    rows = SummaryStore.open(rows_root, context=context)
    ids = _query_ids()
    a, b = plain.read_quantized(ids), rows.read_quantized(ids)
    for name in a._fields:
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None
        else:
            assert x.dtype == y.dtype, name
            np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=name)
    for x, y in zip(plain.read(ids), rows.read(ids), strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(
        plain.read_extra("state_l0", ids), rows.read_extra("state_l0", ids)
    )
    assert not b.present[np.isin(ids, data["row_ids"], invert=True)].any()
    assert b.present[np.isin(ids, data["row_ids"])].all()


def test_fast_row_reads_equal_zarr3_reads_of_the_same_array(root_factory):
    root, context = root_factory("rows")
    manifest = _write(root, context, "rows", **_data())
    store = SummaryStore.open(root, context=context)
    spec = root if isinstance(root, dict) else {"driver": "file", "path": root + "/"}
    kvstore = {**spec, "path": spec["path"] + data_prefix(manifest) + "row/"}
    zarr = ts.open({"driver": "zarr3", "kvstore": kvstore}, open=True, context=context).result()
    ids = _query_ids(2) % R
    np.testing.assert_array_equal(store._rows.read(ids), zarr[ids].read().result())
    assert zarr.shape == (R, manifest["bytes_per_row"])


def test_out_of_order_blocks_equal_in_order_ones(root_factory):
    """Blocks that leave shards partial (flushed early, merged later) read the same."""
    data = _data(3)
    order = np.random.default_rng(0).permutation(len(data["row_ids"]))

    def blocks(size):
        for start in range(0, len(order), size):
            j = order[start : start + size]
            yield RowBlock(
                data["row_ids"][j], data["summaries"][j], data["coverage"][j],
                {"state_l0": data["extra_arrays"]["state_l0"][j]}, data["event_time"][j],
            )  # fmt: skip

    ref_root, context = root_factory("ref")
    root, _ = root_factory("shuffled")
    _write(ref_root, context, "plain", **data)
    manifest = _write(root, context, "rows", summaries=blocks(7))
    assert manifest["present_rows"] == len(data["row_ids"])
    ids = np.arange(R + 2)
    ref, got = (
        SummaryStore.open(ref_root, context=context),
        SummaryStore.open(root, context=context),
    )
    for x, y in zip(ref.read_quantized(ids), got.read_quantized(ids), strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(ref.read_extra("state_l0", ids), got.read_extra("state_l0", ids))


def test_int8_and_scales_dequantize_on_device_to_the_host_read(root_factory):
    root, context = root_factory("rows")
    _write(root, context, "rows", **_data())
    store = SummaryStore.open(root, context=context)
    ids = _query_ids()
    batch = store.read_quantized(ids)
    assert batch.values.dtype == np.int8 and batch.scale.dtype == np.float32
    on_device = jax.jit(dequantize_int8)(jnp.asarray(batch.values), jnp.asarray(batch.scale))
    np.testing.assert_array_equal(np.asarray(on_device), store.read(ids).summaries)


def test_bytes_per_row_is_the_record_and_the_files_hold_little_more(tmp_path):
    """int8: a row is K*D values + 4K scale bytes + coverage, event_time and present (17 B);
    on disk each row adds its 16-byte shard index entry."""
    root = str(tmp_path / "rows")
    x = np.random.default_rng(0).standard_normal((R, K, D)).astype(np.float32)
    manifest = SummaryStore.write_version(
        root, version="v1", summaries=x, coverage=np.arange(R), config_hash="c",
        summarizer_step=1, chunk_rows=SHARD,
    )  # fmt: skip
    assert manifest["layout"] == "rows" and manifest["bytes_per_row"] == K * D + 4 * K + 17
    files = (tmp_path / "rows" / data_prefix(manifest) / "row" / "c").rglob("*")
    on_disk = sum(f.stat().st_size for f in files if f.is_file())
    shards = -(-R // SHARD)
    assert on_disk == R * manifest["bytes_per_row"] + shards * (SHARD * 16 + 4)


def test_format_3_ocdbt_version_stays_readable_and_as_of_is_refused_clearly(root_factory):
    root, context = root_factory("old")
    data = _data()
    manifest = _write(root, context, "ocdbt", **data)
    old = {k: v for k, v in manifest.items() if k not in LINEAGE_KEYS}
    old["format_version"] = 3
    old["arrays"] = {k: v for k, v in old["arrays"].items() if k != "event_time"}
    spec = root if isinstance(root, dict) else {"driver": "file", "path": root + "/"}
    kvstore = ts.KvStore.open(spec, context=context).result()
    kvstore.write("versions/v1/manifest.json", json.dumps(old).encode()).result()
    store = SummaryStore.open(root, context=context)
    assert store.watermark is None and store.lineage["present_rows"] is None
    batch = store.read_quantized(data["row_ids"])
    assert batch.present.all() and (batch.event_time == UNKNOWN_TIME).all()
    np.testing.assert_array_equal(batch.coverage, data["coverage"])


def test_a_damaged_row_shard_is_an_error_not_zeros(tmp_path):
    root = str(tmp_path / "rows")
    manifest = _write(root, ts.Context(), "rows", **_data())
    shard = tmp_path / "rows" / data_prefix(manifest) / "row" / "c" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated: its index is gone
    store = SummaryStore.open(root, context=ts.Context())
    with pytest.raises(SummaryStoreError, match="damaged"):
        store.read(np.arange(SHARD))


def test_reader_of_a_version_deleted_and_published_again_is_refused(root_factory):
    """The fast liveness check (a stat of the manifest on local roots) sees a republish."""
    root, context = root_factory("again")
    _write(root, context, "rows", **_data(0))
    reader = SummaryStore.open(root, context=context)
    spec = root if isinstance(root, dict) else {"driver": "file", "path": root + "/"}
    kvstore = ts.KvStore.open(spec, context=context).result()
    kvstore.delete_range(ts.KvStore.KeyRange("versions/v1/", "versions/v10")).result()
    _write(root, context, "rows", **_data(1))
    with pytest.raises(SummaryStoreError, match="deleted and published again"):
        reader.read(np.arange(R))

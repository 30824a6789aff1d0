"""Downstream retrieval from the summary store: a cached-summary retriever given the source's
stage-2 weights and the stored summaries equals the source retriever on int8 summaries; the
downstream never needs the events before its window; a cache made for other rows is refused."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from vista_jax import retrieval, retrieval_cache
from vista_jax.data import sequences
from vista_jax.errors import DataError
from vista_jax.models.sequential import build_encoder, preset

NUM_ITEMS, WINDOW, EVERY, SEEDS, PREFIX = 20, 8, 4, 3, 6


def splits(window=WINDOW):
    rng = np.random.default_rng(0)
    lengths = [3, 9, 17, 25]  # Short, window-sized and lifelong (events before the window).
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    item = rng.integers(1, NUM_ITEMS + 1, offsets[-1]).astype(np.int32)
    time = np.concatenate([np.cumsum(rng.integers(1, 5000, n)) for n in lengths])
    return sequences.leave_one_out(offsets, item, time, NUM_ITEMS, window, prefix_len=PREFIX)


def model(source):
    sizes = dict(d_model=8, attn_dim=8, linear_dim=8, max_len=WINDOW)
    vista = dict(num_seeds=SEEDS, snapshot_every=EVERY, num_recent=WINDOW)
    cfg = preset("vista_hstu", NUM_ITEMS, summary_source=source, **sizes, **vista)
    return build_encoder(cfg, nnx.Rngs(0))


def encode(m, batch):
    return np.asarray(
        m.encode_last(*retrieval.batch_inputs(batch), **retrieval.extra_inputs(batch))
    )


def test_cached_downstream_equals_source_on_int8_summaries(tmp_path):
    data = splits()
    source = model("live")
    manifest = retrieval_cache.export(
        source, data, tmp_path, version="v1", step=7, source={"run": "test"}, batch_size=3
    )
    assert manifest["num_rows"] == sum(
        len(getattr(data, s)["item"]) for s in ("train", "valid", "test")
    )
    cached_data = retrieval_cache.attach(data, tmp_path, *retrieval_cache.summary_shape(source.cfg))
    downstream = model("cached")
    assert not hasattr(downstream, "summarizer")
    nnx.update(
        downstream, nnx.state(source, nnx.Param).filter(lambda path, _: path[0] != "summarizer")
    )
    source.quantize_summaries = True
    for name in ("train", "valid", "test"):
        live = getattr(data, name)
        cached = {k: v for k, v in getattr(cached_data, name).items() if k != "prefix"}
        np.testing.assert_allclose(
            encode(downstream, cached), encode(source, live), rtol=1e-5, atol=1e-5
        )
    assert (data.test["prefix"] > 0).any()  # Lifelong rows reached the downstream: via the cache.


def test_a_cache_for_other_rows_is_refused(tmp_path):
    data = splits()
    source = model("live")
    retrieval_cache.export(source, data, tmp_path, version="v1", step=1, source={})
    other = splits(window=4)  # Other windows: other rows.
    with pytest.raises(DataError, match="window.*Fix: export the cache"):
        retrieval_cache.attach(other, tmp_path, 3, SEEDS, 8)
    shifted = dataclasses.replace(data, test=data.test | {"item": np.roll(data.test["item"], 1, 0)})
    with pytest.raises(DataError, match="inputs_sha256"):
        retrieval_cache.attach(shifted, tmp_path, *retrieval_cache.summary_shape(source.cfg))


def test_live_and_cached_models_refuse_the_other_input():
    data = splits()
    batch = {k: v[:2] for k, v in data.test.items()}
    with pytest.raises(ValueError, match="needs summary_BxJxKxD"):  # Cached without a cache.
        encode(model("cached"), batch)
    live = model("live")
    summary = live.summaries(batch["item"], batch["prefix"])
    with pytest.raises(ValueError, match="computes its own summaries"):
        live(
            batch["item"],
            batch["item"] > 0,
            batch["time"],
            batch["next_time"],
            summary_BxJxKxD=summary,
        )

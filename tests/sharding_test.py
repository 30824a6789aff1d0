"""Sharding: golden parameter table, sharded == unsharded train step, config errors.

Runs on the 8 fake CPU devices of tests/conftest.py with a (2 data, 4 model) mesh.
Regenerate the golden file with `UPDATE_GOLDEN=1 pytest tests/sharding_test.py`.
"""

import difflib
import os
import pathlib
import types

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from experiments.synthetic import config as syn
from vista_jax import pipeline, sharding, train
from vista_jax.config import from_config_dict
from vista_jax.data import examples
from vista_jax.data import synthetic as S
from vista_jax.models import layers
from vista_jax.models.source import make_loss_fn

GOLDEN = pathlib.Path(__file__).parent / "golden" / "source_model_sharding.txt"
NUM_ITEMS = 67  # 68 table rows: divisible by the 4-way `model` axis.
DATA = S.SyntheticConfig(
    num_users=8,
    history_len=128,
    num_topics=8,
    items_per_topic=8,
    num_recent=32,
    num_candidates=16,
    seed=1,
)


@pytest.fixture(scope="module")
def cfg():
    cfg = syn.get_config("tiny")
    cfg.mesh.shape = (2, 4)
    return cfg


@pytest.fixture(scope="module")
def mesh(cfg):
    return sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes)


def _item_category() -> np.ndarray:
    """[NUM_ITEMS + 1] categories: 0 for padding and for the ids the data never uses."""
    items = np.arange(1, S.num_items(DATA) + 1)
    known = np.concatenate([[0], S.item_topic(DATA, items) + 1])
    return np.pad(known, (0, NUM_ITEMS + 1 - len(known))).astype(np.int32)


def _source_model(cfg):
    vocab = types.SimpleNamespace(num_items=NUM_ITEMS, num_categories=S.num_categories(DATA))
    return pipeline.build_source_model(from_config_dict(cfg), vocab, seed=0)


def test_golden_sharding_table(cfg, mesh):
    _, params = nnx.split(_source_model(cfg), nnx.Param)
    table = "\n".join(sharding.sharding_table(params, mesh, cfg.mesh.rules)) + "\n"
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(table)
    expected = GOLDEN.read_text() if GOLDEN.exists() else ""
    diff = difflib.unified_diff(
        expected.splitlines(), table.splitlines(), str(GOLDEN), "now", lineterm=""
    )
    assert table == expected, "sharding table changed (UPDATE_GOLDEN=1 to accept):\n" + "\n".join(
        diff
    )


def _batch():
    spec = examples.ExampleSpec(task="ranking", history_window=128, num_recent=DATA.num_recent)
    category = _item_category()
    exs = [examples.ranking_example(S.generate_user(DATA, u), spec, u, category) for u in range(8)]
    batch = examples.stack(exs)
    return {k: v for k, v in batch.items() if k != "snapshot"}


def _run(step, state, batch, n=2):
    losses = []
    for _ in range(n):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_sharded_step_matches_single_device(cfg, mesh):
    # SGD + momentum, not Adam: Adam's g / sqrt(v) turns float noise in theoretically zero
    # gradients (e.g. attention key biases) into lr-sized updates, so it cannot be compared.
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
    graphdef, state = train.init_train_state(_source_model(cfg), tx)
    step_fn = train.make_train_step(graphdef, tx, make_loss_fn("ranking", 1.0))
    batch = _batch()
    want_state, want_loss = _run(jax.jit(step_fn), state, batch)

    sharded_step, _ = sharding.jit_train_step(step_fn, state, mesh, cfg.mesh.rules)
    sharded = sharding.shard_train_state(state, mesh, cfg.mesh.rules)
    got_state, got_loss = _run(
        sharded_step, sharded, jax.device_put(batch, sharding.batch_sharding(mesh))
    )

    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for module in ("summarizer", "ranker"):
        table = got_state.params[module]["embed" if module == "summarizer" else "events"]
        item = table["item"]["embedding"][...]
        assert item.sharding.spec == P("model", None)
        assert {s.data.shape for s in item.addressable_shards} == {((NUM_ITEMS + 1) // 4, 32)}
    momentum_specs = [x.sharding.spec for x in jax.tree.leaves(got_state.opt_state)]
    assert momentum_specs.count(P("model", None)) == 2  # Momentum mirrors both item tables.


def test_rejects_two_logical_axes_on_one_mesh_axis(mesh):
    rules = (("vocab", "model"), ("embed", "model"))
    with pytest.raises(ValueError, match=r"emb/embedding.*'vocab' and 'embed'.*'model'"):
        params = nnx.state(nnx.Dict(emb=layers.embedding(8, 4, nnx.Rngs(0))), nnx.Param)
        sharding.param_shardings(params, mesh, rules)
    with pytest.raises(ValueError, match="no rule"):
        sharding.logical_to_mesh_spec(("vocab", "hist"), (("vocab", "model"),))


def test_indivisible_dim_falls_back_to_replicated(cfg, mesh):
    params = nnx.state(nnx.Dict(emb=layers.embedding(5, 8, nnx.Rngs(0))), nnx.Param)
    (line,) = sharding.sharding_table(params, mesh, cfg.mesh.rules)
    assert "P(None, None)" in line and "5 % 4 != 0 -> replicated" in line
    shardings = sharding.param_shardings(params, mesh, cfg.mesh.rules)
    assert shardings["emb"]["embedding"].get_value().spec == P(None, None)


def test_mesh_shape_must_match_device_count():
    with pytest.raises(ValueError, match=r"needs 4 devices but 8"):
        sharding.make_mesh((2, 2), ("data", "model"))
    with pytest.raises(ValueError, match="differ in length"):
        sharding.make_mesh((8,), ("data", "model"))
    mesh = sharding.make_mesh((2, 4), ("data", "model"))
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2

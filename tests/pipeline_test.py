"""A tiny end-to-end pipeline run (`tiny_run` in conftest): every stage, resume, and stage
isolation."""

import itertools
import json

import jax
import numpy as np
import pytest
from flax import nnx

from vista_jax import cache, checkpoints, evaluation, metrics, pipeline
from vista_jax.checkpoints import restore_module
from vista_jax.config import from_config_dict
from vista_jax.data import inputs
from vista_jax.models.summarizer import Summarizer


def test_results_json_has_every_model(tiny_run):
    _, workdir, results = tiny_run
    written = json.loads((workdir / "results.json").read_text())
    assert set(written["models"]) >= {"vista_source", "vista_downstream", "recent_only"}
    for m in written["models"].values():
        assert {"auc", "logloss", "ne"} <= set(m) and np.isfinite([m["auc"], m["ne"]]).all()
    assert 0.5 < written["oracle_auc"] <= 1.0
    assert written == json.loads(json.dumps(results, default=float))


def test_predictions_file_reproduces_every_models_auc(tiny_run):
    _, workdir, results = tiny_run
    label, user, logits = evaluation.read_predictions(workdir / pipeline.PREDICTIONS_FILE)
    assert set(logits) == set(results["models"]) and len(user) == len(label)
    for name, logit in logits.items():
        assert metrics.auc(label, logit) == pytest.approx(results["models"][name]["auc"])


def test_source_on_cache_matches_source_within_int8_error(tiny_run):
    _, _, results = tiny_run
    a = results["models"]["vista_source"]["logloss"]
    b = results["models"]["vista_source_on_cache"]["logloss"]
    assert abs(a - b) < 1e-2


def test_checkpoint_restores_the_summarizer_item_alone(tiny_run):
    config, workdir, _ = tiny_run
    typed = from_config_dict(config)
    cfg = typed.summarizer_for(pipeline.load_data(typed, workdir))
    a, b = Summarizer(cfg, nnx.Rngs(1)), Summarizer(cfg, nnx.Rngs(2))
    step = restore_module(workdir / "source", "summarizer", a)
    restore_module(workdir / "source", "summarizer", b)
    assert step == config.source.num_steps
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_rerun_resumes_instead_of_retraining(tiny_run, capfd):
    config, workdir, _ = tiny_run
    pipeline.train_and_evaluate(config, workdir, "train_source")
    assert "resumed from step" in capfd.readouterr().err


def test_cache_from_another_summarizer_is_refused(tiny_run):
    config, workdir, _ = tiny_run
    other = config.copy_and_resolve_references()
    other.summarizer.num_seeds = 3
    with pytest.raises(Exception, match="config_hash"):
        pipeline.train_and_evaluate(other, workdir, "evaluate")


def test_cache_holds_states_that_reproduce_the_summaries(tiny_run):
    config, workdir, _ = tiny_run
    typed = from_config_dict(config)
    data = pipeline.load_data(typed, workdir)
    cfg = typed.summarizer_for(data)
    store = cache.open_cache(workdir, cfg, data)
    summarizer = Summarizer(cfg, nnx.Rngs(0))
    restore_module(workdir / "source", "summarizer", summarizer)
    rows = np.arange(4)
    states, _ = cache.read_states(store, rows, cfg.num_layers)
    cached = store.read(rows).summaries
    np.testing.assert_allclose(summarizer.readout(states), cached, atol=0.05)


def test_cache_and_downstream_checkpoint_record_their_lineage(tiny_run):
    """The cache names what built it; the downstream checkpoint names the cache it used."""
    config, workdir, _ = tiny_run
    typed = from_config_dict(config)
    data = pipeline.load_data(typed, workdir)
    store = cache.open_cache(workdir, typed.summarizer_for(data), data)
    manifest = store.manifest
    assert manifest["summarizer_checkpoint"] == str(workdir / "source")
    assert manifest["summarizer_step"] == config.source.num_steps
    assert manifest["data_fingerprint"] == data.fingerprint
    assert manifest["present_rows"] == manifest["num_rows"] == data.num_rows
    meta = checkpoints.read_meta(workdir / "downstream")
    assert meta["cache_version"] == store.version
    assert meta["config_hash"] == manifest["config_hash"]
    assert meta["cache_lineage"] == json.loads(json.dumps(store.lineage))
    assert checkpoints.read_meta(workdir / "recent_only")["cache_version"] is None


def test_downstream_batches_carry_no_long_history_and_train_on_the_same_inputs(tiny_run):
    config, workdir, _ = tiny_run
    typed = from_config_dict(config)
    data = pipeline.load_data(typed, workdir)
    store = cache.open_cache(workdir, typed.summarizer_for(data), data)
    cache_fed = iter(pipeline.downstream_batches(typed, data, store))
    # What the downstream ranker trained on before its examples dropped the window: the
    # same stream with the summarizer's input, dropped on the way to the device.
    before = inputs.train_examples(
        data, typed.seed + 1, hold_out_valid=typed.early_stopping.enabled
    ).batch(typed.downstream.batch_size)
    for old in itertools.islice(iter(before), 3):
        new = next(cache_fed)
        assert not [k for k in new if k.startswith("hist_")] and new["summary_mask"].all()
        old = inputs.model_inputs(cache.with_summaries(store)(old), drop_history=True)
        assert inputs.model_inputs(new).keys() == old.keys()
        for key, value in old.items():
            np.testing.assert_array_equal(new[key], value, err_msg=key)

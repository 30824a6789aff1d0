"""Serving: the scorer gives `evaluate`'s scores from the cache alone, flags users without a
summary, and refuses bad requests, mismatched checkpoints and missing versions."""

import dataclasses
import shutil

import numpy as np
import pytest
from flax import nnx

from vista_jax import cache, evaluation, metrics, pipeline
from vista_jax.config import RankerConfig, from_config_dict
from vista_jax.data import inputs
from vista_jax.errors import CheckpointError, RequestError, UserError
from vista_jax.models.ranker import Ranker
from vista_jax.quantize import decode, encode
from vista_jax.serving import RECENT_KEYS, Scorer, ServingIndex, request_forward
from vista_jax.store import SummaryStore, SummaryStoreError


class _NoRecords:
    """A dataset source that fails on any read: serving must not open an event record."""

    def __len__(self):
        raise AssertionError("serving read the event records")

    def __getitem__(self, user):
        raise AssertionError(f"serving read user {user}'s event record")


@pytest.fixture(scope="module")
def served(tiny_run):
    """(typed config, workdir, data, the eval requests as eval-sized batches, results)."""
    config, workdir, results = tiny_run
    typed = from_config_dict(config)
    data = pipeline.load_data(typed, workdir)
    items = inputs.eval_examples(data, typed.eval.split)
    return typed, workdir, data, list(inputs.batches(items, typed.eval.batch_size)), results


def _score(scorer, batches):
    out = [scorer.score(b["user"], b["cand_item"], {k: b[k] for k in RECENT_KEYS}) for b in batches]
    return out, np.concatenate([o.logits for o in out])


def _evaluate_logits(config, workdir, name, data, batches, dim, cached=None):
    """The logits `pipeline.evaluate` computes for model `name` (same code path)."""
    ranker = pipeline._restore_ranker(config, workdir, name, data, dim)
    prep = lambda b: inputs.model_inputs(b, drop_history=True)  # noqa: E731
    return np.concatenate(
        [o for _, o in evaluation.predict_batches(ranker, cached or batches, prep)]
    )


def test_scorer_gives_evaluates_scores_without_reading_records(served):
    config, workdir, data, batches, results = served
    scorer = Scorer.load(config, workdir, dataclasses.replace(data, source=_NoRecords()))
    out, logits = _score(scorer, batches)
    assert not any(o.recent_only.any() for o in out)
    assert {o.version for o in out} == {results["cache"]["version"]}
    assert all(np.all(o.coverage == b["snapshot"]) for o, b in zip(out, batches, strict=True))
    # The logits of evaluate's own path, and the metrics it wrote to results.json.
    store = cache.open_cache(workdir, config.summarizer_for(data), data)
    cached = [cache.with_summaries(store)(b) for b in batches]
    expected = _evaluate_logits(config, workdir, "downstream", data, batches, store.d, cached)
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)
    labels = np.concatenate([b["cand_label"] for b in batches])
    got = metrics.binary_metrics(labels, logits)
    written = results["models"]["vista_downstream"]  # Also scoring speed and training record.
    for key, value in got.items():
        assert written[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


def _store_without(workdir_store, root, absent_rows):
    """A copy of a version (float, so no requantization) whose `absent_rows` were never written."""
    rows = np.setdiff1d(np.arange(workdir_store.num_rows), absent_rows)
    read = workdir_store.read(rows)
    manifest = workdir_store.manifest
    SummaryStore.write_version(
        root, version=workdir_store.version, summaries=read.summaries, row_ids=rows,
        coverage=read.coverage, num_rows=workdir_store.num_rows,
        config_hash=manifest["config_hash"], summarizer_step=manifest["summarizer_step"],
        quantization="none",
    )  # fmt: skip
    return SummaryStore.open(root)


@pytest.mark.parametrize("fallback", ["recent_only", "masked"])
def test_users_without_a_summary_are_scored_from_recent_events_and_flagged(
    served, tmp_path, fallback
):
    config, workdir, data, batches, _ = served
    batch = batches[0]
    full = Scorer.load(config, workdir, data, fallback=fallback)
    absent_users = batch["user"][::3]
    rows = ServingIndex.from_data(config, data).user_rows[absent_users]
    store = _store_without(full.store, tmp_path / "store", rows)
    down = pipeline._restore_ranker(config, workdir, "downstream", data, store.d)
    recent_only = pipeline._restore_ranker(config, workdir, "recent_only", data, 0)
    other = recent_only if fallback == "recent_only" else None
    scorer = Scorer(down, store, full.index, fallback=other)
    recent = {k: batch[k] for k in RECENT_KEYS}
    got = scorer.score(batch["user"], batch["cand_item"], recent)
    absent = np.isin(batch["user"], absent_users)
    np.testing.assert_array_equal(got.recent_only, absent)
    assert np.all(got.coverage[absent] == 0) and np.all(got.coverage[~absent] > 0)
    want = full.score(batch["user"], batch["cand_item"], recent).logits
    np.testing.assert_allclose(got.logits[~absent], want[~absent], atol=1e-5)
    if fallback == "recent_only":  # evaluate's recent_only model on the same requests.
        ref = _evaluate_logits(config, workdir, "recent_only", data, [batch], 0)
    else:  # The downstream ranker with its summary tokens masked out.
        b = len(absent)
        masked = batch | {
            "summary": np.zeros((b, store.k, store.d), np.float32),
            "summary_mask": np.zeros(b, bool),
        }
        ref = _evaluate_logits(config, workdir, "downstream", data, [batch], store.d, [masked])
    np.testing.assert_allclose(got.logits[absent], ref[absent], rtol=1e-6, atol=1e-6)


def test_requests_without_recent_events_and_with_shared_candidates(served):
    config, workdir, data, batches, _ = served
    scorer = Scorer.load(config, workdir, data)
    users, candidates = batches[0]["user"][:3], np.array([1, 2, 3, 4], np.int32)
    got = scorer.score(users, candidates)
    assert got.logits.shape == (3, 4) and np.isfinite(got.logits).all()
    # No recent events = recent_len 0; padding values are ignored whatever they hold.
    padded = {k: np.full((3, 2), 7) for k in RECENT_KEYS[:3]} | {"recent_len": np.zeros(3)}
    padded["recent_len"] = padded["recent_len"].astype(int)
    again = scorer.score(users, np.broadcast_to(candidates, (3, 4)), padded)
    np.testing.assert_array_equal(again.logits, got.logits)
    assert np.all((got.probabilities > 0) & (got.probabilities < 1))


def _bad_request_cases(num_users, num_items, b):
    users = np.arange(b)
    cands = np.ones((b, 2), np.int32)
    recent = {k: np.ones((b, 2), np.int32) for k in RECENT_KEYS[:3]} | {"recent_len": np.full(b, 2)}
    return [
        ((np.array([num_users]), cands[:1], None), r"user_ids .* outside \[0, "),
        ((np.array([-1]), cands[:1], None), "user_ids"),
        ((users.astype(float), cands, None), "integer array"),
        ((users, cands * 0, None), r"candidate_ids .* outside \[1, "),
        ((users, cands + num_items, None), "candidate_ids"),
        ((users, cands[:1].repeat(b + 1, 0), None), "rows for"),
        ((users, cands, recent | {"recent_item": recent["recent_item"] * 0}), "recent_item"),
        ((users, cands, recent | {"recent_len": np.full(b, 3)}), r"recent_len .* \[0, 2\]"),
        ((users, cands, recent | {"recent_gap": recent["recent_gap"] + 99}), "recent_gap"),
        ((users, cands, {"recent_item": recent["recent_item"]}), "lack"),
        ((users, cands, recent | {"recent_action": np.ones((b, 3), int)}), "shape"),
        ((users, cands, {k: np.ones((b, 99), int) for k in RECENT_KEYS[:3]}
                        | {"recent_len": np.ones(b, int)}), "at most"),
    ]  # fmt: skip


def test_bad_requests_are_refused_with_what_and_how_to_fix(served):
    config, workdir, data, _, _ = served
    scorer = Scorer.load(config, workdir, data)
    for args, match in _bad_request_cases(data.num_users, data.num_items, 4):
        with pytest.raises(RequestError, match=match) as error:
            scorer.score(*args)
        assert "Fix:" in str(error.value) or "expected" in str(error.value)
        assert isinstance(error.value, UserError)


@pytest.fixture
def workdir_copy(served, tmp_path):
    _, workdir, *_ = served
    copy = tmp_path / "work"
    for name in ("cache", "downstream", "recent_only"):
        shutil.copytree(workdir / name, copy / name)
    return copy


def test_checkpoint_of_another_summarizer_is_refused(served, workdir_copy):
    config, _, data, _, _ = served
    root = cache.cache_root(workdir_copy)
    store = SummaryStore.open(root)
    read = store.read(np.arange(3))
    SummaryStore.write_version(
        root, version="other", summaries=read.summaries, coverage=read.coverage,
        config_hash="another-summarizer", summarizer_step=1, num_rows=store.num_rows,
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="was built with 'another-summarizer'"):
        Scorer.load(config, workdir_copy, data, version="other")
    other_data = ServingIndex.from_data(config, data)
    other_data = dataclasses.replace(other_data, config_hash="other-data")
    with pytest.raises(SummaryStoreError, match="config and data given"):
        Scorer.load(config, workdir_copy, other_data)
    # CURRENT moved to "other"; the scorer still serves the version it was trained on.
    assert Scorer.load(config, workdir_copy, data).store.version == store.version


def test_missing_version_or_checkpoint_is_refused(served, workdir_copy, tmp_path):
    config, _, data, _, _ = served
    with pytest.raises(SummaryStoreError, match="'nope' .* is not published"):
        Scorer.load(config, workdir_copy, data, version="nope")
    shutil.rmtree(workdir_copy / "cache")
    with pytest.raises(SummaryStoreError, match="was trained on cache version .* keep="):
        Scorer.load(config, workdir_copy, data)
    with pytest.raises(CheckpointError, match="no downstream checkpoint .*--mode=train_ranker"):
        Scorer.load(config, tmp_path / "empty", data)


@pytest.mark.parametrize("quantization", ["int8", "bf16", "none"])
def test_request_forward_decodes_on_device_as_the_host_would(quantization):
    """The serving jit (device-side decode and category lookups) gives the ranker's logits on
    host-decoded summaries, for every stored dtype."""
    cfg = RankerConfig(num_items=50, num_categories=5, num_recent=4, summary_dim=8)
    ranker = Ranker(cfg, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    category = rng.integers(0, 6, size=51).astype(np.int32)
    values, scale = encode(rng.normal(size=(3, 6, 8)).astype(np.float32), quantization)
    request = {
        "cand_item": rng.integers(1, 51, size=(3, 7)).astype(np.int32),
        "recent_item": rng.integers(1, 51, size=(3, 4)).astype(np.int32),
        "recent_action": rng.integers(0, cfg.num_actions, size=(3, 4)).astype(np.int32),
        "recent_gap": rng.integers(0, cfg.num_gap_buckets, size=(3, 4)).astype(np.int32),
        "recent_len": np.array([4, 2, 0], np.int32),
        "summary_values": values,
        "summary_mask": np.array([True, False, True]),
    } | ({"summary_scale": scale} if scale is not None else {})
    batch = {k: v for k, v in request.items() if not k.startswith("summary_")} | {
        "summary": decode(values, scale),
        "summary_mask": request["summary_mask"],
        "cand_category": category[request["cand_item"]],
        "recent_category": category[request["recent_item"]],
    }
    want, _ = ranker(batch)
    got = request_forward(ranker, category)(request)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)

"""The ML-1M harness end to end on ML-100K (retrieval and ranking): results JSON, exact
resume, refusals, the ranking run's saved predictions.

Each run is a subprocess (the harness is an absl program); small windows keep it quick.
"""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from absl.app import UsageError
from data_env import real_data_dir
from subprocesses import TIMEOUT_S

from experiments.ml1m import models
from vista_jax import metrics

SMALL = ["--data=ml-100k", "--model=hstu", "--window=20", "--batch_size=256", "--eval_every=1"]


def _run(tmp_path, name, *flags, check=True):
    out = tmp_path / f"{name}.json"
    data_dir = real_data_dir("ml-100k").parent
    cmd = [sys.executable, "-m", "experiments.ml1m.train_sequential", f"--data_dir={data_dir}"]
    proc = subprocess.run(
        cmd + SMALL + [f"--out={out}", *flags], capture_output=True, text=True, timeout=TIMEOUT_S
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(out.read_text()), proc.stderr
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seq")
    resume = tmp / "resume"
    straight, _ = _run(tmp, "straight", "--epochs=2")
    first, _ = _run(tmp, "first", "--epochs=1", f"--resume_dir={resume}")
    resumed, log = _run(tmp, "resumed", "--epochs=2", f"--resume_dir={resume}")
    return {"tmp": tmp, "resume": resume, "straight": straight, "first": first,
            "resumed": resumed, "resumed_log": log}  # fmt: skip


def test_result_json_records_the_protocol_and_provenance(runs):
    r = runs["straight"]
    assert r["model"] == "hstu" and r["epochs_run"] == 2 and len(r["evals"]) == 2
    assert r["config"]["window"] == 20 and r["config"]["num_negatives"] == 128
    for key in ("git_commit", "wall_seconds", "epoch_seconds", "num_params"):
        assert key in r
    ev = r["last"]["test"]
    assert 0 <= ev["hr@10"] <= ev["hr@50"] <= ev["hr@200"] <= 1
    assert r["validation_selected"]["epoch"] in (1, 2)


def test_a_resumed_run_equals_the_run_that_never_stopped(runs):
    assert "resumed after epoch 1" in runs["resumed_log"]
    assert runs["resumed"]["evals"][0] == runs["first"]["evals"][0]  # Carried, not rerun.
    straight, resumed = runs["straight"]["evals"][-1], runs["resumed"]["evals"][-1]
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-5)
    for split in ("valid", "test"):
        for metric, value in straight[split].items():
            assert resumed[split][metric] == pytest.approx(value, abs=1e-6), (split, metric)


def test_resuming_under_other_flags_is_refused(runs):
    proc = _run(
        runs["tmp"], "other", "--epochs=2", "--learning_rate=0.01",
        f"--resume_dir={runs['resume']}", check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "other flags" in proc.stderr and "learning_rate" in proc.stderr


@pytest.fixture(scope="module")
def ranking_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rank")
    resume, flags = tmp / "resume", ["--task=ranking", "--model=sasrec"]
    straight, _ = _run(tmp, "straight", *flags, "--epochs=2")
    _run(tmp, "first", *flags, "--epochs=1", f"--resume_dir={resume}")
    resumed, log = _run(tmp, "resumed", *flags, "--epochs=2", f"--resume_dir={resume}")
    return {"tmp": tmp, "straight": straight, "resumed": resumed, "resumed_log": log}


def test_ranking_runs_score_every_request_and_keep_the_selected_predictions(ranking_runs):
    r = ranking_runs["straight"]
    assert r["task"] == "ranking" and r["validation_selected"]["criterion"] == "valid auc"
    test = r["validation_selected"]["test"]
    assert r["scored_events"]["test"] == test["count"] and r["scored_events"]["train"] > 0
    assert 0.5 < test["auc"] < 1 and 0 < test["ne"] < 1.2
    preds = np.load(ranking_runs["tmp"] / "straight.test_predictions.npz")
    assert int(preds["epoch"]) == r["validation_selected"]["epoch"]
    assert len(preds["logit"]) == test["count"]
    assert (
        len(set(zip(preds["user"].tolist(), preds["event"].tolist(), strict=True))) == test["count"]
    )
    again = metrics.binary_metrics(preds["label"].astype(float), preds["logit"])
    assert again["auc"] == pytest.approx(test["auc"], abs=1e-9)


def test_a_resumed_ranking_run_equals_the_run_that_never_stopped(ranking_runs):
    assert "resumed after epoch 1" in ranking_runs["resumed_log"]
    straight, resumed = ranking_runs["straight"], ranking_runs["resumed"]
    for split in ("valid", "test"):
        for metric, value in straight["last"][split].items():
            assert resumed["last"][split][metric] == pytest.approx(value, abs=1e-6)
    tmp = ranking_runs["tmp"]
    a, b = (dict(np.load(tmp / f"{n}.test_predictions.npz")) for n in ("straight", "resumed"))
    np.testing.assert_allclose(a["logit"], b["logit"], atol=1e-5)


def test_a_request_form_ranker_scores_the_same_requests(ranking_runs):
    """TWIN over [prefix; window] at every position: the same requests as the encoders."""
    tmp = ranking_runs["tmp"]
    flags = ["--task=ranking", "--model=twin", "--prefix_len=30", "--top_k=8", "--epochs=1"]
    r, _ = _run(tmp, "twin", *flags)
    assert r["config"]["top_k"] == 8 and r["config"]["num_categories"] > 0
    assert 0.5 < r["last"]["test"]["auc"] < 1
    twin, sasrec = (np.load(tmp / f"{n}.test_predictions.npz") for n in ("twin", "straight"))
    pairs = [sorted(zip(p["user"].tolist(), p["event"].tolist(), strict=True)) for p in
             (twin, sasrec)]  # fmt: skip
    assert pairs[0] == pairs[1]


@pytest.mark.parametrize(
    "model, task, prefix_len, from_cache, export_cache, message, caches, lags",
    [
        ("full_attention", "retrieval", 0, "", "", "--task=ranking", [], []),
        ("recent_only", "retrieval", 0, "", "", "--task=ranking", [], []),
        ("sim_hard", "ranking", 0, "/some/cache", "", "VISTA summaries", [], []),
        ("sasrec", "ranking", 8, "", "", "reads the window only", [], []),
        ("recent_only", "ranking", 8, "", "", "reads the window only", [], []),
        ("vista_ranker", "ranking", 1024, "", "", "pass --from_cache", [], []),
        ("hstu", "ranking", 0, "", "/out", "--export_cache needs a source VISTA", [], []),
        ("vista_hstu", "ranking", 0, "/c", "/out", "--export_cache needs a source", [], []),
        ("vista_ranker", "ranking", 0, "/c", "/out", "--export_cache needs a source", [], []),
        ("twin", "ranking", 0, "", "", "--score_caches scores", ["/other"], []),
        ("vista_hstu", "ranking", 0, "/c", "", "--score_lags makes", [], ["40"]),
        ("vista_ranker", "ranking", 0, "/c", "", "not multiples of --snapshot_every=40", [],
         ["40", "60"]),
    ],
)  # fmt: skip
def test_models_refuse_flags_they_cannot_honour(
    model, task, prefix_len, from_cache, export_cache, message, caches, lags
):
    with pytest.raises(UsageError, match=re.escape(message)):
        models.check_flags(
            model, task, prefix_len=prefix_len, from_cache=from_cache, export_cache=export_cache,
            score_caches=caches, score_lags=lags, snapshot_every=40,
        )  # fmt: skip


@pytest.mark.parametrize(
    "model, task, prefix_len, from_cache, export_cache",
    [
        ("hstu", "retrieval", 0, "", ""),
        ("vista_hstu", "ranking", 1024, "", "/out"),  # A source exports.
        ("vista_hstu", "retrieval", 1024, "/some/cache", ""),  # A downstream reads.
        ("twin", "ranking", 1024, "", ""),
        ("vista_ranker", "ranking", 1024, "/some/cache", ""),
        ("recent_only", "ranking", 0, "", ""),
    ],
)
def test_models_accept_what_they_can_honour(model, task, prefix_len, from_cache, export_cache):
    models.check_flags(
        model, task, prefix_len=prefix_len, from_cache=from_cache, export_cache=export_cache
    )


def test_the_command_line_refuses_before_reading_any_data(tmp_path):
    """A refused export used to surface only after training; now nothing runs."""
    proc = _run(tmp_path, "refused", "--epochs=1", f"--export_cache={tmp_path / 'c'}", check=False)
    assert proc.returncode != 0 and "--export_cache needs a source" in proc.stderr
    # No data was read (its log line "ml-100k: 943 users, ..." never came).
    assert not re.search(r"\d+ users", proc.stderr) and not (tmp_path / "c").exists()


def test_a_cache_ablation_scores_one_checkpoint_on_each_cache(tmp_path):
    """A source exports its summaries int8 and (resumed, without training) float32; VISTA's
    stage 2 trained on the int8 cache is scored on both and on the int8 cache again."""
    vista = ["--task=ranking", "--snapshot_every=5", "--num_seeds=4", "--num_recent=8",
             "--prefix_len=10", "--epochs=1"]  # fmt: skip
    int8, f32 = tmp_path / "int8", tmp_path / "f32"
    source = [*vista, "--model=vista_hstu", f"--resume_dir={tmp_path / 'source'}"]
    _run(tmp_path, "source", *source, f"--export_cache={int8}")
    _, log = _run(tmp_path, "again", *source, f"--export_cache={f32}", "--cache_precision=none")
    assert "resumed after epoch 1" in log and "epoch 1: loss" not in log  # Not retrained.
    r, _ = _run(tmp_path, "ranker", *vista, "--model=vista_ranker", f"--from_cache={int8}",
                f"--score_caches={f32},{int8}", "--score_lags=5,10")  # fmt: skip
    ablation = r["cache_ablation"]
    assert ablation["epoch"] == 1 and ablation["reference"] == str(int8)
    caches = ablation["caches"]
    assert [caches[str(c)]["quantization"] for c in (int8, f32)] == ["int8", "none"]
    assert caches[str(int8)]["auc"] == pytest.approx(r["last"]["test"]["auc"], abs=1e-9)
    assert caches[str(int8)]["paired"]["diff"] == 0.0  # The reference against itself.
    # int8 keeps the scoring close to float32 (one scale per token).
    assert caches[str(f32)]["auc"] == pytest.approx(caches[str(int8)]["auc"], abs=0.01)
    assert caches[str(f32)]["count"] == caches[str(int8)]["count"]
    stale = ablation["stale"]  # One and two snapshots (5 events each) older.
    assert list(stale) == ["5", "10"] and all("p_value" in s["paired"] for s in stale.values())
    assert 0 <= stale["5"]["inexact"] <= stale["10"]["inexact"] < stale["10"]["count"]

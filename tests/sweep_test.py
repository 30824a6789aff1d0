"""experiments.sweep: grids from the config file, resume/skip, the table and the plot.

The pipeline itself is replaced by a fake stage runner that records what it was asked to run
and writes what the real stages write (stages.json, results.json), so these tests take
seconds; the real pipeline's own resume is tested in pipeline_test.py.
"""

import csv
import dataclasses
import json
import pathlib
import shutil

import numpy as np
import pytest

from experiments import common, sweep
from experiments.synthetic import config as synthetic_config
from vista_jax import evaluation, metrics, pipeline
from vista_jax.errors import ConfigError, WorkdirError

CONFIG = "experiments/synthetic/config.py:tiny"
SWEEP = "history_len:tiny,seeds=2"


class FakeStages:
    """Stands in for pipeline.train_and_evaluate: records calls, writes the stage outputs."""

    def __init__(self, fail_at: str | None = None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, config, run_dir, mode):
        run_dir = pathlib.Path(run_dir)
        self.calls.append((run_dir.name, mode))
        for stage in pipeline.STAGES if mode == "all" else [mode]:
            if stage == self.fail_at:
                raise KeyboardInterrupt(f"killed in {stage}")  # A kill mid-point.
            path = run_dir / pipeline.STAGES_FILE
            stages = evaluation.read_json(path) if path.exists() else {}
            evaluation.write_json(path, stages | {stage: {"wall_s": 1.0, "finished": "now"}})
        if mode in ("all", "evaluate"):
            length = config.data.history_window
            auc = {"vista_downstream": 0.7 + length / 1e4 + config.seed / 100, "recent_only": 0.6}
            models = {m: {"auc": a, "logloss": 0.5, "ne": 0.9} for m, a in auc.items()}
            reference = {"history_count_auc": 0.7 + length / 2e4}
            evaluation.write_json(run_dir / "results.json",
                                  {"models": models, "oracle_auc": 0.83,
                                   "reference_aucs": reference})  # fmt: skip
            scored = evaluation.shared_candidates(predictions(config))
            evaluation.write_predictions(run_dir / pipeline.PREDICTIONS_FILE, scored)


def predictions(config) -> dict:
    """Candidates fixed by the data (history length); vista_downstream's logits separate the
    labels better with reconstruction on, recent_only's do not depend on anything swept."""
    data = np.random.default_rng(config.data.history_window)
    user, label = np.repeat(np.arange(40), 5), data.integers(0, 2, 200).astype(float)
    noise = np.random.default_rng([config.data.history_window, config.seed]).normal(size=200)
    signal = {"vista_downstream": 0.5 + config.summarizer.recon_weight, "recent_only": 0.5}
    return {m: evaluation.Predictions(label, s * label + noise, user, 40, 1.0)
            for m, s in signal.items()}  # fmt: skip


def _run(workdir, fake, **kw):
    return sweep.run_sweep(CONFIG, SWEEP, workdir, run_stage=fake, **kw)


def test_grid_from_the_config_file():
    module, variant = sweep.load_experiment("experiments/synthetic/config.py:tiny")
    assert variant == "tiny"
    points = sweep.grid(module, "history_len")
    assert [p.x for p in points] == list(synthetic_config.HISTORY_LENGTHS)
    assert {p.seed for p in points} == {0} and points[0].x_key == "data.history_len"
    assert points[-1].name == "history_len=1000-seed=0"
    assert points[-1].overrides["data.history_window"] == 1000
    seeds = sweep.grid(module, "num_seeds:seeds=3")
    assert len(seeds) == 15 and [p.seed for p in seeds[:3]] == [0, 1, 2]
    assert [p.x for p in sweep.grid(module, "width")] == [16, 32, 64, 128]
    assert points[0].overrides["source.num_steps"] == 1500
    full = sweep.grid(module, "history_len:full")
    assert [p.x for p in full] == list(synthetic_config.FULL_HISTORY_LENGTHS)
    assert full[-1].overrides["data.history_window"] == 100000
    assert full[-1].overrides["data.dormant_weight"] < points[-1].overrides["data.dormant_weight"]
    longer = sweep.grid(module, "history_len:full,steps=2000,max_len=10000")
    assert {p.overrides["source.num_steps"] for p in longer} == {2000}
    assert [p.x for p in longer] == [1000, 3000, 10000]


def test_every_shipped_point_is_a_valid_config(tmp_path):
    module, _ = sweep.load_experiment("experiments/synthetic/config.py")
    base = module.get_config(None)
    names = ("history_len", "history_len:full", "num_seeds", "width", "staleness", "attention",
             "recon", "quantization")  # fmt: skip
    for name in names:
        for point in sweep.grid(module, name):
            typed = sweep.point_config(base, point, tmp_path)
            assert typed.seed == point.seed
            assert typed.data.data_dir == str(tmp_path.absolute() / "data")  # Shared data.
    width = sweep.grid(module, "width")[-1]
    assert sweep.point_config(base, width, tmp_path).ranker.d_model == 128
    # An ablation's first point is the history_len sweep's 1k point; the others change one key.
    one_k = sweep.point_config(base, sweep.grid(module, "history_len")[-1], tmp_path)
    for name, section in (("staleness", "data"), ("attention", "summarizer"),
                          ("recon", "summarizer"), ("quantization", "cache")):  # fmt: skip
        first, *others = (sweep.point_config(base, p, tmp_path) for p in sweep.grid(module, name))
        assert first == one_k, name
        for other in others:
            assert other != one_k
            assert dataclasses.replace(other, **{section: getattr(one_k, section)}) == one_k


def test_unknown_sweep_names_the_valid_ones():
    with pytest.raises(ConfigError, match="did you mean 'history_len'.*history_len, num_seeds"):
        synthetic_config.get_sweep("history_length")
    valid = "attention, history_len, num_seeds, quantization, recon, staleness, width"
    with pytest.raises(ConfigError, match=f"valid sweeps: {valid}"):
        synthetic_config.get_sweep("depth")
    with pytest.raises(ConfigError, match="unknown sweep variant 'seed'.*--sweep"):
        synthetic_config.get_sweep("width:seed=2")


def test_bad_override_key_is_refused_before_anything_runs(tmp_path):
    config = tmp_path / "config.py"
    config.write_text(
        "from experiments.synthetic.config import get_config  # noqa: F401\n"
        "def get_sweep(arg):\n"
        "    return [{'summarizer.num_seeds': 4, 'seed': 0},\n"
        "            {'summarizer.num_seed': 8, 'seed': 0}]\n"
    )
    fake = FakeStages()
    with pytest.raises(ConfigError, match="num_seed=8.*did you mean 'summarizer.num_seeds'"):
        sweep.run_sweep(str(config), "x", tmp_path / "w", run_stage=fake)
    assert fake.calls == [] and not (tmp_path / "w").exists()


def test_config_without_sweeps_and_unknown_point_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="defines no get_sweep"):
        sweep.load_experiment("experiments/eventlog/config.py")
    with pytest.raises(ConfigError, match="--only names no point.*history_len=300-seed=0"):
        _run(tmp_path, FakeStages(), only=["history_len=42-seed=0"])


def test_points_tables_and_plot_are_written(tmp_path):
    fake = FakeStages()
    out = _run(tmp_path, fake)
    names = ["history_len=300-seed=0", "history_len=300-seed=1",
             "history_len=600-seed=0", "history_len=600-seed=1"]  # fmt: skip
    assert fake.calls == [(n, "all") for n in names]
    assert sorted(p.stem for p in (tmp_path / "points").glob("*.json")) == sorted(names)
    record = json.loads((tmp_path / "points" / f"{names[2]}.json").read_text())
    assert record["x"] == 600 and record["seed"] == 0
    # FLOPs: the summarizer grows with the history; the cache-fed ranker does not.
    small = json.loads((tmp_path / "points" / f"{names[0]}.json").read_text())
    assert record["flops_per_request"]["summarizer"] > small["flops_per_request"]["summarizer"]
    assert (record["flops_per_request"]["vista_downstream"]
            == small["flops_per_request"]["vista_downstream"])  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert out["rows"] == len(rows)
    vista = [r for r in rows if r["model"] == "vista_downstream"]
    assert len(vista) == 4 and {r["x"] for r in vista} == {"300", "600"}
    cost_only = [r for r in rows if r["model"] == "full_target_attention"]
    assert len(cost_only) == 4 and all(r["auc"] == "" for r in cost_only)
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert {r["history_count_auc"] for r in vista} == {"0.715", "0.73"}


def test_publish_copies_results_but_not_runs(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "stale.json").write_text("{}")
    out = _run(tmp_path / "work", FakeStages(), publish_dir=tmp_path / "results")
    published = tmp_path / "results"
    assert out["published"] == str(published)
    assert sorted(p.name for p in published.iterdir()) == ["points", "sweep.csv", "sweep.png"]
    assert len(list((published / "points").glob("*.json"))) == 4
    assert (published / "sweep.csv").read_text() == (tmp_path / "work" / "sweep.csv").read_text()


def test_an_ablation_pairs_each_point_with_the_default_at_its_seed(tmp_path):
    published = tmp_path / "published"
    out = sweep.run_sweep(
        CONFIG, "recon:tiny,seeds=2", tmp_path, run_stage=FakeStages(), publish_dir=published
    )
    paired = json.loads((tmp_path / "paired.json").read_text())
    assert json.loads((published / "paired.json").read_text()) == paired
    assert out["paired"] == 2 and paired["not_paired"] == {}
    assert sorted(paired["points"]) == ["recon_weight=0.0-seed=0", "recon_weight=0.0-seed=1"]
    entry = paired["points"]["recon_weight=0.0-seed=1"]
    assert entry["against"] == "recon_weight=1.0-seed=1" and entry["x"] == 0.0
    runs = tmp_path / "runs"
    label, user, on = evaluation.read_predictions(runs / entry["against"] / "predictions.npz")
    _, _, off = evaluation.read_predictions(runs / "recon_weight=0.0-seed=1" / "predictions.npz")
    direct = metrics.paired_auc_bootstraps(
        label, on["vista_downstream"], {"off": off["vista_downstream"]}, user, 1000
    )["off"]
    test = entry["models"]["vista_downstream"]
    assert test["diff"] == pytest.approx(direct["diff"]) and test["diff"] > 0.05
    assert test["p_value"] == pytest.approx(direct["p_value"])
    assert entry["models"]["recent_only"]["diff"] == 0.0  # Same logits in both runs.


def test_a_rerun_keeps_finished_pairs_and_retests_changed_ones(tmp_path, monkeypatch):
    sweep.run_sweep(CONFIG, "recon:tiny,seeds=2", tmp_path, run_stage=FakeStages())
    first = json.loads((tmp_path / "paired.json").read_text())
    calls = []
    tests = sweep.metrics.paired_auc_tests
    monkeypatch.setattr(sweep.metrics, "paired_auc_tests",
                        lambda *a, **kw: calls.append(1) or tests(*a, **kw))  # fmt: skip
    points = sweep.grid(sweep.load_experiment(CONFIG)[0], "recon:tiny,seeds=2")
    assert sweep.paired_against_first(points, tmp_path, 1000) == first and calls == []
    # New predictions for one point (e.g. re-scored): only that pair is tested again.
    changed = tmp_path / "runs" / "recon_weight=0.0-seed=1" / pipeline.PREDICTIONS_FILE
    label, user, logits = evaluation.read_predictions(changed)
    flipped = {m: -x for m, x in logits.items()}
    evaluation.write_predictions(changed, evaluation.CandidateLogits(label, user, flipped))
    again = sweep.paired_against_first(points, tmp_path, 1000)
    assert len(calls) == 1
    assert again["points"]["recon_weight=0.0-seed=0"] == first["points"]["recon_weight=0.0-seed=0"]
    test = again["points"]["recon_weight=0.0-seed=1"]["models"]["vista_downstream"]
    assert (
        test["diff"]
        > first["points"]["recon_weight=0.0-seed=1"]["models"]["vista_downstream"]["diff"]
    )
    assert len(sweep.paired_against_first(points, tmp_path, 500)["points"]) == 2 and len(calls) == 3


def test_seeds_added_to_a_published_ablation_in_a_new_workdir_keep_its_pairs(tmp_path):
    published = tmp_path / "published"
    sweep.run_sweep(CONFIG, "recon:tiny", tmp_path / "first", run_stage=FakeStages(),
                    publish_dir=published)  # fmt: skip
    before = json.loads((published / "paired.json").read_text())["points"]
    work = tmp_path / "more_seeds"  # Another machine: the published results, no runs.
    shutil.copytree(published / "points", work / "points")
    shutil.copy2(published / "paired.json", work / "paired.json")
    fake = FakeStages()
    sweep.run_sweep(CONFIG, "recon:tiny,seeds=2", work, run_stage=fake, publish_dir=published)
    assert sorted(name for name, _ in fake.calls) == [
        "recon_weight=0.0-seed=1", "recon_weight=1.0-seed=1"]  # fmt: skip
    paired = json.loads((published / "paired.json").read_text())
    assert paired["not_paired"] == {}
    assert paired["points"]["recon_weight=0.0-seed=0"] == before["recon_weight=0.0-seed=0"]
    assert paired["points"]["recon_weight=0.0-seed=1"]["against"] == "recon_weight=1.0-seed=1"
    # One run of a pair present and the other gone is not a published pair: not kept.
    shutil.rmtree(work / "runs" / "recon_weight=0.0-seed=1")
    (work / "runs" / "recon_weight=0.0-seed=1").mkdir()
    points = sweep.grid(sweep.load_experiment(CONFIG)[0], "recon:tiny,seeds=2")
    again = sweep.paired_against_first(points, work, 1000)
    assert "recon_weight=0.0-seed=1" in again["not_paired"]
    # Other resamples than the published test: the pair cannot be kept, nor re-tested.
    assert "recon_weight=0.0-seed=0" in sweep.paired_against_first(points, work, 500)["not_paired"]


def test_points_on_other_candidates_are_not_paired(tmp_path):
    out = _run(tmp_path, FakeStages())  # history_len: each length has its own candidates.
    assert "paired" not in out and not (tmp_path / "paired.json").exists()
    paired = sweep.paired_against_first(
        sweep.grid(sweep.load_experiment(CONFIG)[0], SWEEP), tmp_path, 100
    )
    assert paired["points"] == {}
    assert set(paired["not_paired"]) == {"history_len=600-seed=0", "history_len=600-seed=1"}
    assert "other candidates" in paired["not_paired"]["history_len=600-seed=1"]
    (tmp_path / "runs" / "history_len=600-seed=1" / pipeline.PREDICTIONS_FILE).unlink()
    paired = sweep.paired_against_first(
        sweep.grid(sweep.load_experiment(CONFIG)[0], SWEEP), tmp_path, 100
    )
    assert "Fix: delete the point's record" in paired["not_paired"]["history_len=600-seed=1"]


def test_series_mean_and_std_over_seeds():
    rows = [{"model": "m", "x": 1, "auc": 0.6}, {"model": "m", "x": 1, "auc": 0.8},
            {"model": "m", "x": 2, "auc": 0.9}, {"model": "n", "x": 1, "auc": None}]  # fmt: skip
    xs, mean, std = sweep.series(rows, "auc")["m"]
    assert xs == [1, 2] and mean == pytest.approx([0.7, 0.9]) and std == pytest.approx([0.1, 0])
    assert "n" not in sweep.series(rows, "auc")


def test_categorical_sweeps_keep_grid_order_and_plot(tmp_path):
    rows = [{"model": "m", "x": x, "x_key": "summarizer.attention", "auc": a,
             "flops_per_request": 1.0, "train_flops": 2.0}
            for x, a in (("qla", 0.7), ("softmax", 0.72), ("qla", 0.74))]  # fmt: skip
    xs, mean, _ = sweep.series(rows, "auc")["m"]
    assert xs == ["qla", "softmax"] and mean == pytest.approx([0.72, 0.72])
    sweep.plot(rows, tmp_path / "a.png", "auc", "attention")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_finished_points_are_skipped(tmp_path):
    _run(tmp_path, FakeStages())
    again = FakeStages()
    _run(tmp_path, again)
    assert again.calls == []


def test_killed_point_resumes_at_its_first_unfinished_stage(tmp_path):
    killed = FakeStages(fail_at="train_ranker")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, killed)
    assert killed.calls == [("history_len=300-seed=0", "all")]
    assert not (tmp_path / "points").exists()  # Nothing half-finished is published.
    resumed = FakeStages()
    _run(tmp_path, resumed)
    after_kill = list(pipeline.STAGES)[list(pipeline.STAGES).index("train_ranker") :]
    k = len(after_kill)
    assert resumed.calls[:k] == [("history_len=300-seed=0", stage) for stage in after_kill]
    assert resumed.calls[k:] == [(n, "all") for n in ("history_len=300-seed=1",
                                 "history_len=600-seed=0", "history_len=600-seed=1")]  # fmt: skip


def test_remaining_stages(tmp_path):
    assert sweep.remaining_stages(tmp_path) == list(pipeline.STAGES)
    stages = {"train_source": {}, "train_ranker": {}}  # build_cache missing: redo from there
    evaluation.write_json(tmp_path / pipeline.STAGES_FILE, stages)
    assert sweep.remaining_stages(tmp_path) == list(pipeline.STAGES)[1:]
    evaluation.write_json(tmp_path / pipeline.STAGES_FILE, dict.fromkeys(pipeline.STAGES, {}))
    assert sweep.remaining_stages(tmp_path) == ["evaluate"]


def test_a_changed_grid_is_not_mixed_into_old_points(tmp_path):
    _run(tmp_path, FakeStages(), only=["history_len=300-seed=0"])
    record = tmp_path / "points" / "history_len=300-seed=0.json"
    data = json.loads(record.read_text())
    data["overrides"]["source.num_steps"] = 999
    record.write_text(json.dumps(data))
    with pytest.raises(WorkdirError, match="new --workdir"):
        _run(tmp_path, FakeStages())


def test_sweep_points_order_and_derived_keys():
    points = common.sweep_points("a.b", [1, 2], seeds=(0, 1), derive=lambda v: {"c": v * 10})
    assert points[0] == {"a.b": 1, "seed": 0, "c": 10}
    assert [(p["a.b"], p["seed"]) for p in points] == [(1, 0), (1, 1), (2, 0), (2, 1)]

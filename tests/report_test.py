"""experiments.report: filing runs, mean ± std and paired tests per setting, README headline."""

import json
import subprocess
import sys

import pytest

from experiments import report
from vista_jax.errors import ConfigError


def _results(seed, aucs, diffs=None, task="ranking", oracle=0.8):
    models = {
        name: {"auc": auc, "logloss": 0.6, "ne": 0.9, "requests_per_s": 100.0,
               "train": {"examples_per_s": 50.0, "epochs": 2.0}}
        for name, auc in aucs.items()
    }  # fmt: skip
    paired = None
    if diffs is not None:
        paired = {"reference": "vista_downstream", "models": {
            n: {"diff": d, "p_value": p, "ci95": [d - 0.01, d + 0.01], "num_samples": 1000}
            for n, (d, p) in diffs.items()}}  # fmt: skip
    return {"task": task, "models": models, "paired": paired, "oracle_auc": oracle,
            "provenance": {"seed": seed, "git_commit": "abc123", "wall_s": 120.0}}  # fmt: skip


def _workdir(tmp_path, name, results):
    work = tmp_path / name
    work.mkdir()
    (work / "results.json").write_text(json.dumps(results))
    return work


@pytest.fixture
def filed(tmp_path):
    out = tmp_path / "results"
    for seed, (ref, twin, p) in enumerate([(0.70, 0.66, 0.001), (0.72, 0.66, 0.02)]):
        aucs = {"vista_downstream": ref, "twin": twin, "recent_only": 0.6}
        diffs = {"twin": (ref - twin, p), "recent_only": (ref - 0.6, 0.001)}
        report.add(_workdir(tmp_path, f"w{seed}", _results(seed, aucs, diffs)), "syn", out, False)
    return tmp_path, out


def test_setting_table_has_mean_std_normalized_auc_and_paired_test(filed):
    tmp_path, out = filed
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold table\n{report.END}\nrest\n")
    text = report.report(out, tmp_path, readme)
    assert (out / "RESULTS.md").read_text() == text and (out / "syn.png").is_file()
    twin = next(line for line in text.splitlines() if line.startswith("| twin |"))
    # AUC .66 ± 0; normalized (.66 - .5) / (.8 - .5); Δ .05 ± .01 with the largest p, .02.
    assert "0.6600 ± 0.0000" in twin and "0.533 ± 0.000" in twin
    assert "0.0500 ± 0.0100 (0.020)" in twin
    recent = next(line for line in text.splitlines() if line.startswith("| recent_only |"))
    assert "(≤ 0.001)" in recent  # Every seed at the bootstrap's floor of 1 / 1000.
    head = readme.read_text()
    assert "old table" not in head and head.startswith("intro\n") and head.endswith("rest\n")
    row = next(line for line in head.splitlines() if line.startswith("| syn |"))
    assert "| 2 | 0.7100 ± 0.0100 | twin | 0.6600 ± 0.0000 |" in row  # Best non-VISTA model.


def test_sweep_points_are_settings_in_numeric_order(filed):
    tmp_path, out = filed
    points = tmp_path / "experiments/synthetic/results/sweep_history_len/points"
    points.mkdir(parents=True)
    for x in (1000, 32):
        point = {"x_key": "data.history_len", "x": x, "seed": 0, "git_commit": "def",
                 "stage_wall_s": {"a": 60.0}} | _results(0, {"vista_downstream": 0.7})  # fmt: skip
        (points / f"history_len={x}-seed=0.json").write_text(json.dumps(point))
    text = report.report(out, tmp_path, None)
    assert text.index("## synthetic sweep: history_len=32") < text.index("history_len=1000")


def test_ablations_table_pairs_each_value_with_the_default_over_seeds(filed):
    tmp_path, out = filed
    sweep_dir = tmp_path / "experiments/synthetic/results/sweep_recon"
    (sweep_dir / "points").mkdir(parents=True)
    paired = {"reference": "recon_weight=1.0 at the same seed", "points": {}, "not_paired": {}}
    for seed, (on, off, p) in enumerate([(0.78, 0.75, 0.001), (0.80, 0.76, 0.03)]):
        for x, auc in ((1.0, on), (0.0, off)):
            aucs = {"vista_downstream": auc, "vista_source": auc + 0.01, "recent_only": 0.6}
            point = {"x_key": "summarizer.recon_weight", "x": x, "seed": seed,
                     "stage_wall_s": {"a": 60.0}} | _results(seed, aucs)  # fmt: skip
            (sweep_dir / "points" / f"recon_weight={x}-seed={seed}.json").write_text(
                json.dumps(point)
            )
        test = {"diff": on - off, "p_value": p, "num_samples": 1000}
        paired["points"][f"recon_weight=0.0-seed={seed}"] = {
            "x": 0.0, "seed": seed, "against": f"recon_weight=1.0-seed={seed}",
            "models": {"vista_downstream": test, "vista_source": test, "recent_only": test},
        }  # fmt: skip
    (sweep_dir / "paired.json").write_text(json.dumps(paired))
    text = report.report(out, tmp_path, None)
    rows = [line for line in text.splitlines() if line.startswith("| synthetic recon |")]
    assert len(rows) == 2  # VISTA's two models; recent_only does not depend on the summarizer.
    down = next(r for r in rows if "| vista_downstream |" in r)
    assert "| recon_weight=0.0 | recon_weight=1.0 | vista_downstream | 2 |" in down
    assert "| 0.7900 ± 0.0100 | 0.7550 ± 0.0050 | 0.0350 ± 0.0050 (0.030) |" in down
    assert text.index("## Ablations") < text.index("## syn")
    # The points have their own sections; in the headline, only the settings that are not
    # an ablation's points: a sweep without paired tests (a scaling curve) stays there.
    assert "## synthetic sweep: recon_weight=0.0" in text
    head = report.headline(report.summarize(report.collect(out, tmp_path)))
    assert "| syn |" in head and "recon_weight" not in head
    curve = tmp_path / "experiments/synthetic/results/sweep_history_len/points"
    curve.mkdir(parents=True)
    point = {"x_key": "data.history_len", "x": 32, "seed": 0, "stage_wall_s": {"a": 60.0}}
    point |= _results(0, {"vista_downstream": 0.7, "recent_only": 0.6})
    (curve / "history_len=32-seed=0.json").write_text(json.dumps(point))
    head = report.headline(report.summarize(report.collect(out, tmp_path)))
    assert "| synthetic sweep: history_len=32 |" in head and "recon_weight" not in head


def test_filing_refuses_a_second_copy_of_a_seed_and_other_tasks(filed, tmp_path):
    _, out = filed
    work = _workdir(tmp_path, "again", _results(0, {"vista_downstream": 0.7}))
    with pytest.raises(ConfigError, match="already filed"):
        report.add(work, "syn", out, replace=False)
    report.add(work, "syn", out, replace=True)
    retrieval = _workdir(tmp_path, "retrieval", _results(5, {"x": 0.1}, task="retrieval"))
    with pytest.raises(ConfigError, match="ranking task"):
        report.add(retrieval, "syn", out, replace=False)
    with pytest.raises(ConfigError, match="usable name"):
        report.add(work, "../escape", out, replace=False)
    with pytest.raises(ConfigError, match="does not exist"):
        report.add(tmp_path / "nowhere", "syn", out, replace=False)
    assert sorted(p.name for p in (out / "runs" / "syn").iterdir()) == ["seed0.json", "seed1.json"]


def test_committed_results_and_readme_are_what_the_report_generates():
    root = report.pathlib.Path(__file__).resolve().parents[1]
    runs = report.collect(root / "experiments/results", root)
    committed = (root / "experiments/results/RESULTS.md").read_text()
    expected = report.markdown(report.summarize(runs), report.ablations(root, runs))
    assert committed == expected, "rerun: python -m experiments.report"
    readme = (root / "README.md").read_text()
    between = readme[readme.index(report.BEGIN) + len(report.BEGIN) : readme.index(report.END)]
    assert between.strip() == report.headline(report.summarize(runs)).strip()


def test_command_line_files_a_run_and_refuses_a_bad_setting(tmp_path):
    root = report.pathlib.Path(__file__).resolve().parents[1]
    work = _workdir(tmp_path, "w", _results(4, {"vista_downstream": 0.7, "twin": 0.6}))
    cmd = [sys.executable, "-m", "experiments.report", f"--add={work}",
           f"--results_dir={tmp_path / 'out'}", "--readme="]  # fmt: skip
    ok = subprocess.run(cmd + ["--setting=syn"], cwd=root, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "out/runs/syn/seed4.json").is_file() and "## syn" in ok.stdout
    bad = subprocess.run(cmd + ["--setting=a b"], cwd=root, capture_output=True, text=True)
    assert bad.returncode != 0 and "usable name" in bad.stderr


def test_ranking_summaries_are_settings_and_each_model_counts_its_own_seeds(tmp_path):
    results = tmp_path / "experiments/ml1m/results"
    results.mkdir(parents=True)
    runs = [_results(0, {"vista_downstream": 0.80, "full_attention": 0.79},
                     {"full_attention": (0.01, 0.3)}, oracle=None),
            _results(1, {"vista_downstream": 0.82}, oracle=None)]  # fmt: skip
    summary = {"setting": "ml1m event ranking", "runs": runs}
    (results / "ranking_summary.json").write_text(json.dumps(summary))
    text = report.report(tmp_path / "out", tmp_path, None)
    full = next(line for line in text.splitlines() if line.startswith("| full_attention |"))
    vista = next(line for line in text.splitlines() if line.startswith("| vista_downstream |"))
    assert full.startswith("| full_attention | 1 | 0.7900 |") and "0.0100 (0.300)" in full
    assert vista.startswith("| vista_downstream | 2 | 0.8100 ± 0.0100 |")
    head = next(line for line in text.splitlines() if line.startswith("| ml1m event ranking |"))
    assert head.startswith("| ml1m event ranking | 2 vs 1 | 0.8100 ± 0.0100 | full_attention |")


def test_a_filed_runs_recorded_command_becomes_one_a_reader_can_rerun(tmp_path):
    out = tmp_path / "results"
    many = " ".join(f"--config.k{i}={i}" for i in range(12))
    recorded = (
        "/work/x/.venv/bin/python run.py --config=experiments/synthetic/config.py "
        f"--workdir=/work/runs/s3 --config.seed=3 --config.data.note='two words' {many} "
        "--mode=evaluate"
    )
    for seed in (3, 4):
        results = _results(seed, {"vista_downstream": 0.7, "recent_only": 0.6})
        results["provenance"]["command"] = recorded.replace("seed=3", f"seed={seed}")
        report.add(_workdir(tmp_path, f"w{seed}", results), "syn", out, False)
    text = report.report(out, tmp_path, None)
    assert "Rerun seed 3 (another seed: its `--config.seed`)" in text
    block = text.split("```\n")[1]
    assert all(len(line) <= 96 for line in block.splitlines())
    args = report.shlex.split(block.replace("\\\n", " "))
    assert args[:4] == ["python", "run.py", "--config=experiments/synthetic/config.py",
                        "--config.seed=3"]  # fmt: skip
    assert "--config.data.note=two words" in args and "--config.k11=11" in args
    assert args[-2:] == ["--workdir=WORKDIR", "--mode=all"] and "/work/runs/s3" not in block
    assert report.rerun_command("python -m experiments.sweep --sweep=x") == ""  # Not run.py.

"""The ML-1M results table is generated from run JSONs: grouping, mean ± std, oracle column."""

import json

import numpy as np
import pytest

from experiments.ml1m import report


def _run(model, seed, hr, prefix_len=0):
    ev = {"epoch": 4, "test": {"hr@10": hr, "ndcg@10": hr / 2}, "valid": {}}
    return {
        "model": model, "seed": seed, "epochs_run": 4, "epoch_seconds": [60.0, 120.0],
        "config": {"prefix_len": prefix_len, "train_on_valid": False}, "evals": [ev],
        "git_commit": "abc", "wall_seconds": 60.0,
        "validation_selected": ev, "last": ev, "best_test_oracle": ev,
    }  # fmt: skip


def test_table_groups_seeds_and_marks_settings(tmp_path):
    runs = [_run("hstu", 0, 0.2), _run("hstu", 1, 0.3), _run("vista", 0, 0.25, prefix_len=64)]
    for i, run in enumerate(runs):
        (tmp_path / f"r{i}.json").write_text(json.dumps(run))
    text = report.report(tmp_path)
    hstu = next(line for line in text.splitlines() if line.startswith("| hstu |"))
    assert "| 2 |" in hstu and "0.2500 ± 0.0500" in hstu and "0.3097 / 0.172" in hstu
    assert "vista +lifelong prefix 64" in text


def test_settings_name_what_each_request_form_ranker_reads():
    def named(model, **config):
        return report.setting({"model": model, "config": config})

    assert named("twin", top_k=64, prefix_len=1024) == "twin k=64 +lifelong prefix 1024"
    assert named("sim_hard", top_k=16) == "sim_hard k=16"
    assert named("recent_attention", num_recent=64) == "recent_attention R=64"
    assert named("recent_only", num_recent=64) == "recent_only R=64"
    assert named("full_attention", prefix_len=1024) == "full_attention +lifelong prefix 1024"
    assert named("vista", num_recent=200) == "vista R=200"
    assert named("hstu", num_recent=200) == "hstu"  # Not read by the window encoders.


def test_runs_of_very_different_lengths_are_separate_rows(tmp_path):
    runs = [_run("sasrec", s, 0.25) for s in (0, 1)] + [_run("sasrec", 0, 0.28)]
    runs[2]["epochs_run"] = 72
    runs[2]["evals"][0]["epoch"] = 72
    for i, run in enumerate(runs):
        (tmp_path / f"r{i}.json").write_text(json.dumps(run))
    lines = report.report(tmp_path).splitlines()
    short = next(line for line in lines if line.startswith("| sasrec, 4 epochs | 2 |"))
    long = next(line for line in lines if line.startswith("| sasrec, 72 epochs | 1 |"))
    assert "0.2500 ± 0.0000" in short and "0.2800" in long


def test_ranking_runs_of_other_lengths_stay_one_setting():
    runs = [_run("hstu", s, 0.0) | {"task": "ranking", "epochs_run": e}
            for s, e in ((0, 3), (1, 8))]  # fmt: skip
    assert list(report.grouped(runs)) == ["hstu"]


def test_ranking_runs_get_their_own_table_by_auc(tmp_path):
    ev = {"epoch": 1, "test": {"auc": 0.8, "ne": 0.79, "count": 300},
          "valid": {"auc": 0.81, "count": 100}, "eval_seconds": 2.0}  # fmt: skip
    ranking = _run("hstu", 0, 0.0) | {
        "task": "ranking", "evals": [ev], "validation_selected": ev, "last": ev,
        "best_test_oracle": ev, "scored_events": {"train": 6000, "valid": 100, "test": 300},
    }  # fmt: skip
    for i, run in enumerate([_run("hstu", 0, 0.2), ranking]):
        (tmp_path / f"r{i}.json").write_text(json.dumps(run))
    text = report.report(tmp_path)
    retrieval_part, ranking_part = text.split("# ML-1M event ranking")
    assert "0.2000" in retrieval_part and "0.8000" not in retrieval_part
    hstu = next(line for line in ranking_part.splitlines() if line.startswith("| hstu |"))
    assert "0.8000 | 0.7900" in hstu and "0.3097" not in hstu
    # 6,000 training examples per 90 s epoch (the median); 400 requests scored in 2 s.
    assert "| 67 | 200 |" in hstu


def test_a_cache_ablation_gets_one_row_per_cache(tmp_path):
    ev = {"epoch": 2, "test": {"auc": 0.8, "ne": 0.79, "count": 300},
          "valid": {"auc": 0.81, "count": 100}, "eval_seconds": 2.0}  # fmt: skip
    paired = {"diff": -0.0004, "p_value": 0.5}
    ablation = {"epoch": 2, "reference": "/c/int8", "caches": {
        "/c/int8": {"quantization": "int8", "auc": 0.8, "ne": 0.79},
        "/c/f32": {"quantization": "none", "auc": 0.8004, "ne": 0.789, "paired": paired},
    }, "stale": {"80": {"auc": 0.79, "ne": 0.8, "count": 300, "inexact": 30,
                        "paired": {"diff": 0.01, "p_value": 0.001}}}}  # fmt: skip
    run = _run("vista_ranker", 1, 0.0) | {
        "task": "ranking", "evals": [ev], "validation_selected": ev, "last": ev,
        "best_test_oracle": ev, "cache_ablation": ablation,
    }  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps(run))
    lines = report.report(tmp_path).splitlines()
    rows = [line for line in lines if line.startswith("| vista_ranker | 1 | 2 |")]
    assert rows == [
        "| vista_ranker | 1 | 2 | int8 | as trained | 0.8000 | 0.7900 | reference |",
        "| vista_ranker | 1 | 2 | float32 |  | 0.8004 | 0.7890 | -0.0004 (p 0.5) |",
        "| vista_ranker | 1 | 2 | int8 | 80 events stale (10.0% fresher: the row holds no "
        "older snapshot) | 0.7900 | 0.8000 | +0.0100 (p 0.001) |",
    ]


def test_ranking_rows_carry_a_paired_test_against_the_vista_downstream(tmp_path):
    rng = np.random.default_rng(0)
    n = 4000
    user, event = np.repeat(np.arange(400), 10), np.tile(np.arange(1, 11), 400)
    label = rng.integers(0, 2, n)
    ev = {"epoch": 1, "test": {"auc": 0.8, "ne": 0.8, "logloss": 0.5, "count": n},
          "valid": {"auc": 0.8, "count": n}, "eval_seconds": 1.0}  # fmt: skip
    for name, noise, downstream in (("hstu", 2.0, None), ("vista_hstu", 0.5, "cache")):
        run = _run(name, 0, 0.0) | {
            "task": "ranking", "evals": [ev], "validation_selected": ev, "last": ev,
            "best_test_oracle": ev, "summary_cache": {"read_from": downstream},
        }  # fmt: skip
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
        order = rng.permutation(n)  # Files need not list requests in the same order.
        logit = label + noise * rng.normal(size=n)
        np.savez(
            tmp_path / f"{name}.test_predictions.npz", logit=logit[order],
            label=label[order].astype(np.uint8), user=user[order], event=event[order],
        )  # fmt: skip
    lines = report.report(tmp_path).split("# ML-1M event ranking")[1].splitlines()
    # Every request has 1..10 events before it: all in the first history bucket.
    assert "| share of test requests | 1.000 | 0.000 | 0.000 | 0.000 | 0.000 |" in lines
    hstu = next(line for line in lines if line.startswith("| hstu |"))
    vista = next(line for line in lines if line.startswith("| vista_hstu downstream"))
    assert vista.endswith("| reference |")
    diff, p = hstu.split("| ")[-1].rstrip(" |").split(" (p ")
    assert float(diff) > 0.1 and float(p.rstrip(")")) <= 0.001
    # The same runs and tests, as the long-history report reads them.
    _, summary = report.build(tmp_path)
    (entry,) = summary["runs"]
    assert set(entry["models"]) == {"hstu", "vista_downstream"}
    assert entry["models"]["hstu"]["requests_per_s"] == pytest.approx(2 * n)
    assert entry["paired"]["models"]["hstu"]["diff"] == pytest.approx(float(diff), abs=1e-4)
    assert set(summary["sources"]) == {f"{m}.{e}" for m in ("hstu", "vista_hstu")
                                       for e in ("json", "test_predictions.npz")}  # fmt: skip


def test_the_reference_is_the_cache_reader_best_on_validation():
    def run(model, valid_auc, test_auc):
        ev = {"valid": {"auc": valid_auc}, "test": {"auc": test_auc}}
        return {"model": model, "validation_selected": ev}

    groups = {
        "vista_hstu downstream": [run("vista_hstu", 0.80, 0.79), run("vista_hstu", 0.82, 0.79)],
        "vista_ranker downstream": [run("vista_ranker", 0.80, 0.85)],  # Best test: not chosen.
        "full_attention": [run("full_attention", 0.90, 0.90)],  # Not VISTA on the cache.
    }
    assert report.reference_group(groups) is groups["vista_hstu downstream"]
    assert report.reference_group({"hstu": groups["full_attention"]}) is None


def test_predictions_of_other_requests_are_not_compared():
    a = {"user": np.array([0, 1]), "event": np.array([1, 1]), "label": np.array([1, 0]),
         "logit": np.array([0.5, 0.1])}  # fmt: skip
    with pytest.raises(ValueError, match="different requests"):
        report.aligned(a, a | {"event": np.array([1, 2])})


def test_committed_ranking_summary_is_made_from_the_committed_runs():
    """`ranking_summary.json` (read by experiments.report) names a digest of every ranking run
    and predictions file: a run filed or changed since needs `python -m experiments.ml1m.report`."""
    results = report.pathlib.Path(__file__).resolve().parents[1] / "experiments/ml1m/results"
    summary = json.loads((results / report.RANKING_SUMMARY).read_text())
    runs = [p for p in sorted(results.glob("*.json")) if p.name != report.RANKING_SUMMARY]
    ranking = [p for p in runs if json.loads(p.read_text()).get("task") == "ranking"]
    files = ranking + [p.with_suffix(".test_predictions.npz") for p in ranking]
    want = {p.name: report.file_digest(p) for p in files if p.is_file()}
    assert summary["sources"] == want, "rerun: python -m experiments.ml1m.report"

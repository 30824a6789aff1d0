r"""The ML-1M retrieval table, generated from the runs' JSON results (never typed by hand).

  python -m experiments.ml1m.report [--results_dir=experiments/ml1m/results]

Reads every `*.json` written by `experiments.ml1m.train_sequential`, writes `RESULTS.md`
beside them and prints it. Per run: epochs, the validation-selected epoch's test metrics, the
last epoch's, and (marked as an oracle, for comparison with published figures that were
picked on test) the best test epoch. Runs with several seeds of one setting are shown as
mean ± std.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import pathlib

import numpy as np
from absl import app, flags

from experiments.report import cell
from vista_jax import metrics

RANKING_SUMMARY = "ranking_summary.json"  # The ranking runs for `experiments.report`.
PUBLISHED = {  # meta-recsys/generative-recommenders README, ML-1M, HR@10 / NDCG@10.
    "sasrec": (0.2853, 0.1603),
    "hstu": (0.3097, 0.1720),
    "hstu_large": (0.3294, 0.1893),
}


def setting(run: dict) -> str:
    """A run's model and the switches that change what it measures."""
    cfg = run["config"]
    model = name = run["model"]
    if model in ("recent_attention", "recent_only") or (
        model.startswith("vista") and cfg.get("num_recent", 64) != 64
    ):
        name += f" R={cfg['num_recent']}"
    if model in ("sim_hard", "twin"):
        name += f" k={cfg['top_k']}"
    if cfg.get("prefix_len"):
        name += f" +lifelong prefix {cfg['prefix_len']}"
    if (run.get("summary_cache") or {}).get("read_from"):
        name += " downstream (reads the int8 cache)"
    if cfg.get("train_on_valid"):
        name += " (trains on valid item)"
    return name


def grouped(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs by setting; a retrieval setting run for very different lengths (epochs differing
    by more than a quarter) is split into one group per length, named by its epochs. Ranking
    runs are not: each reports the epoch its validation AUC selects (early stopping), and a
    run stopped once validation fell is the same setting as one run on."""
    by_setting = collections.defaultdict(list)
    for run in runs:
        by_setting[setting(run)].append(run)
    groups = {}
    for name, group in by_setting.items():
        if task_of(group[0]) == "ranking":
            groups[name] = group
            continue
        clusters: list[list[dict]] = []
        for run in sorted(group, key=lambda r: r["epochs_run"]):
            if clusters and run["epochs_run"] <= 1.25 * clusters[-1][0]["epochs_run"]:
                clusters[-1].append(run)
            else:
                clusters.append([run])
        for cluster in clusters:
            epochs = max(r["epochs_run"] for r in cluster)
            groups[name if len(clusters) == 1 else f"{name}, {epochs} epochs"] = cluster
    return groups


# Per task: the two test metrics shown, the one the oracle row and the curve use, the epochs.
TASKS = {
    "retrieval": (("hr@10", "ndcg@10"), "hr@10", (4, 8, 12, 16, 20, 32, 48, 64, 80, 100)),
    "ranking": (("auc", "ne"), "auc", tuple(range(1, 21))),
}


def task_of(run: dict) -> str:
    return run.get("task", "retrieval")  # Runs from before --task were all retrieval.


def predictions(run: dict) -> dict | None:
    """A ranking run's selected-epoch test predictions, saved beside its JSON, or None."""
    return _load_predictions(
        pathlib.Path(run.get("_path", "")).with_suffix(".test_predictions.npz")
    )


@functools.cache
def _load_predictions(path: pathlib.Path) -> dict | None:
    """Read once per report: the paired tests and the history table share them."""
    return dict(np.load(path)) if path.is_file() else None


def aligned(a: dict, b: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(labels, logits of a, logits of b, users) over the same requests, in one order;
    refuses predictions of other requests."""
    order = [np.lexsort((p["event"], p["user"])) for p in (a, b)]
    ids = [np.stack([p["user"][o], p["event"][o]]) for p, o in zip((a, b), order, strict=True)]
    if ids[0].shape != ids[1].shape or not np.array_equal(*ids):
        raise ValueError("the two runs' test predictions are for different requests")
    oa, ob = order
    return a["label"][oa].astype(np.float64), a["logit"][oa], b["logit"][ob], a["user"][oa]


def paired_tests(groups: dict[str, list[dict]], reference: list[dict]) -> dict:
    """{(setting, seed): the paired bootstrap over users (1,000 resamples) of the reference's
    test AUC minus that run's}, for every run with saved predictions and a reference run of
    its seed; one set of resamples per seed, shared by every setting."""
    refs = {r["seed"]: predictions(r) for r in reference}
    tests = {}
    for seed, ref in sorted(refs.items()):
        if ref is None:
            continue
        others = {}
        for name, group in groups.items():
            mine = [predictions(r) for r in group if r["seed"] == seed]
            if group is not reference and mine and mine[0] is not None:
                labels, ref_logit, others[name], users = aligned(ref, mine[0])
        if others:
            for name, test in metrics.paired_auc_bootstraps(
                labels, ref_logit, others, users
            ).items():
                tests[(name, seed)] = test
    return tests


def paired_cell(name: str, group: list[dict], tests: dict) -> str:
    """Δ AUC of the reference minus this setting, mean over the seeds with a paired test,
    and the largest p of those tests."""
    found = [tests[(name, r["seed"])] for r in group if (name, r["seed"]) in tests]
    if not found:
        return ""
    return diff_cell(np.mean([t["diff"] for t in found]), max(t["p_value"] for t in found))


def diff_cell(diff: float, p: float) -> str:
    """A paired difference and its p, as every ML-1M table shows them."""
    return f"{diff:+.4f} (p {p:.3g})"


def precision_name(quantization: str) -> str:
    """A summary store's quantization as the tables name it ("none" is float32)."""
    return {"none": "float32"}.get(quantization, quantization)


HISTORY_BUCKETS = (1, 100, 200, 400, 1000)  # Events before the request: [1, 100), ...


def by_history(groups: dict[str, list[dict]]) -> str:
    """Test AUC of each ranking setting (`grouped`) per bucket of the request's history
    length (its event index), mean over the seeds with saved predictions."""
    edges = HISTORY_BUCKETS + (np.inf,)
    names = [
        f"{lo}-{hi - 1}" if hi < np.inf else f">= {lo}"
        for lo, hi in zip(edges[:-1], edges[1:], strict=True)
    ]
    lines = ["| setting | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    shares = None
    for name, group in sorted(groups.items()):
        per_seed = []
        for run in group:
            preds = predictions(run)
            if preds is None:
                continue
            bucket = np.searchsorted(edges, preds["event"], side="right") - 1
            label = preds["label"].astype(np.float64)
            per_seed.append([metrics.auc(label[bucket == b], preds["logit"][bucket == b])
                             for b in range(len(names))])  # fmt: skip
            shares = np.bincount(bucket, minlength=len(names)) / len(bucket)
        if per_seed:
            cells = [f"{v:.4f}" for v in np.mean(per_seed, axis=0)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if shares is None:
        return ""
    lines.append("| share of test requests | " + " | ".join(f"{s:.3f}" for s in shares) + " |")
    return "\n".join(lines)


def cache_ablations(groups: dict[str, list[dict]]) -> str:
    """The runs scored on other summaries (`--score_caches`, `--score_lags`): per seed, the
    test AUC of one checkpoint on each variant and the reference's AUC minus it (paired)."""
    lines = []
    for name, group in sorted(groups.items()):
        for run in sorted(group, key=lambda r: r["seed"]):
            ablation = run.get("cache_ablation")
            if not ablation:
                continue
            ref = ablation["caches"][ablation["reference"]]
            stored = precision_name(ref["quantization"])
            variants = [("as trained", stored, ref)]
            variants += [
                ("", precision_name(e["quantization"]), e)
                for root, e in ablation["caches"].items() if root != ablation["reference"]
            ]  # fmt: skip
            for lag, e in ablation.get("stale", {}).items():
                share = e["inexact"] / e["count"]
                note = f" ({share:.1%} fresher: the row holds no older snapshot)" if share else ""
                variants.append((f"{lag} events stale{note}", stored, e))
            for label, precision, e in variants:
                paired = e.get("paired")
                diff = "reference" if e is ref else (
                    diff_cell(paired["diff"], paired["p_value"]) if paired else "")  # fmt: skip
                lines.append(f"| {name} | {run['seed']} | {ablation['epoch']} | {precision} | "
                             f"{label} | {e['auc']:.4f} | {e['ne']:.4f} | {diff} |")  # fmt: skip
    if not lines:
        return ""
    head = "| setting | seed | epoch | summaries as | staleness | test AUC | NE | Δ AUC (p) |"
    return "\n".join([head, "|---" * 8 + "|", *lines])


def run_costs(run: dict) -> tuple[float | None, float]:
    """(training examples/s, scoring requests/s) of a ranking run: medians over its epochs and
    evaluations; examples/s needs its `scored_events` (None before runs recorded them)."""
    train = None
    if run.get("scored_events"):
        train = run["scored_events"]["train"] / float(np.median(run["epoch_seconds"]))
    requests = [e["valid"]["count"] + e["test"]["count"] for e in run["evals"]]
    score = float(np.median(np.array(requests) / [e["eval_seconds"] for e in run["evals"]]))
    return train, score


def costs(group: list[dict]) -> list[str]:
    """The two costs of a setting, each the mean over its seeds ("" where unknown)."""
    per_run = [run_costs(r) for r in group]
    columns = ([c[i] for c in per_run if c[i] is not None] for i in (0, 1))
    return [f"{np.mean(x):,.0f}" if x else "" for x in columns]


def reference_group(groups: dict[str, list[dict]]) -> list[dict] | None:
    """The VISTA downstream setting the paired tests compare against: of the settings that
    read the int8 cache, the one with the best mean validation AUC (never chosen on test)."""
    downstream = [g for name, g in groups.items() if "downstream" in name]
    if not downstream:
        return None
    return max(downstream, key=lambda g: np.mean([r["validation_selected"]["valid"]["auc"]
                                                  for r in g]))  # fmt: skip


def table(
    groups: dict[str, list[dict]],
    task: str = "retrieval",
    reference: list[dict] | None = None,
    tests: dict | None = None,
) -> str:
    """One row per setting (`grouped`); with a reference (ranking), its paired tests."""
    shown, oracle, _ = TASKS[task]
    paired = reference is not None
    head = ["setting", "seeds", "epochs", "min/epoch"]
    head += [f"{which} {m}" for which in ("valid-selected", "last") for m in shown]
    head += [f"best-test (oracle) {oracle}"]
    head += ["published hr@10 / ndcg@10"] if task == "retrieval" else ["train ex/s", "score req/s"]
    head += ["Δ AUC of the reference (p)"] if paired else []
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, group in sorted(groups.items()):
        row = [name, str(len(group)), ", ".join(str(r["epochs_run"]) for r in group)]
        row.append(f"{np.median([np.median(r['epoch_seconds']) for r in group]) / 60:.1f}")
        for which in ("validation_selected", "last"):
            row += [cell([r[which]["test"][m] for r in group]) for m in shown]
        row.append(cell([r["best_test_oracle"]["test"][oracle] for r in group]))
        if task == "retrieval":
            published = PUBLISHED.get(group[0]["model"])
            row.append(f"{published[0]} / {published[1]}" if published else "")
        else:
            row += costs(group)
        if paired:
            row.append("reference" if group is reference else paired_cell(name, group, tests))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def ranking_summary(groups: dict[str, list[dict]], reference: list[dict], tests: dict) -> dict:
    """The ranking runs (`grouped`) as `experiments.report` reads them: one `results.json`-like
    entry per seed (models named by setting; the reference is `vista_downstream`, a live VISTA
    source `vista_source (...)`), the paired tests, and a digest of every file they came
    from."""
    runs = [r for group in groups.values() for r in group]
    short = {}  # setting -> its model name in the long-history tables
    for name, group in groups.items():
        if group is reference:
            short[name] = "vista_downstream"
        elif group[0]["model"].startswith("vista") and "downstream" not in name:
            short[name] = f"vista_source ({name})"
        else:
            short[name] = name
    seeds = sorted({r["seed"] for r in runs})
    entries = []
    for seed in seeds:
        named = {short[n]: r for n, g in groups.items() for r in g if r["seed"] == seed}
        models = {}
        for name, run in named.items():
            test = run["validation_selected"]["test"]
            train_s, score_s = run_costs(run)
            models[name] = {
                "auc": test["auc"], "logloss": test["logloss"], "ne": test["ne"],
                "requests_per_s": score_s,
                "train": {"epochs": run["validation_selected"]["epoch"],
                          "examples_per_s": train_s},
            }  # fmt: skip
        found = {short[n]: tests[(n, seed)] for n in groups if (n, seed) in tests}
        commits = sorted({r["git_commit"][:12] for r in named.values()})
        entries.append({
            "task": "ranking", "models": models, "oracle_auc": None,
            "paired": {"reference": "vista_downstream", "models": found} if found else None,
            "provenance": {"seed": seed, "git_commit": ",".join(commits),
                           "wall_s": sum(r["wall_seconds"] for r in named.values())},
        })  # fmt: skip
    sources = [pathlib.Path(r["_path"]) for r in runs]
    sources += [p for p in (s.with_suffix(".test_predictions.npz") for s in sources) if p.is_file()]
    return {
        "setting": "ml1m event ranking",
        "note": "generated by python -m experiments.ml1m.report; a seed pairs runs by --seed",
        "runs": entries,
        "sources": {p.name: file_digest(p) for p in sorted(sources)},
    }


def file_digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def curves(groups: dict[str, list[dict]], task: str = "retrieval") -> str:
    _, metric, curve_epochs = TASKS[task]
    runs = [r for group in groups.values() for r in group]
    epochs = [e for e in curve_epochs if any(r["epochs_run"] >= e for r in runs)]
    lines = ["| setting | seed | " + " | ".join(f"ep {e}" for e in epochs) + " |"]
    lines.append("|---" * (len(epochs) + 2) + "|")
    for name, group in sorted(groups.items()):
        for run in sorted(group, key=lambda r: r["seed"]):
            by_epoch = {e["epoch"]: e["test"][metric] for e in run["evals"]}
            cells = [f"{by_epoch[e]:.4f}" if e in by_epoch else "" for e in epochs]
            lines.append(f"| {name} | {run['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results_dir: pathlib.Path) -> str:
    return build(results_dir)[0]


def build(results_dir: pathlib.Path) -> tuple[str, dict | None]:
    """(RESULTS.md, the ranking summary for `experiments.report` or None without ranking)."""
    runs = [
        json.loads(p.read_text()) | {"_path": str(p)}
        for p in sorted(results_dir.glob("*.json"))
        if p.name != RANKING_SUMMARY
    ]
    retrieval = grouped([r for r in runs if task_of(r) == "retrieval"])
    ranking = grouped([r for r in runs if task_of(r) == "ranking"])
    text = [
        "# ML-1M retrieval (HSTU leave-one-out protocol)",
        "",
        "Generated by `python -m experiments.ml1m.report` from the JSON results in this",
        "directory; each run by `python -m experiments.ml1m.train_sequential` (its flags are",
        "in its JSON). Test metrics; the validation item is held out unless marked. Runs were",
        "CPU-budgeted (2 shared cores), so most stopped long before the reference's 101 epochs.",
        "",
        table(retrieval),
        "",
        "A `downstream (reads the int8 cache)` row trains a fresh stage 2 on the summaries a",
        "source run exported (`--export_cache`; the source is named in its JSON and the cache's",
        "lineage): its epochs are its own, on top of the source run's.",
        "",
        "Test HR@10 by epoch (where evaluated):",
        "",
        curves(retrieval),
        "",
    ]  # fmt: skip
    summary = None
    if ranking:
        reference = reference_group(ranking)
        tests = paired_tests(ranking, reference) if reference is not None else {}
        summary = ranking_summary(ranking, reference, tests) if reference is not None else None
        text += [
            "# ML-1M event ranking (`--task=ranking`)",
            "",
            "Every event a request for its own item, label = rating >= 4, global time split",
            "(the latest 10% of events test, the 10% before them validation), every position of",
            "a row scored in one causal pass; test AUC and NE (log loss over the base rate's;",
            "lower is better), the epoch selected on validation AUC. Δ AUC: the reference's",
            "test AUC minus the row's, seed by seed, from the selected epochs' saved predictions",
            "(`*.test_predictions.npz`), with a paired bootstrap over users. The reference is",
            "the VISTA setting that reads the int8 cache with the best validation AUC. Costs",
            "(training examples/s, scoring requests/s; min/epoch) are medians on a shared 2-core",
            "CPU, often with another run beside: compare orders of magnitude, not percents.",
            "",
            table(ranking, "ranking", reference, tests),
            "",
            "Test AUC by epoch:",
            "",
            curves(ranking, "ranking"),
            "",
        ]  # fmt: skip
        ablations = cache_ablations(ranking)
        if ablations:
            text += [
                "Cache precision and staleness (`--score_caches`, `--score_lags`): one trained",
                "checkpoint (its last epoch) scored on the same source's summaries stored int8",
                "(one scale per token), bf16 and float32, and on the summaries it trained on",
                "made stale (each position reads the snapshot that many events older; its last",
                "`--num_recent` raw events stay fresh); only the summaries differ. Δ: the",
                "reference's test AUC minus the variant's, paired bootstrap over users.",
                "",
                ablations,
                "",
            ]  # fmt: skip
        history = by_history(ranking)
        if history:
            text += [
                "Test AUC of the selected epoch by the request's history length (events",
                "before it; a model without a prefix reads at most the last 200 of them):",
                "",
                history,
                "",
            ]  # fmt: skip
    return "\n".join(text), summary


def define_flags() -> None:
    """The command line, defined only when run as a program (importing defines no flag)."""
    flags.DEFINE_string("results_dir", "experiments/ml1m/results", "Where the JSONs are.")


def main(argv):
    del argv
    directory = pathlib.Path(flags.FLAGS.results_dir)
    text, summary = build(directory)
    (directory / "RESULTS.md").write_text(text)
    if summary is not None:  # Read by `python -m experiments.report` (run it next).
        (directory / RANKING_SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    define_flags()
    app.run(main)

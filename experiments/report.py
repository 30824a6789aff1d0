r"""The long-history ranking results, generated from the runs' JSON (never typed by hand).

  python -m experiments.report                                  # regenerate everything
  python -m experiments.report --add=/tmp/vista_rank --setting=ml1m_ranking   # file a run

Sources, one setting each:
* `experiments/results/runs/<setting>/seed<S>.json`: a `run.py` ranking `results.json`,
  filed there by `--add=WORKDIR --setting=NAME` (the seed is read from its provenance);
* every published sweep point, `experiments/<experiment>/results/sweep_*/points/*.json`: the
  setting is `<experiment> sweep: <swept key>=<value>`.
* a published sweep's `paired.json`: each point against the grid's first value (an
  ablation's default) at the same seed, paired over users: the ablations table;
* `experiments/<experiment>/results/ranking_summary.json`: runs trained one model and seed
  per JSON (`experiments.ml1m.train_sequential --task=ranking`), gathered per seed with their
  paired tests by `python -m experiments.ml1m.report` (run it first).

Per setting and model: mean ± std over seeds of AUC, log loss and NE; on synthetic data the
normalized AUC, (AUC − .5) / (oracle − .5); the paired test against `vista_downstream`
(`results.json` `paired`: mean Δ AUC over seeds and the largest p of any seed); training
examples/s, scoring requests/s and epochs; for filed `run.py` runs, the command that reruns
a seed (from the one each recorded). Writes `experiments/results/RESULTS.md`, one PNG
per setting beside it, and the headline table (VISTA against the best non-VISTA model of
each setting; an ablation sweep's points are in the ablations table instead) into README.md
between its `results:begin` and `results:end` markers.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
import re
import shlex
import tempfile

import numpy as np
from absl import app, flags

from vista_jax.errors import ConfigError

REFERENCE = "vista_downstream"
SWEEP_POINTS = "experiments/*/results/sweep_*/points/*.json"
SWEEP_PAIRED = "experiments/*/results/sweep_*/paired.json"  # experiments.sweep's paired tests
ABLATION_MODELS = ("vista_downstream", "vista_source")  # What an ablation of VISTA changes.
RANKING_SUMMARIES = "experiments/*/results/ranking_summary.json"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
_SETTING_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$")


@dataclasses.dataclass(frozen=True)
class Run:
    """One seed of one setting, whatever file it came from."""

    setting: str
    seed: int
    models: dict
    paired: dict | None
    oracle_auc: float | None
    commit: str
    wall_s: float
    source: str
    command: str = ""  # The run.py command line a filed run recorded, if any.


# -- reading ----------------------------------------------------------------------------------
def from_results(setting: str, results: dict, source: str) -> Run:
    prov = results.get("provenance", {})
    return Run(
        setting, int(prov.get("seed", 0)), results["models"], results.get("paired"),
        results.get("oracle_auc"), prov.get("git_commit", "?"),
        float(prov.get("wall_s", math.nan)), source, prov.get("command", ""),
    )  # fmt: skip


def rerun_command(recorded: str) -> str:
    """A run's recorded `run.py` command as one a reader can run: `python`, a placeholder
    workdir, and every stage (`--mode=all`: the command recorded is the one that wrote
    results.json, the `evaluate` stage when the stages ran one by one)."""
    args = shlex.split(recorded)
    if len(args) < 2 or not args[1].endswith("run.py"):
        return ""
    out = ["python", "run.py"]
    for arg in args[2:]:
        if arg.startswith(("--workdir=", "--mode=")):
            continue
        out.append(arg)
    return wrap(out + ["--workdir=WORKDIR", "--mode=all"])


def wrap(args: list[str], width: int = 92) -> str:
    """A shell command on lines of at most ~`width` characters, continued with backslashes."""
    lines, line = [], ""
    for word in map(shlex.quote, args):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line + " \\")
            line = "    " + word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join(lines + [line])


def from_sweep_point(point: dict, experiment: str, source: str) -> Run:
    return Run(
        f"{experiment} sweep: {point['x_key'].split('.')[-1]}={point['x']}", int(point["seed"]),
        point["models"], point.get("paired"), point.get("oracle_auc"),
        point.get("git_commit", "?"), float(sum(point.get("stage_wall_s", {}).values())),
        source,
    )  # fmt: skip


def collect(results_dir: pathlib.Path, root: pathlib.Path) -> list[Run]:
    runs = []
    for path in sorted((results_dir / "runs").glob("*/seed*.json")):
        runs.append(from_results(path.parent.name, json.loads(path.read_text()), str(path)))
    for path in sorted(root.glob(RANKING_SUMMARIES)):
        summary = json.loads(path.read_text())
        runs += [from_results(summary["setting"], r, str(path)) for r in summary["runs"]]
    for path in sorted(root.glob(SWEEP_POINTS)):
        experiment = path.parents[3].name  # experiments/<experiment>/results/sweep_*/points
        runs.append(from_sweep_point(json.loads(path.read_text()), experiment, str(path)))
    return runs


def add(workdir: pathlib.Path, setting: str, results_dir: pathlib.Path, replace: bool) -> str:
    """Files `workdir/results.json` as runs/<setting>/seed<S>.json (atomically); its path."""
    if not _SETTING_NAME.match(setting or ""):
        raise ConfigError(
            f"--setting={setting!r} is not a usable name. Fix: letters, digits and _.=- "
            "(e.g. --setting=ml1m_ranking)"
        )
    source = workdir / "results.json"
    if not source.is_file():
        raise ConfigError(
            f"{source} does not exist. Fix: pass the --workdir of a finished run.py run "
            "(its evaluate stage writes results.json)"
        )
    results = json.loads(source.read_text())
    if results.get("task") != "ranking":
        raise ConfigError(
            f"{source} is a {results.get('task')!r} run; this report is for the ranking task. "
            "Fix: retrieval runs go to experiments/ml1m (python -m experiments.ml1m.report)"
        )
    seed = int(results["provenance"]["seed"])
    target = results_dir / "runs" / setting / f"seed{seed}.json"
    if target.exists() and not replace:
        raise ConfigError(f"{target} is already filed. Fix: pass --replace to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, suffix=".tmp") as f:
        f.write(json.dumps(results, indent=1) + "\n")
    os.replace(f.name, target)
    return str(target)


# -- summarizing ------------------------------------------------------------------------------
def mean_std(values) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values))


def cell(values, digits: int = 4) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return ""
    if len([v for v in values if v is not None]) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def rate(values) -> str:
    mean, _ = mean_std(values)
    return "" if math.isnan(mean) else f"{mean:,.0f}"


def natural_key(text: str) -> list:
    """Sorts `x=32` before `x=250` before `x=1000`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def is_ablation_point(run: Run) -> bool:
    """A point of a sweep that publishes paired tests (`paired.json`): an ablation of VISTA,
    reported in the ablations table against its default, not as a setting of its own."""
    source = pathlib.Path(run.source)
    return source.parent.name == "points" and (source.parents[1] / "paired.json").is_file()


def summarize(runs: list[Run]) -> dict:
    """{setting: {"seeds", "ablation", "oracle", "models": {name: {column: values or text}}}}."""
    by_setting = collections.defaultdict(list)
    for run in runs:
        by_setting[run.setting].append(run)
    out = {}
    for setting, group in sorted(by_setting.items(), key=lambda kv: natural_key(kv[0])):
        group = sorted(group, key=lambda r: r.seed)
        seeds = [r.seed for r in group]
        if len(set(seeds)) != len(seeds):
            raise ConfigError(
                f"setting {setting!r} has seed(s) filed twice: "
                + ", ".join(r.source for r in group)
                + ". Fix: remove one (each seed counts once)"
            )
        oracles = [r.oracle_auc for r in group if r.oracle_auc is not None]
        # Every model of any seed, in first-seen order; each over the seeds that have it.
        names = list(dict.fromkeys(m for r in group for m in r.models))
        models = {}
        for name in names:
            having = [r for r in group if name in r.models]
            rows = [r.models[name] for r in having]
            train = [row.get("train", {}) for row in rows]
            entry = {
                "auc": [row["auc"] for row in rows],
                "logloss": [row["logloss"] for row in rows],
                "ne": [row["ne"] for row in rows],
                "examples_per_s": [t.get("examples_per_s") for t in train],
                "requests_per_s": [row.get("requests_per_s") for row in rows],
                "epochs": [t.get("epochs") for t in train],
            }
            if oracles:
                entry["normalized_auc"] = [
                    (row["auc"] - 0.5) / (r.oracle_auc - 0.5)
                    for row, r in zip(rows, having, strict=True)
                ]
            tests = [(r.paired or {}).get("models", {}).get(name) for r in having]
            if name != REFERENCE and all(tests):
                entry["diff"] = [t["diff"] for t in tests]
                entry["p_max"] = max(t["p_value"] for t in tests)
                # The smallest p a bootstrap can give: no resample on the far side of 0.
                entry["p_floor"] = max(1.0 / t.get("num_samples", 1000) for t in tests)
            models[name] = entry
        out[setting] = {
            "seeds": seeds,
            "ablation": all(is_ablation_point(r) for r in group),
            "oracle": mean_std(oracles)[0] if oracles else None,
            "models": models,
            "commits": sorted({c for r in group for c in r.commit.split(",")}),
            "wall_s": [r.wall_s for r in group],
            "commands": {r.seed: rerun_command(r.command) for r in group if r.command},
        }
    return out


# -- writing ----------------------------------------------------------------------------------
def p_text(m: dict) -> str:
    """The largest p of any seed; at the bootstrap's floor, "≤ floor"."""
    if m["p_max"] <= m["p_floor"]:
        return f"≤ {m['p_floor']:.3g}"
    return f"{m['p_max']:.3f}"


def setting_table(summary: dict) -> str:
    normalized = summary["oracle"] is not None
    head = ["model", "seeds", "AUC"] + (["normalized AUC"] if normalized else [])
    head += ["log loss", "NE", f"Δ AUC of {REFERENCE} (largest p)", "train ex/s", "score req/s"]
    head += ["epochs"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, m in summary["models"].items():
        row = [name, str(len(m["auc"])), cell(m["auc"])]
        row += [cell(m["normalized_auc"], 3)] if normalized else []
        row += [cell(m["logloss"]), cell(m["ne"])]
        if "diff" in m:
            row.append(f"{cell(m['diff'])} ({p_text(m)})")
        else:
            row.append("(reference)" if name == REFERENCE else "")
        row += [rate(m["examples_per_s"]), rate(m["requests_per_s"]), cell(m["epochs"], 1)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def best_other(models: dict) -> str | None:
    """The best model that is not VISTA: what a reader would use instead."""
    others = [n for n in models if not n.startswith("vista")]
    return max(others, key=lambda n: mean_std(models[n]["auc"])[0]) if others else None


def headline(summaries: dict) -> str:
    """One row per setting that is not an ablation point (those have their own table)."""
    head = ["setting", "seeds", f"{REFERENCE} AUC", "best other model", "its AUC"]
    head += ["Δ AUC (largest p)", "oracle AUC"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for setting, s in summaries.items():
        ref, other = s["models"].get(REFERENCE), best_other(s["models"])
        if s["ablation"] or ref is None or other is None:
            continue
        o = s["models"][other]
        diff = f"{cell(o['diff'])} ({p_text(o)})" if "diff" in o else "(no paired test)"
        oracle = f"{s['oracle']:.4f}" if s["oracle"] is not None else ""
        seeds = len(ref["auc"]), len(o["auc"])  # Each model over the seeds it has.
        seeds = str(seeds[0]) if seeds[0] == seeds[1] else f"{seeds[0]} vs {seeds[1]}"
        lines.append(
            f"| {setting} | {seeds} | {cell(ref['auc'])} | {other} | "
            f"{cell(o['auc'])} | {diff} | {oracle} |"
        )
    return "\n".join(lines)


def ablations(root: pathlib.Path, runs: list[Run]) -> str:
    """One row per published sweep value and VISTA model: its AUC and the default's on the same
    seeds, and Δ AUC = AUC(default) − AUC(value), paired over users seed by seed. `runs` are
    what `collect` read (the sweep's points among them)."""
    by_source = {r.source: r for r in runs}
    head = ["sweep", "value", "against", "model", "seeds", "AUC of the default", "AUC"]
    head += ["Δ AUC, default − value (largest p)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for path in sorted(root.glob(SWEEP_PAIRED)):
        paired = json.loads(path.read_text())
        experiment = path.parents[2].name  # experiments/<experiment>/results/sweep_*/
        points = {p.stem: by_source[str(p)] for p in path.parent.glob("points/*.json")}
        by_value = collections.defaultdict(list)
        for name, entry in paired["points"].items():
            by_value[str(entry["x"])].append((points[entry["against"]], points[name], entry))
        for pairs in sorted(by_value.values(), key=lambda p: natural_key(str(p[0][2]["x"]))):
            for model in ABLATION_MODELS:
                have = [(d, v, e) for d, v, e in pairs if model in e["models"]]
                if not have:
                    continue
                tests = [e["models"][model] for _, _, e in have]
                m = {"p_max": max(t["p_value"] for t in tests),
                     "p_floor": max(1.0 / t["num_samples"] for t in tests)}  # fmt: skip
                default, value = have[0][0], have[0][1]
                row = [f"{experiment} {path.parent.name.removeprefix('sweep_')}",
                       _swept(value), _swept(default), model, str(len(have)),
                       cell([d.models[model]["auc"] for d, _, _ in have]),
                       cell([v.models[model]["auc"] for _, v, _ in have]),
                       f"{cell([t['diff'] for t in tests])} ({p_text(m)})"]  # fmt: skip
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _swept(run: Run) -> str:
    """`key=value` of a sweep point's run (its setting is '<experiment> sweep: key=value')."""
    return run.setting.split(" sweep: ", 1)[1]


def slug(setting: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", setting).strip("_")


def plot(setting: str, summary: dict, path: pathlib.Path) -> None:
    import matplotlib  # noqa: PLC0415 - only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = list(summary["models"])
    stats = [mean_std(summary["models"][n]["auc"]) for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.4))
    colors = ["tab:blue" if n.startswith("vista") else "tab:gray" for n in names]
    ax.barh(names, [m for m, _ in stats], xerr=[s for _, s in stats], color=colors)
    if summary["oracle"] is not None:
        ax.axvline(summary["oracle"], color="tab:green", ls="--", label="oracle")
        ax.legend(loc="lower right")
    low = min(m - s for m, s in stats)
    high = max([m + s for m, s in stats] + [summary["oracle"] or 0.0])
    ax.set_xlim(max(0.0, low - 0.02), min(1.0, high + 0.02))
    ax.invert_yaxis()
    ax.set_xlabel(f"test AUC (mean ± std over seeds {summary['seeds']})")
    ax.set_title(setting)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(summaries: dict, ablation_table: str = "") -> str:
    lines = [
        "# Long-history ranking results",
        "",
        "Generated by `python -m experiments.report` from the runs' JSON results (filed under",
        "`runs/<setting>/` or published by a sweep); nothing here is typed by hand. Test split;",
        "mean ± std over seeds. Δ AUC is AUC(vista_downstream) − AUC(model), the paired",
        "bootstrap over users of each run (1,000 resamples), averaged over seeds; the p in",
        "brackets is the largest of any seed. Costs: training examples/s and scoring",
        "requests/s on the machine that ran it (a shared 2-core CPU unless noted).",
        "",
        "## Headline: VISTA against the best model that is not VISTA",
        "",
        "Every setting but the points of an ablation sweep, which the ablations table below",
        "compares with their default.",
        "",
        headline(summaries),
    ]
    if ablation_table:
        lines += [
            "",
            "## Ablations: each sweep value against the default, paired",
            "",
            "Each row: a published sweep's value against the sweep's first value (the",
            "default) at the same seeds, on the same candidates; Δ AUC is the paired bootstrap",
            "over users of each seed, averaged over seeds, with the largest p of any seed.",
            "",
            ablation_table,
        ]
    for setting, s in summaries.items():
        lines += [
            "",
            f"## {setting}",
            "",
            f"Seeds {s['seeds']}; wall time per seed (min): "
            + ", ".join(f"{w / 60:.1f}" for w in s["wall_s"])
            + "; code: "
            + ", ".join(f"`{c[:12]}`" for c in s["commits"])
            + (f"; oracle AUC {s['oracle']:.4f}" if s["oracle"] is not None else ""),
            "",
            setting_table(s),
            "",
            f"![{setting}]({slug(setting)}.png)",
        ]
        commands = {seed: c for seed, c in s["commands"].items() if c}
        if commands:
            seed, command = min(commands.items())
            lines += [
                "",
                f"Rerun seed {seed} (another seed: its `--config.seed`), then file it with",
                f"`python -m experiments.report --add=WORKDIR --setting={setting}`:",
                "",
                "```",
                command,
                "```",
            ]
    return "\n".join(lines) + "\n"


def write_readme(readme: pathlib.Path, table: str) -> bool:
    """Replaces the text between the markers; False when the README has none."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return False
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + "\n" + table + "\n" + text[stop:])
    return True


def report(results_dir: pathlib.Path, root: pathlib.Path, readme: pathlib.Path | None) -> str:
    runs = collect(results_dir, root)
    summaries = summarize(runs)
    results_dir.mkdir(parents=True, exist_ok=True)
    plots = {results_dir / f"{slug(setting)}.png" for setting in summaries}
    for stale in set(results_dir.glob("*.png")) - plots:  # A setting that has no runs now.
        stale.unlink()
    for setting, s in summaries.items():
        plot(setting, s, results_dir / f"{slug(setting)}.png")
    text = markdown(summaries, ablations(root, runs))
    (results_dir / "RESULTS.md").write_text(text)
    if readme is not None:
        write_readme(readme, headline(summaries))
    return text


def define_flags() -> None:
    """The command line, defined only when run as a program (importing defines no flag)."""
    flags.DEFINE_string("results_dir", "experiments/results", "Where RESULTS.md goes.")
    flags.DEFINE_string("readme", "README.md", "Gets the headline table ('' = none).")
    flags.DEFINE_string("add", "", "A run.py workdir whose results.json to file first.")
    flags.DEFINE_string("setting", "", "With --add: the setting it belongs to.")
    flags.DEFINE_bool("replace", False, "With --add: replace that seed's filed run.")


def main(argv):
    del argv
    f = flags.FLAGS
    results_dir = pathlib.Path(f.results_dir)
    readme = pathlib.Path(f.readme) if f.readme else None
    try:
        if f.add:
            filed = add(pathlib.Path(f.add), f.setting, results_dir, f.replace)
            print(f"filed {filed}")
        print(report(results_dir, pathlib.Path("."), readme))
    except ConfigError as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    define_flags()
    app.run(main)

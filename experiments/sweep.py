r"""Scaling-curve sweeps: one pipeline run per grid point, resumable, then a table and a plot.

  python -m experiments.sweep --config=experiments/synthetic/config.py --sweep=history_len \
      --workdir=/tmp/sweep_history_len [--only=POINT,...] [--publish_dir=DIR]

The experiment's config file defines its grids beside `get_config`: `get_sweep(NAME)` returns
one override dict per point (`experiments.common.sweep_points`). The first key of a point is
the swept value (the x axis); `seed` is the model seed (error bars are mean ± std over seeds).
Every point is validated through the typed config before anything runs.

--workdir holds:
  data/                  built datasets, shared by the points whose data is the same
  runs/<point>/          the pipeline workdir of each point (checkpoints, cache, results.json)
  points/<point>.json    a finished point: its overrides, metrics, FLOPs and wall times
  sweep.csv, sweep.png   every finished point, rewritten at the end of each invocation
  paired.json            each point against the grid's first value at the same seed (the
                         default, for an ablation): per model, Δ AUC = AUC(first) − AUC(point)
                         with a paired bootstrap over users, where both were scored on the
                         same candidates (their runs' predictions.npz); rewritten likewise

--publish_dir copies points/, sweep.csv, sweep.png and paired.json (not the runs) to a results
directory that is committed (experiments/<name>/results/sweep_<NAME>/).

Resume: a point with `points/<point>.json` is skipped. Any other point resumes at the first
stage its `stages.json` does not record as finished, and training stages resume from their
checkpoints, so a `kill -9` loses at most the work since the last checkpoint. To add seeds
to a published sweep on another machine, copy its `points/` and `paired.json` into a new
workdir and run the grid with more seeds (`:seeds=N`): its finished points are skipped and
their pairs kept, the new seeds run and are paired.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import pathlib
import re
import shutil
import sys
import time

import numpy as np
from absl import app, flags, logging

from vista_jax import costs, evaluation, metrics, pipeline
from vista_jax.config import ExperimentConfig, from_config_dict
from vista_jax.errors import ConfigError, UserError, WorkdirError
from vista_jax.fingerprints import git_commit

STAGE_ORDER = tuple(pipeline.STAGES)  # The pipeline's stages, in order.
USER_ERROR_EXIT = 2


@dataclasses.dataclass(frozen=True)
class Point:
    name: str  # e.g. "history_len=1000-seed=0": the run directory and the points/ file
    x_key: str  # the swept config key (the first key of the overrides)
    x: object
    seed: int
    overrides: dict


def _log(msg: str):
    print(f"[sweep {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the grid ---------------------------------------------------------------------------------
def load_experiment(config_arg: str):
    """`path[:variant]` -> (the config module, the variant)."""
    path, _, variant = config_arg.partition(":")
    if not pathlib.Path(path).is_file():
        raise ConfigError(f"--config {path}: no such file. Fix: pass an experiments/*/config.py")
    spec = importlib.util.spec_from_file_location(f"_sweep_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(
            f"--config {path} defines no get_sweep(name). Fix: use a config that defines "
            "sweeps (experiments/synthetic/config.py) or add one beside get_config"
        )
    return module, variant or None


def point_name(x_key: str, x, seed: int) -> str:
    name = f"{x_key.rsplit('.', 1)[-1]}={x}-seed={seed}"
    return re.sub(r"[^A-Za-z0-9._=-]", "_", name)


def grid(module, sweep_arg: str) -> list[Point]:
    """The points of `module.get_sweep(sweep_arg)`, each with a unique name."""
    points = []
    for overrides in module.get_sweep(sweep_arg):
        if "seed" not in overrides or len(overrides) < 2:
            raise ConfigError(
                f"sweep '{sweep_arg}': each point needs its swept key first and a 'seed', got "
                f"{overrides}. Fix: build the grid with experiments.common.sweep_points"
            )
        x_key = next(iter(overrides))
        x, seed = overrides[x_key], int(overrides["seed"])
        points.append(Point(point_name(x_key, x, seed), x_key, x, seed, dict(overrides)))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep '{sweep_arg}' repeats a point: {names}. Fix: dedupe its values")
    return points


def apply_overrides(config, overrides: dict):
    """A copy of the ConfigDict with dotted `overrides` set (validated later, when typed)."""
    config = config.copy_and_resolve_references()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for i, part in enumerate(parents):
            if part not in node:
                raise ConfigError(
                    f"sweep override '{key}': the config has no section "
                    f"'{'.'.join(parents[: i + 1])}'. Fix: correct the key in get_sweep"
                )
            node = node[part]
        node[leaf] = value
    return config


def point_config(base, point: Point, workdir) -> ExperimentConfig:
    """The typed config of one point; its datasets go to the sweep's shared data/."""
    config = apply_overrides(base, point.overrides)
    if not config.data.get("data_dir"):
        config.data.data_dir = str(pathlib.Path(workdir).absolute() / "data")
    try:
        return from_config_dict(config)
    except ConfigError as e:
        raise ConfigError(f"sweep point {point.name}: {e}") from None


# -- one point --------------------------------------------------------------------------------
def finished_stages(run_dir: pathlib.Path) -> list[str]:
    path = run_dir / pipeline.STAGES_FILE
    return list(evaluation.read_json(path)) if path.exists() else []


def remaining_stages(run_dir: pathlib.Path) -> list[str]:
    """The stages after the longest finished prefix of STAGE_ORDER (all of them if none)."""
    done = set(finished_stages(run_dir))
    n = 0
    while n < len(STAGE_ORDER) and STAGE_ORDER[n] in done:
        n += 1
    return list(STAGE_ORDER[n:]) or ["evaluate"]  # A finished run without its record: score.


def _check_same_point(path: pathlib.Path, point: Point) -> None:
    """A run or record left by another grid under the same name is refused, never mixed in."""
    if path.exists():
        stored = evaluation.read_json(path).get("overrides")
        if stored != _jsonable(point.overrides):
            raise WorkdirError(
                f"{path} was written for overrides {stored}, not {point.overrides}. "
                "Fix: use a new --workdir for a changed grid (or delete that point)"
            )


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=float))


def run_point(point: Point, config: ExperimentConfig, workdir, run_stage=None) -> dict:
    """Runs (or resumes) one point and publishes `points/<name>.json`; returns its record.

    `run_stage(config, run_dir, mode)` is `pipeline.train_and_evaluate` (tests pass a fake).
    """
    run_stage = run_stage or pipeline.train_and_evaluate
    workdir = pathlib.Path(workdir)
    record_path = workdir / "points" / f"{point.name}.json"
    _check_same_point(record_path, point)
    if record_path.exists():
        _log(f"{point.name}: finished earlier, skipped")
        return evaluation.read_json(record_path)
    run_dir = workdir / "runs" / point.name
    _check_same_point(run_dir / "point.json", point)
    run_dir.mkdir(parents=True, exist_ok=True)
    evaluation.write_json(run_dir / "point.json", {"overrides": point.overrides})
    todo = remaining_stages(run_dir)
    _log(f"{point.name}: running {', '.join(todo)}")
    t0 = time.monotonic()
    modes = ["all"] if len(todo) == len(STAGE_ORDER) else todo  # "all" loads the data once
    for mode in modes:
        run_stage(config, run_dir, mode)
    results = evaluation.read_json(run_dir / "results.json")
    record = point_record(point, config, results, run_dir, time.monotonic() - t0)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    evaluation.write_json(record_path, record)  # Last: its existence means "finished".
    return record


def point_record(point: Point, config: ExperimentConfig, results: dict, run_dir, wall_s):
    stages = evaluation.read_json(run_dir / pipeline.STAGES_FILE)
    return {
        "name": point.name,
        "x_key": point.x_key,
        "x": point.x,
        "seed": point.seed,
        "overrides": point.overrides,
        "models": results["models"],
        "oracle_auc": results.get("oracle_auc"),
        "reference_aucs": results.get("reference_aucs", {}),
        "paired": results.get("paired"),
        "flops_per_request": flops_per_request(config),
        "train_flops": train_flops(config),
        "stage_wall_s": {k: v["wall_s"] for k, v in stages.items()},
        "wall_s_this_invocation": round(wall_s, 1),
        "git_commit": git_commit(),
    }


def _cost_configs(config: ExperimentConfig):
    scfg = config.summarizer
    rcfg = dataclasses.replace(
        config.ranker, num_recent=config.data.num_recent, summary_dim=scfg.d_model
    )
    return scfg, rcfg


def _num_candidates(config: ExperimentConfig) -> int:
    syn = config.data.synthetic
    return syn.num_candidates if syn is not None else 1  # An event log: one item per request.


def flops_per_request(config: ExperimentConfig) -> dict[str, float]:
    scfg, rcfg = _cost_configs(config)
    return costs.per_request(scfg, rcfg, config.data.history_window, _num_candidates(config))


def train_flops(config: ExperimentConfig) -> dict[str, float]:
    scfg, rcfg = _cost_configs(config)
    src = config.source.num_steps * config.source.batch_size
    down = config.downstream.num_steps * config.downstream.batch_size
    return costs.training(
        scfg, rcfg, config.data.history_window, _num_candidates(config), src, down
    )


# -- table and plot ---------------------------------------------------------------------------
def read_points(workdir) -> list[dict]:
    return [
        evaluation.read_json(p) for p in sorted((pathlib.Path(workdir) / "points").glob("*.json"))
    ]


def table_rows(records: list[dict]) -> list[dict]:
    """One row per (point, model), models with a cost but no metrics included (cost only)."""
    rows = []
    for rec in records:
        models = list(rec["models"]) + [
            m for m in (*rec["flops_per_request"], *rec["train_flops"]) if m not in rec["models"]
        ]
        for model in dict.fromkeys(models):
            row = {"point": rec["name"], "x_key": rec["x_key"], "x": rec["x"],
                   "seed": rec["seed"], "model": model}  # fmt: skip
            for metric, value in rec["models"].get(model, {}).items():
                row[metric] = value
            row["flops_per_request"] = rec["flops_per_request"].get(model)
            row["train_flops"] = rec["train_flops"].get(model)
            row["oracle_auc"] = rec.get("oracle_auc")
            row["history_count_auc"] = rec.get("reference_aucs", {}).get("history_count_auc")
            row["point_wall_s"] = sum(rec["stage_wall_s"].values())
            rows.append(row)
    return rows


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _numeric(xs) -> bool:
    return all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)


def series(rows: list[dict], column: str) -> dict[str, tuple[list, list, list]]:
    """{model: (xs, mean, std)} of `column` over seeds, for rows where it is present."""
    by_model: dict[str, dict] = {}
    for row in rows:
        value = row.get(column)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        by_model.setdefault(row["model"], {}).setdefault(row["x"], []).append(float(value))
    out = {}
    for model, by_x in by_model.items():
        xs = sorted(by_x) if _numeric(by_x) else list(by_x)  # Categories: in grid order.
        out[model] = (
            xs,
            [float(np.mean(by_x[x])) for x in xs],
            [float(np.std(by_x[x])) for x in xs],
        )
    return out


def plot(rows: list[dict], path: pathlib.Path, metric: str, title: str) -> None:
    """Metric, FLOPs per request and training FLOPs against the swept value."""
    import matplotlib  # noqa: PLC0415 - only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    x_key = rows[0]["x_key"]
    xs = list(dict.fromkeys(row["x"] for row in rows))  # Categorical x (e.g. "qla"): as is.
    log_x = _numeric(xs) and len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 10
    models = list(dict.fromkeys(row["model"] for row in rows))
    color = {model: f"C{i % 10}" for i, model in enumerate(models)}  # One color per model.
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = ((metric, f"{metric} (mean ± std over seeds)", False),
              ("flops_per_request", "FLOPs per request", True),
              ("train_flops", "training FLOPs", True))  # fmt: skip
    for ax, (column, label, log_y) in zip(axes, panels, strict=True):
        for model, (x, mean, std) in series(rows, column).items():
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=model, color=color[model])
        if column == "auc":
            oracle = series([dict(r, model="oracle") for r in rows], "oracle_auc")
            for x, mean, _ in oracle.values():
                ax.plot(x, mean, "k--", label="oracle")
            counts = series([dict(r, model="history counts") for r in rows], "history_count_auc")
            for x, mean, _ in counts.values():  # Reachable from per-topic history counts.
                ax.plot(x, mean, "k:", label="history-count predictor")
        ax.set(xlabel=x_key, ylabel=label, xscale="log" if log_x else "linear")
        if log_y:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_outputs(workdir, metric: str, title: str) -> dict:
    workdir = pathlib.Path(workdir)
    rows = table_rows(read_points(workdir))
    if not rows:
        return {}
    write_csv(rows, workdir / "sweep.csv")
    plot(rows, workdir / "sweep.png", metric, title)
    return {"csv": str(workdir / "sweep.csv"), "png": str(workdir / "sweep.png"), "rows": len(rows)}


# -- paired tests against the first value -----------------------------------------------------
PAIRED_FILE = "paired.json"


def paired_against_first(points: list[Point], workdir, num_samples: int) -> dict:
    """Every finished point against the grid's first value at the same seed, model by model.

    For an ablation the first value is the default, so Δ AUC = AUC(default) − AUC(point) is
    what the change costs (positive: the default is better). A pair is tested only when both
    runs scored the same candidates (a history-length grid changes the data: not paired). A
    pair already in the workdir's paired.json, from the same two prediction files and number
    of resamples, is kept as it is (a sweep re-tests only what changed); so is one whose two
    runs are both gone from the workdir while their records stay (a published sweep copied into
    a new workdir to add seeds: its runs, never published, cannot be re-tested).
    """
    workdir = pathlib.Path(workdir)
    first_x = points[0].x
    reference = {p.seed: p for p in points if p.x == first_x}
    out = {"reference": f"{points[0].x_key}={first_x} at the same seed", "unit": "user",
           "points": {}, "not_paired": {}}  # fmt: skip
    previous = workdir / PAIRED_FILE
    tested = evaluation.read_json(previous)["points"] if previous.exists() else {}

    def done(point) -> bool:
        return (workdir / "points" / f"{point.name}.json").exists()

    sha256 = functools.cache(_sha256)  # A reference's predictions are hashed once.

    for point in points:
        ref = reference.get(point.seed)
        if ref is None or point.x == first_x or not (done(ref) and done(point)):
            continue
        files = [workdir / "runs" / p.name / pipeline.PREDICTIONS_FILE for p in (ref, point)]
        missing = [str(f.parent) for f in files if not f.exists()]
        kept = tested.get(point.name, {})
        if len(missing) == 2 and _same_test(kept, point, ref, num_samples):
            out["points"][point.name] = kept  # Published earlier; its runs are not here.
            continue
        if missing:
            out["not_paired"][point.name] = (
                f"no {pipeline.PREDICTIONS_FILE} in {missing} (evaluated before they were "
                "saved). Fix: delete the point's record and the evaluate entry of its "
                "stages.json, and rerun the sweep (it re-scores, nothing retrains)"
            )
            continue
        entry = {"x": point.x, "seed": point.seed, "against": ref.name,
                 "files_sha256": [sha256(f) for f in files]}  # fmt: skip
        if kept.get("files_sha256") == entry["files_sha256"] and _same_test(
            kept, point, ref, num_samples
        ):
            out["points"][point.name] = kept
            continue
        a, b = map(evaluation.read_predictions, files)
        if not evaluation.same_candidates(a, b):
            out["not_paired"][point.name] = f"scored other candidates than {ref.name}"
            continue
        pairs = {m: (a.logits[m], b.logits[m]) for m in a.logits if m in b.logits}
        tests = metrics.paired_auc_tests(a.label, pairs, a.user, num_samples)
        out["points"][point.name] = entry | {"models": tests}
    return out


def _same_test(kept: dict, point: Point, ref: Point, num_samples: int) -> bool:
    """`kept` (an entry of an earlier paired.json) tested `point` against `ref`, as many times."""
    which = (kept.get("x"), kept.get("seed"), kept.get("against"))
    return (
        bool(kept)
        and which == (point.x, point.seed, ref.name)
        and all(t["num_samples"] == num_samples for t in kept["models"].values())
    )


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the driver -------------------------------------------------------------------------------
def publish(workdir, publish_dir) -> None:
    """Copies the sweep's results (no checkpoints, caches or data) to `publish_dir`, replacing
    what was there only once the whole copy is written."""
    workdir, target = pathlib.Path(workdir), pathlib.Path(publish_dir)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(workdir / "points", tmp / "points")
    for name in ("sweep.csv", "sweep.png", PAIRED_FILE):
        if (workdir / name).exists():
            shutil.copy2(workdir / name, tmp / name)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def run_sweep(
    config_arg: str, sweep_arg: str, workdir, only=(), metric="auc", run_stage=None, publish_dir=""
):
    """Every point (or those named in `only`) in grid order, then sweep.csv and sweep.png."""
    module, variant = load_experiment(config_arg)
    base = module.get_config(variant)
    points = grid(module, sweep_arg)
    unknown = sorted(set(only) - {p.name for p in points})
    if unknown:
        raise ConfigError(
            f"--only names no point of this sweep: {unknown}; points: "
            f"{', '.join(p.name for p in points)}. Fix: pick from those"
        )
    pipeline.check_workdir(workdir)
    configs = {p.name: point_config(base, p, workdir) for p in points}  # All valid, or none runs.
    for point in points:
        if not only or point.name in only:
            run_point(point, configs[point.name], workdir, run_stage)
    out = write_outputs(workdir, metric, f"{config_arg} --sweep={sweep_arg}")
    samples = configs[points[0].name].eval.bootstrap_samples
    paired = paired_against_first(points, workdir, samples)
    for name, why in paired["not_paired"].items():
        _log(f"{name}: not paired with the first value: {why}")
    if out and paired["points"]:
        evaluation.write_json(pathlib.Path(workdir) / PAIRED_FILE, paired)
        out["paired"] = len(paired["points"])
    if publish_dir and out:
        publish(workdir, publish_dir)
        out["published"] = str(publish_dir)
    _log(f"wrote {out}")
    return out


def define_flags() -> None:
    """The command line, defined only when run as a program (importing defines no flag)."""
    flags.DEFINE_string("config", None, "Experiment config file[:variant].")
    flags.DEFINE_string("sweep", None, "Sweep NAME[:variant] from the config file.")
    flags.DEFINE_string("workdir", None, "Where the sweep reads and writes.")
    flags.DEFINE_list("only", [], "Run only these points (names as in points/).")
    flags.DEFINE_string("metric", "auc", "The metric plotted against the swept value.")
    flags.DEFINE_string(
        "publish_dir", "", "Also copy points/, sweep.csv and sweep.png here (results to commit)."
    )
    flags.DEFINE_bool("verbose", False, "Show tracebacks of user errors too.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
    f = flags.FLAGS
    try:
        for name in ("config", "sweep", "workdir"):
            if not f[name].value:
                raise ConfigError(f"--{name} is required. Fix: pass --{name}=...")
        run_sweep(f.config, f.sweep, f.workdir, f.only, f.metric, publish_dir=f.publish_dir)
    except UserError as e:
        if f.verbose:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)


if __name__ == "__main__":
    define_flags()
    app.run(main)

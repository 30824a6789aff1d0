"""The VISTA pipeline as stages over one workdir.

  train_source     events -> source model (summarizer + ranker head + L_rec) -> source/
  build_cache      frozen summarizer (restored alone) -> int8 SummaryStore    -> cache/
  train_ranker     cache + recent events -> downstream ranker; recent-only    -> downstream/,
                                                                                recent_only/
  train_baselines  raw history -> full target attention, SIM-hard, TWIN       -> <name>/
  evaluate         every model on the held-out requests                       -> results.json,
                                                                                 predictions.npz
  refresh_cache    (only when asked) data.delta_path folded into the cache     -> cache/

Each stage reads only what earlier stages wrote; `train_ranker` never loads the summarizer.
Every trained model runs under the same early-stopping rule (`config.early_stopping`) and
later stages read its validation-selected step (`train.model_dir`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shlex
import sys
import time

import grain
import numpy as np
from flax import nnx

from vista_jax import (
    cache,
    checkpoints,
    distributed,
    evaluation,
    metrics,
    refresh,
    sharding,
    store_group,
)
from vista_jax.config import ExperimentConfig, from_config_dict
from vista_jax.data import datasets, inputs, synthetic
from vista_jax.data import examples as ex
from vista_jax.errors import ConfigError, WorkdirError
from vista_jax.fingerprints import git_commit
from vista_jax.models.ranker import Ranker
from vista_jax.models.sim import SimHardRanker
from vista_jax.models.source import SourceModel, as_model, make_loss_fn
from vista_jax.models.summarizer import Summarizer
from vista_jax.models.target_attention import FullTargetAttentionRanker
from vista_jax.models.twin import TwinRanker
from vista_jax.train import fit, model_dir

MODES = (
    "train_source", "build_cache", "train_ranker", "train_baselines", "evaluate", "all",
    "refresh_cache",
)  # fmt: skip
RANKERS = ("downstream", "recent_only")  # Trained by train_ranker, each in its own dir.
BASELINE_MODELS = {  # Trained by train_baselines, each in the directory of its name.
    "full_attention": FullTargetAttentionRanker,
    "sim_hard": SimHardRanker,
    "twin": TwinRanker,
}
STAGES_FILE = "stages.json"  # Wall time and provenance of every stage run in this workdir.
PREDICTIONS_FILE = "predictions.npz"  # Ranking: every model's test logits (evaluate).


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def _dir(workdir, name: str) -> pathlib.Path:
    return pathlib.Path(workdir).absolute() / name


# -- data and models --------------------------------------------------------------------------
def load_data(config: ExperimentConfig, workdir) -> datasets.SequenceData:
    """The built dataset; in a multi-process run process 0 builds it, the others reuse it."""
    data_dir = config.data.data_dir or pathlib.Path(workdir) / "data"
    return distributed.primary_first(lambda: datasets.build(config.data, data_dir), "load_data")


def mesh_and_rules(config: ExperimentConfig):
    """The configured device mesh (1x1 on one device) and its logical-axis rules."""
    return sharding.make_mesh(config.mesh.shape, config.mesh.axes), config.mesh.rules


def build_source_model(config: ExperimentConfig, data, seed: int) -> SourceModel:
    """`data` needs `num_items` and `num_categories` (a SequenceData or a stand-in)."""
    scfg = config.summarizer_for(data)
    return SourceModel.create(scfg, config.ranker_for(data, scfg.d_model), seed)


def build_ranker(config: ExperimentConfig, data, summary_dim: int, seed: int) -> Ranker:
    return Ranker(config.ranker_for(data, summary_dim), nnx.Rngs(seed))


def build_baseline(config: ExperimentConfig, data, name: str, seed: int):
    """A raw-history baseline; width, heads and MLP from `config.ranker`."""
    b = config.baselines
    cls = BASELINE_MODELS[name]
    return cls(config.ranker_for(data, 0), nnx.Rngs(seed), chunk_size=b.chunk_size, top_k=b.top_k)


def _full(batch):
    return inputs.model_inputs(batch, drop_history=False)


def _no_hist(batch):
    return inputs.model_inputs(batch, drop_history=True)


# -- validation (early stopping) --------------------------------------------------------------
def valid_batches(config: ExperimentConfig, data, live: bool = False) -> list[dict]:
    """Validation requests for early stopping: up to `max_requests`, evenly spaced, batched."""
    items = inputs.eval_examples(data, "valid", live=live)
    n = config.early_stopping.max_requests
    if n and len(items) > n:
        items = [items[i] for i in np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))]
    return list(inputs.batches(items, config.eval.batch_size, pad=True))


def _validator(config: ExperimentConfig, batches_fn, prep):
    """validate(modules) -> validation metrics, or None with early stopping off.

    The batches are built on the first call, so a resumed stage that is already done
    never builds them."""
    if not config.early_stopping.enabled:
        return None
    cached = []

    def validate(modules):
        if not cached:
            cached.append(batches_fn())
        return evaluation.score_ranking(as_model(modules), cached[0], prep)

    return validate


# -- stages -----------------------------------------------------------------------------------
def train_source(config: ExperimentConfig, workdir, data) -> dict:
    model = build_source_model(config, data, config.seed)
    mesh, rules = mesh_and_rules(config)
    es = config.early_stopping
    ds = inputs.train_examples(data, config.seed, hold_out_valid=es.enabled)
    _, report = fit(
        model.modules(),
        make_loss_fn(data.spec.task, config.summarizer.recon_weight),
        iter(inputs.batched(ds, config.source.batch_size, distributed.batch_shard(mesh))),
        config.source,
        _dir(workdir, "source"),
        mesh,
        rules,
        stage="train_source",
        to_device=_full,
        validate=_validator(config, lambda: valid_batches(config, data), _full),
        early_stopping=es,
    )
    return report


def build_cache(config: ExperimentConfig, workdir, data) -> dict:
    """Frozen summarizer over every (user, snapshot) row -> a new published cache version."""
    scfg = config.summarizer_for(data)
    summarizer = Summarizer(scfg, nnx.Rngs(0))
    source_dir = model_dir(_dir(workdir, "source"))  # The validation-selected step.
    step = checkpoints.restore_module(source_dir, "summarizer", summarizer)
    # A multi-process build: each process summarizes its own rows (whole store shards) on
    # its first local device and writes them into one version process 0 names and publishes.
    group = distributed.process_group()
    rows = store_group.row_range(data.num_rows, config.cache.chunk_rows, group.index, group.count)
    version = distributed.broadcast_text(f"v{step:08d}-{int(time.time())}")
    manifest = cache.SummaryStore.write_version(
        cache.cache_root(workdir, config.cache.root),
        version=version,
        summaries=cache.row_blocks(
            data, cache.summarize_fn(summarizer), config.cache.batch_size, rows
        ),
        num_rows=data.num_rows,
        config_hash=cache.cache_hash(scfg, data),
        summarizer_step=step,
        summarizer_checkpoint=str(source_dir),  # best/ when early stopping selected it.
        data_fingerprint=data.fingerprint,
        quantization=config.cache.quantization,
        chunk_rows=config.cache.chunk_rows,
        coverage_info={"kind": "event_position", "rows": "one per (user, snapshot)"},
        group=group,
    )
    _log(f"[build_cache] published {version}: {data.num_rows} rows")
    return manifest


def downstream_batches(
    config: ExperimentConfig, data, store=None, shard: tuple[int, int] = (0, 1)
) -> grain.MapDataset:
    """The training batches of a cache-fed ranker: recent events, candidates, labels and the
    cache row (plus its summary when `store` is given); never the raw long history. With
    early stopping, the validation requests are held out as for every other model. `shard`:
    this process's block of each batch (`inputs.batched`)."""
    hold_out = config.early_stopping.enabled
    ds = inputs.train_examples(data, config.seed + 1, with_history=False, hold_out_valid=hold_out)
    ds = inputs.batched(ds, config.downstream.batch_size, shard)
    return ds.map(cache.with_summaries(store)) if store is not None else ds


def train_ranker(config: ExperimentConfig, workdir, data) -> dict:
    """Downstream ranker from the cache alone, and the recent-only baseline."""
    store = cache.open_cache(workdir, config.summarizer_for(data), data, root=config.cache.root)
    mesh, rules = mesh_and_rules(config)
    shard = distributed.batch_shard(mesh)
    es = config.early_stopping
    with_summaries = cache.with_summaries(store)
    out = {}
    for name in RANKERS:
        dim = store.d if name == "downstream" else 0
        meta = cache.trained_on(store) if dim else {"cache_version": None, "config_hash": None}
        directory = _dir(workdir, name)
        cache.require_version(store, checkpoints.read_meta(directory).get("cache_version"), name)

        def batches_fn(dim=dim):
            raw = valid_batches(config, data)
            return [with_summaries(b) for b in raw] if dim else raw

        _, out[name] = fit(
            {"ranker": build_ranker(config, data, dim, config.seed)},
            make_loss_fn(data.spec.task),
            iter(downstream_batches(config, data, store if dim else None, shard)),
            config.downstream,
            directory,
            mesh,
            rules,
            stage=f"train_{name}",
            to_device=_no_hist,
            meta=meta,
            validate=_validator(config, batches_fn, _no_hist),
            early_stopping=es,
        )
    return out


def train_baselines(config: ExperimentConfig, workdir, data) -> dict:
    """The raw-history baselines (`config.baselines.models`), each read from its own
    point-in-time history (the W events before the request), with the downstream ranker's
    training settings (`config.downstream`) and the same early stopping."""
    mesh, rules = mesh_and_rules(config)
    es = config.early_stopping
    out = {}
    for name in config.baselines.models:
        ds = inputs.train_examples(data, config.seed + 2, live=True, hold_out_valid=es.enabled)
        _, out[name] = fit(
            {"ranker": build_baseline(config, data, name, config.seed)},
            make_loss_fn(data.spec.task),
            iter(inputs.batched(ds, config.downstream.batch_size, distributed.batch_shard(mesh))),
            config.downstream,
            _dir(workdir, name),
            mesh,
            rules,
            stage=f"train_{name}",
            to_device=_full,
            validate=_validator(config, lambda: valid_batches(config, data, live=True), _full),
            early_stopping=es,
        )
    return out


def _restore_ranker(config, workdir, name, data, dim) -> Ranker:
    ranker = build_ranker(config, data, dim, 0)
    checkpoints.restore_module(model_dir(_dir(workdir, name)), "ranker", ranker)
    return ranker


def _restore_baseline(config, workdir, name, data):
    model = build_baseline(config, data, name, 0)
    checkpoints.restore_module(model_dir(_dir(workdir, name)), "ranker", model)
    return model


# Which stage directory trained each evaluated model.
MODEL_DIRS = {
    "vista_source": "source",
    "vista_source_on_cache": "source",
    "vista_downstream": "downstream",
    "recent_only": "recent_only",
}


def training_record(workdir, name: str, batch_size: int, num_train: int) -> dict:
    """How a model was trained (from its checkpoint meta): steps, epochs, the selected step,
    wall time and training examples/s (compile and validation passes excluded)."""
    fit_meta = checkpoints.read_meta(_dir(workdir, MODEL_DIRS.get(name, name))).get("fit", {})
    if not fit_meta:
        return {}
    early = fit_meta.get("early_stopping", {})
    return {
        "steps": fit_meta["steps"],
        "epochs": fit_meta["steps"] * batch_size / max(num_train, 1),
        "selected_step": early.get("best_step", -1) if early.get("history") else fit_meta["steps"],
        "stopped_early": bool(early.get("stopped", False)),
        "valid": early.get("best_metrics", {}),
        "valid_history": early.get("history", []),
        "wall_s": fit_meta["wall_s"],
        "examples_per_s": fit_meta["examples_per_s"],
    }


def evaluate(config: ExperimentConfig, workdir, data) -> dict:
    store = cache.open_cache(workdir, config.summarizer_for(data), data, root=config.cache.root)
    downstream_meta = checkpoints.read_meta(_dir(workdir, "downstream"))
    cache.require_version(store, downstream_meta.get("cache_version"), "vista_downstream")
    ranking = data.spec.task == "ranking"
    items = inputs.eval_examples(data, config.eval.split)
    source = build_source_model(config, data, 0)
    source_dir = model_dir(_dir(workdir, "source"))
    source_step = checkpoints.restore_module(source_dir, "summarizer", source.summarizer)
    checkpoints.restore_module(source_dir, "ranker", source.ranker, step=source_step)
    raw = list(inputs.batches(items, config.eval.batch_size, pad=ranking))
    t0 = time.monotonic()
    cached = [cache.with_summaries(store)(b) for b in raw]  # One store read, two models use it.
    cache_read_s = time.monotonic() - t0
    runs = {
        "vista_source": (source, raw, _full),
        "vista_source_on_cache": (source.ranker, cached, _no_hist),
        "vista_downstream": (_restore_ranker(config, workdir, "downstream", data, store.d),
                             cached, _no_hist),
        "recent_only": (_restore_ranker(config, workdir, "recent_only", data, 0), raw, _no_hist),
    }  # fmt: skip
    if config.baselines.models:
        live_items = inputs.eval_examples(data, config.eval.split, live=True)
        live = list(inputs.batches(live_items, config.eval.batch_size, pad=ranking))
        for name in config.baselines.models:
            runs[name] = (_restore_baseline(config, workdir, name, data), live, _full)
    results = {
        "task": data.spec.task,
        "models": {},
        "split": config.eval.split,
        "num_requests": len(items),
        "dataset": dataset_summary(config, data),
        "cache": {
            "version": store.version,
            "quantization": store.manifest["quantization"],
            "read_requests_per_s": len(items) / cache_read_s if cache_read_s else None,
        },
    }
    num_train = inputs.num_train_requests(data, config.early_stopping.enabled)
    predictions = {}
    for name, (model, batches, prep) in runs.items():
        t0 = time.monotonic()
        if ranking:
            predictions[name] = evaluation.predict_ranking(model, batches, prep)
            scores = evaluation.ranking_scores(predictions[name])
        else:
            scores = evaluation.score(data, model, batches, prep)
        stage = config.source if MODEL_DIRS.get(name) == "source" else config.downstream
        train = training_record(workdir, name, stage.batch_size, num_train)
        results["models"][name] = scores | ({"train": train} if train else {})
        _log(f"[evaluate] {name}: {scores} ({time.monotonic() - t0:.1f}s)")
    if ranking:
        scored = evaluation.shared_candidates(predictions)
        results["paired"] = paired_comparisons(scored, config.eval.bootstrap_samples)
        if distributed.is_primary():  # For paired tests between runs (e.g. a sweep's points).
            evaluation.write_predictions(pathlib.Path(workdir) / PREDICTIONS_FILE, scored)
    if ranking and "cand_prob" in items[0]:
        labels = np.concatenate([e["cand_label"] for e in items])
        probs = np.concatenate([e["cand_prob"] for e in items])
        results["oracle_auc"] = metrics.auc(labels, probs)
    if ranking and data.config.synthetic is not None:  # What the generator says is reachable.
        users = sorted({int(e["user"]) for e in items})
        results["reference_aucs"] = synthetic.auc_report(data.config.synthetic, users)
    return results


PAIRED_REFERENCE = "vista_downstream"  # What every other model is compared with.


def paired_comparisons(scored: evaluation.CandidateLogits, num_samples: int) -> dict:
    """AUC(vista_downstream) - AUC(model) for every other model, bootstrapped over users."""
    others = {n: logit for n, logit in scored.logits.items() if n != PAIRED_REFERENCE}
    out = {"reference": PAIRED_REFERENCE, "unit": "user"}
    out["models"] = metrics.paired_auc_bootstraps(
        scored.label, scored.logits[PAIRED_REFERENCE], others, scored.user, num_samples
    )
    return out


def dataset_summary(config: ExperimentConfig, data) -> dict:
    """What the numbers were measured on: sizes, and for event-log ranking the split."""
    out = {
        "kind": config.data.kind,
        "path": config.data.path,
        "num_users": data.num_users,
        "num_items": data.num_items,
        "num_events": int(data.lengths.sum()),
        "history_window": config.data.history_window,
        "num_recent": config.data.num_recent,
    }
    if data.spec.requests == "every_event":
        counts = {s: int(len(ex.event_requests(data.lengths, data.split_bounds, s)))
                  for s in ex.EVENT_SPLITS}  # fmt: skip
        out |= {"split": config.data.split, "requests": counts,
                "positive_rating": config.data.positive_rating}  # fmt: skip
    return out


# -- the driver -------------------------------------------------------------------------------
STAGES = {
    "train_source": train_source,
    "build_cache": build_cache,
    "train_ranker": train_ranker,
    "train_baselines": train_baselines,
    "evaluate": evaluate,
}
# Run only when asked (not by "all"): fold config.data.delta_path into the cache in place.
MAINTENANCE = {"refresh_cache": refresh.refresh_cache}


def check_workdir(workdir) -> None:
    """Refuse a workdir that cannot be written *before* any work (and create nothing)."""
    path = pathlib.Path(workdir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise WorkdirError(
            f"--workdir {path}: {existing} is a file, not a directory. Fix: pick another path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WorkdirError(
            f"--workdir {path} is not writable ({existing} denies write access). "
            "Fix: pick a writable --workdir"
        )


def provenance(config: ExperimentConfig, workdir) -> dict:
    stages = pathlib.Path(workdir) / STAGES_FILE
    stage_times = evaluation.read_json(stages) if stages.exists() else {}
    return {
        "config": config.to_dict(),
        "seed": config.seed,
        "max_steps": {
            "source": config.source.num_steps,
            "downstream": config.downstream.num_steps,
        },
        "early_stopping": dataclasses.asdict(config.early_stopping),
        "git_commit": git_commit(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "stages": stage_times,
        "wall_s": round(sum(s["wall_s"] for s in stage_times.values()), 1),
    }


def train_and_evaluate(config, workdir, mode: str = "all") -> dict | None:
    """Runs one stage, or all of them in order; returns the evaluation results if evaluated.

    `config` is an `ExperimentConfig` or a ConfigDict (converted at the typed boundary).
    Inputs are validated before anything is created in the workdir.
    """
    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {MODES}, got {mode!r}. Fix: pick one")
    config = from_config_dict(config)
    check_workdir(workdir)
    data = load_data(config, workdir)  # Once: every stage reads the same built dataset.
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    todo = list(STAGES) if mode == "all" else [mode]
    result = None
    for name in todo:
        t0 = time.monotonic()
        _log(f"== {name} ==")
        result = (STAGES | MAINTENANCE)[name](config, workdir, data)
        if distributed.is_primary():  # One writer of the workdir's shared files.
            _record_stage(workdir, name, time.monotonic() - t0)
        _log(f"== {name} done in {time.monotonic() - t0:.1f}s ==")
    if "evaluate" not in todo:
        return None
    result["provenance"] = provenance(config, workdir)
    result = evaluation.json_safe(result)
    if distributed.is_primary():
        evaluation.write_json(pathlib.Path(workdir) / "results.json", result)
        print(evaluation.results_table(result))
    return result


def _record_stage(workdir, name: str, seconds: float) -> None:
    path = pathlib.Path(workdir) / STAGES_FILE
    stages = evaluation.read_json(path) if path.exists() else {}
    stages[name] = {"wall_s": round(seconds, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    evaluation.write_json(path, stages)

"""The VISTA pipeline as stages over one workdir.

  train_source  events -> source model (summarizer + ranker head + L_rec)  -> source/
  build_cache   frozen summarizer (restored alone) -> int8 SummaryStore     -> cache/
  train_ranker  cache + recent events -> downstream ranker; recent-only     -> downstream/,
                                                                             recent_only/
  evaluate      every model on the held-out requests                        -> results.json

Each stage reads only what earlier stages wrote; `train_ranker` never loads the summarizer.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vista_jax import cache, checkpoints, evaluation, metrics, sharding
from vista_jax.config import ExperimentConfig, from_config_dict
from vista_jax.data import datasets, inputs
from vista_jax.errors import ConfigError, WorkdirError
from vista_jax.fingerprints import git_commit
from vista_jax.models.ranker import Ranker
from vista_jax.models.source import SourceModel, make_loss_fn
from vista_jax.models.summarizer import Summarizer
from vista_jax.train import fit

MODES = ("train_source", "build_cache", "train_ranker", "evaluate", "all")
RANKERS = ("downstream", "recent_only")  # Trained by train_ranker, each in its own dir.
STAGES_FILE = "stages.json"  # Wall time and provenance of every stage run in this workdir.


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def _dir(workdir, name: str) -> pathlib.Path:
    return pathlib.Path(workdir).absolute() / name


# -- data and models --------------------------------------------------------------------------
def load_data(config: ExperimentConfig, workdir) -> datasets.SequenceData:
    data_dir = config.data.data_dir or pathlib.Path(workdir) / "data"
    return datasets.build(config.data, data_dir)


def mesh_and_rules(config: ExperimentConfig):
    """The configured device mesh (1x1 on one device) and its logical-axis rules."""
    return sharding.make_mesh(config.mesh.shape, config.mesh.axes), config.mesh.rules


def build_source_model(config: ExperimentConfig, data, seed: int) -> SourceModel:
    """`data` needs `num_items` and `num_categories` (a SequenceData or a stand-in)."""
    scfg = config.summarizer_for(data)
    return SourceModel.create(scfg, config.ranker_for(data, scfg.d_model), seed)


def build_ranker(config: ExperimentConfig, data, summary_dim: int, seed: int) -> Ranker:
    return Ranker(config.ranker_for(data, summary_dim), nnx.Rngs(seed))


# -- stages -----------------------------------------------------------------------------------
def train_source(config: ExperimentConfig, workdir, data) -> dict:
    model = build_source_model(config, data, config.seed)
    mesh, rules = mesh_and_rules(config)
    ds = inputs.train_examples(data, config.seed).batch(config.source.batch_size)
    _, last = fit(
        model.modules(),
        make_loss_fn(data.spec.task, config.summarizer.recon_weight),
        iter(ds),
        config.source,
        _dir(workdir, "source"),
        mesh,
        rules,
        stage="train_source",
        to_device=lambda b: inputs.model_inputs(b, drop_history=False),
    )
    return last


def build_cache(config: ExperimentConfig, workdir, data) -> dict:
    """Frozen summarizer over every (user, snapshot) row -> a new published cache version."""
    scfg = config.summarizer_for(data)
    summarizer = Summarizer(scfg, nnx.Rngs(0))
    step = checkpoints.restore_module(_dir(workdir, "source"), "summarizer", summarizer)
    graphdef, params = nnx.split(summarizer)

    @jax.jit
    def summarize(params, hist):
        valid = jnp.arange(hist["hist_item"].shape[1])[None] < hist["hist_len"][:, None]
        model = nnx.merge(graphdef, params)
        summary, aux = model(
            hist["hist_item"],
            hist["hist_action"],
            hist["hist_gap"],
            valid,
            category=hist["hist_category"],
        )
        return summary, aux["states"]

    version = f"v{step:08d}-{int(time.time())}"
    manifest = cache.SummaryStore.write_version(
        cache.cache_root(workdir),
        version=version,
        summaries=cache.row_blocks(data, lambda h: summarize(params, h), config.cache.batch_size),
        num_rows=data.num_rows,
        config_hash=cache.cache_hash(scfg, data),
        summarizer_step=step,
        summarizer_checkpoint=str(_dir(workdir, "source")),
        data_fingerprint=data.fingerprint,
        quantization=config.cache.quantization,
        chunk_rows=config.cache.chunk_rows,
        coverage_info={"kind": "event_position", "rows": "one per (user, snapshot)"},
    )
    _log(f"[build_cache] published {version}: {data.num_rows} rows")
    return manifest


def downstream_batches(config: ExperimentConfig, data, store=None) -> grain.MapDataset:
    """The training batches of a cache-fed ranker: recent events, candidates, labels and the
    cache row (plus its summary when `store` is given); never the raw long history."""
    ds = inputs.train_examples(data, config.seed + 1, with_history=False)
    ds = ds.batch(config.downstream.batch_size)
    return ds.map(cache.with_summaries(store)) if store is not None else ds


def train_ranker(config: ExperimentConfig, workdir, data) -> dict:
    """Downstream ranker from the cache alone, and the recent-only baseline."""
    store = cache.open_cache(workdir, config.summarizer_for(data), data)
    mesh, rules = mesh_and_rules(config)
    out = {}
    for name in RANKERS:
        dim = store.d if name == "downstream" else 0
        meta = cache.trained_on(store) if dim else {"cache_version": None, "config_hash": None}
        directory = _dir(workdir, name)
        cache.require_version(store, checkpoints.read_meta(directory).get("cache_version"), name)
        _, out[name] = fit(
            {"ranker": build_ranker(config, data, dim, config.seed)},
            make_loss_fn(data.spec.task),
            iter(downstream_batches(config, data, store if dim else None)),
            config.downstream,
            directory,
            mesh,
            rules,
            stage=f"train_{name}",
            to_device=inputs.model_inputs,
            meta=meta,
        )
    return out


def _restore_ranker(config, workdir, name, data, dim) -> Ranker:
    ranker = build_ranker(config, data, dim, 0)
    checkpoints.restore_module(_dir(workdir, name), "ranker", ranker)
    return ranker


def evaluate(config: ExperimentConfig, workdir, data) -> dict:
    store = cache.open_cache(workdir, config.summarizer_for(data), data)
    downstream_meta = checkpoints.read_meta(_dir(workdir, "downstream"))
    cache.require_version(store, downstream_meta.get("cache_version"), "vista_downstream")
    items = inputs.eval_examples(data, config.eval.split)
    source = build_source_model(config, data, 0)
    source_step = checkpoints.restore_module(
        _dir(workdir, "source"), "summarizer", source.summarizer
    )
    checkpoints.restore_module(_dir(workdir, "source"), "ranker", source.ranker, step=source_step)
    raw = list(inputs.batches(items, config.eval.batch_size))
    cached = [cache.with_summaries(store)(b) for b in raw]  # One store read, two models use it.
    full = lambda b: inputs.model_inputs(b, drop_history=False)  # noqa: E731
    no_hist = lambda b: inputs.model_inputs(b, drop_history=True)  # noqa: E731
    runs = {
        "vista_source": (source, raw, full),
        "vista_source_on_cache": (source.ranker, cached, no_hist),
        "vista_downstream": (_restore_ranker(config, workdir, "downstream", data, store.d),
                             cached, no_hist),
        "recent_only": (_restore_ranker(config, workdir, "recent_only", data, 0), raw, no_hist),
    }  # fmt: skip
    results = {
        "models": {},
        "split": config.eval.split,
        "num_requests": len(items),
        "cache": {"version": store.version, "quantization": store.manifest["quantization"]},
    }
    for name, (model, batches, prep) in runs.items():
        t0 = time.monotonic()
        results["models"][name] = evaluation.score(data, model, batches, prep)
        _log(f"[evaluate] {name}: {results['models'][name]} ({time.monotonic() - t0:.1f}s)")
    if data.spec.task == "ranking":
        labels = np.concatenate([e["cand_label"] for e in items])
        probs = np.concatenate([e["cand_prob"] for e in items])
        results["oracle_auc"] = metrics.auc(labels, probs)
    return results


# -- the driver -------------------------------------------------------------------------------
STAGES = {
    "train_source": train_source,
    "build_cache": build_cache,
    "train_ranker": train_ranker,
    "evaluate": evaluate,
}


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
    return {
        "config": config.to_dict(),
        "seed": config.seed,
        "steps": {"source": config.source.num_steps, "downstream": config.downstream.num_steps},
        "git_commit": git_commit(),
        "stages": evaluation.read_json(stages) if stages.exists() else {},
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
        result = STAGES[name](config, workdir, data)
        _record_stage(workdir, name, time.monotonic() - t0)
        _log(f"== {name} done in {time.monotonic() - t0:.1f}s ==")
    if "evaluate" not in todo:
        return None
    result["provenance"] = provenance(config, workdir)
    evaluation.write_json(pathlib.Path(workdir) / "results.json", result)
    print(evaluation.results_table(result))
    return result


def _record_stage(workdir, name: str, seconds: float) -> None:
    path = pathlib.Path(workdir) / STAGES_FILE
    stages = evaluation.read_json(path) if path.exists() else {}
    stages[name] = {"wall_s": round(seconds, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    evaluation.write_json(path, stages)

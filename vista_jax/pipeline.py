"""The VISTA pipeline as stages over one workdir.

  train_source  events -> source model (summarizer + ranker head + L_rec)  -> source/
  build_cache   frozen summarizer (restored alone) -> int8 SummaryStore     -> cache/
  train_ranker  cache + recent events -> downstream ranker; recent-only     -> downstream/,
                                                                             recent_only/
  evaluate      every model on the held-out requests                        -> results.json

Each stage reads only what earlier stages wrote; `train_ranker` never loads the summarizer.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vista_jax import metrics, sharding
from vista_jax.config import config_hash, ranker_config, summarizer_config
from vista_jax.data import datasets
from vista_jax.data import examples as ex
from vista_jax.models import incremental
from vista_jax.models.ranker import Ranker
from vista_jax.models.summarizer import ReconstructionDecoder, Summarizer
from vista_jax.store import SummaryStore, UserBlock
from vista_jax.train import (
    SourceModel,
    fit,
    make_loss_fn,
    predict_batches,
    restore_module,
)

MODES = ("train_source", "build_cache", "train_ranker", "evaluate", "all")


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


# -- data -------------------------------------------------------------------------------------
def load_data(config, workdir) -> datasets.SequenceData:
    data_dir = config.data.get("data_dir") or pathlib.Path(workdir) / "data"
    return datasets.build(config.data, data_dir)


def is_eval_user(user: int, config) -> bool:
    """Ranking task: a fixed 1 in `eval_every` users is held out (never trained on)."""
    return user % config.data.eval_every == 0


def train_examples(data: datasets.SequenceData, config, seed: int) -> grain.MapDataset:
    spec = data.spec
    if spec.task == "ranking":
        users = np.array([u for u in range(data.num_users) if not is_eval_user(u, config)])
        ds = grain.MapDataset.source(users).shuffle(seed=seed).repeat()
        return ds.random_map(
            lambda u, rng: ex.ranking_example(
                data.source[int(u)], spec, int(u), data.item_category, rng
            ),
            seed=seed,
        )
    pairs = ex.retrieval_requests(data.lengths, "train")
    ds = grain.MapDataset.source(pairs).shuffle(seed=seed).repeat()
    return ds.random_map(
        lambda p, rng: ex.retrieval_example(
            data.source[int(p[0])],
            spec,
            int(p[1]),
            int(data.row_offsets[p[0]]),
            data.item_category,
            rng,
        ),
        seed=seed,
    )


def eval_examples(data: datasets.SequenceData, config, split: str = "test") -> list:
    spec = data.spec
    if spec.task == "ranking":
        return [
            ex.ranking_example(data.source[u], spec, u, data.item_category)
            for u in range(data.num_users)
            if is_eval_user(u, config)
        ]
    pairs = ex.retrieval_requests(data.lengths, split)
    users = np.arange(data.num_users)
    if config.data.get("max_eval_users"):
        users = users[: config.data.max_eval_users]
    return [
        ex.retrieval_example(
            data.source[int(u)], spec, int(t), int(data.row_offsets[u]), data.item_category, None
        )
        for u, t in pairs[users]
    ]


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield ex.stack(items[i : i + size])


def mesh_and_rules(config):
    """The configured device mesh, or (None, None) for one device (the CPU default)."""
    if int(np.prod(config.mesh.shape)) <= 1:
        return None, None
    return sharding.make_mesh(config.mesh.shape, config.mesh.axes), config.mesh.rules


def _model_keys(batch: dict, drop_history: bool) -> dict:
    skip = ("hist_",) if drop_history else ()
    return {
        k: v
        for k, v in batch.items()
        if not k.startswith(skip) and k not in ("seen_item", "snapshot")
    }


# -- models -----------------------------------------------------------------------------------
def build_source_model(config, data: datasets.SequenceData, seed: int) -> SourceModel:
    scfg = summarizer_config(config, data.num_items, data.num_categories)
    rcfg = ranker_config(
        config, data.num_items, summary_dim=scfg.d_model, num_categories=data.num_categories
    )
    rngs = nnx.Rngs(seed)
    return SourceModel(
        Summarizer(scfg, rngs), ReconstructionDecoder(scfg, rngs), Ranker(rcfg, rngs)
    )


def cache_hash(config, data: datasets.SequenceData) -> str:
    """Names the summarizer *and* the data the cache rows index."""
    scfg = summarizer_config(config, data.num_items, data.num_categories)
    return config_hash({"summarizer": scfg, "data": data.fingerprint, "spec": data.spec})


def with_summaries(store: SummaryStore):
    """Host-side batch transform: cached summaries for each example's snapshot row."""

    def add(batch):
        read = store.read(batch["row"])
        if np.any(read.present & (read.coverage != batch["snapshot"])):
            raise ValueError(
                "cache rows cover other events than the examples' snapshots: the cache was "
                "built with another snapshot schedule; rebuild it (--mode=build_cache)"
            )
        return batch | {"summary": read.summaries, "summary_mask": read.present}

    return add


# -- stages -----------------------------------------------------------------------------------
def train_source(config, workdir, data: datasets.SequenceData | None = None) -> dict:
    data = data or load_data(config, workdir)
    model = build_source_model(config, data, config.seed)
    mesh, rules = mesh_and_rules(config)
    ds = train_examples(data, config, config.seed).batch(config.source.batch_size)
    loss_fn = make_loss_fn(data.spec.task, config.summarizer.recon_weight)
    model, last = fit(
        stage="train_source",
        model=model,
        loss_fn=loss_fn,
        data=iter(ds),
        cfg=config.source,
        workdir=pathlib.Path(workdir).absolute() / "source",
        items=("summarizer", "decoder", "ranker"),
        mesh=mesh,
        rules=rules,
        to_device=lambda b: _model_keys(b, drop_history=False),
    )
    return last


def build_cache(config, workdir, data: datasets.SequenceData | None = None) -> dict:
    """Frozen summarizer over every (user, snapshot) row -> a new published cache version."""
    data = data or load_data(config, workdir)
    summarizer = Summarizer(
        summarizer_config(config, data.num_items, data.num_categories), nnx.Rngs(0)
    )
    step = restore_module(pathlib.Path(workdir).absolute() / "source", "summarizer", summarizer)
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

    # States extend exactly only if the summary window holds the whole prefix (synthetic);
    # with a sliding window (ML-1M's 200 events) a refresh recomputes the window instead.
    last_snapshot = max(int(data.snapshots(u)[-1]) for u in range(data.num_users))
    keep_states = last_snapshot <= data.spec.history_window

    def rows():
        """(row id, snapshot, last covered time, summarizer input); each record read once."""
        for u in range(data.num_users):
            record = data.source[u]
            gaps = ex.user_gaps(record, data.spec.num_gap_buckets)
            for j, s in enumerate(data.snapshots(u)):
                last_time = record["time"][s - 1] if s else 0
                hist = ex.history_arrays(record, gaps, s, data.spec)
                yield data.row_offsets[u] + j, s, last_time, hist

    def blocks():
        size, t0, done = config.cache.batch_size, time.monotonic(), 0
        it = rows()
        while chunk := list(itertools.islice(it, size)):
            row_ids, coverage, last_time, hists = zip(*chunk, strict=True)
            n = len(chunk)
            hist = {
                k: np.pad(v, [(0, size - n)] + [(0, 0)] * (v.ndim - 1))  # One shape.
                for k, v in ex.stack(hists).items()
            }
            summary, states = summarize(params, hist)
            extras = None
            if keep_states and states is not None:
                # Per-layer QLA states and the last covered event's time beside the summaries,
                # so a refresh folds in only new events (vista_jax.models.incremental).
                extras = {k: v[:n] for k, v in incremental.states_to_arrays(states).items()}
                extras[incremental.LAST_TIME] = np.array(last_time, np.int64)
            done += n
            rate = done / max(time.monotonic() - t0, 1e-9)
            _log(f"[build_cache] rows {done}/{data.num_rows} {rate:.0f} rows/s")
            yield UserBlock(
                np.array(row_ids), np.asarray(summary)[:n], np.array(coverage, np.int64), extras
            )

    version = f"v{step:08d}-{int(time.time())}"
    manifest = SummaryStore.write_version(
        str(pathlib.Path(workdir).absolute() / "cache"),
        version=version,
        summaries=blocks(),
        num_users=data.num_rows,
        config_hash=cache_hash(config, data),
        summarizer_step=step,
        quantization=config.cache.quantization,
        chunk_users=config.cache.chunk_rows,
        coverage_info={"kind": "event_position", "rows": "one per (user, snapshot)"},
    )
    _log(f"[build_cache] published {version}: {data.num_rows} rows")
    return manifest


def open_cache(config, workdir, data) -> SummaryStore:
    return SummaryStore.open(
        str(pathlib.Path(workdir).absolute() / "cache"),
        expected_config_hash=cache_hash(config, data),
    )


def build_ranker(config, data: datasets.SequenceData, summary_dim: int, seed: int) -> Ranker:
    rcfg = ranker_config(
        config, data.num_items, summary_dim=summary_dim, num_categories=data.num_categories
    )
    return Ranker(rcfg, nnx.Rngs(seed))


def train_ranker(config, workdir, data: datasets.SequenceData | None = None) -> dict:
    """Downstream ranker from the cache alone, and the recent-only baseline."""
    data = data or load_data(config, workdir)
    store = open_cache(config, workdir, data)
    loss_fn = make_loss_fn(data.spec.task)
    mesh, rules = mesh_and_rules(config)
    out = {}
    for name, dim in (("downstream", store.d), ("recent_only", 0)):
        ds = train_examples(data, config, config.seed + 1).batch(config.downstream.batch_size)
        if dim:
            ds = ds.map(with_summaries(store))
        _, out[name] = fit(
            stage=f"train_{name}",
            model=build_ranker(config, data, dim, config.seed),
            loss_fn=loss_fn,
            data=iter(ds),
            cfg=config.downstream,
            workdir=pathlib.Path(workdir).absolute() / name,
            items=("ranker",),
            mesh=mesh,
            rules=rules,
            to_device=lambda b: _model_keys(b, drop_history=True),
        )
    return out


# -- evaluation -------------------------------------------------------------------------------
def _restore_ranker(config, workdir, name, data, dim) -> Ranker:
    ranker = build_ranker(config, data, dim, 0)
    restore_module(pathlib.Path(workdir).absolute() / name, "ranker", ranker)
    return ranker


def evaluate(config, workdir, data: datasets.SequenceData | None = None) -> dict:
    data = data or load_data(config, workdir)
    store = open_cache(config, workdir, data)
    split = config.get("eval_split", "test")
    items = eval_examples(data, config, split)
    size = config.eval_batch_size
    source = build_source_model(config, data, 0)
    restore_module(pathlib.Path(workdir).absolute() / "source", "summarizer", source.summarizer)
    restore_module(pathlib.Path(workdir).absolute() / "source", "ranker", source.ranker)
    raw = list(batches(items, size))
    cached = [with_summaries(store)(b) for b in raw]  # One store read, two models use it.
    runs = {
        "vista_source": (source, raw, lambda b: _model_keys(b, False)),
        "vista_source_on_cache": (source.ranker, cached, lambda b: _model_keys(b, True)),
        "vista_downstream": (
            _restore_ranker(config, workdir, "downstream", data, store.d),
            cached,
            lambda b: _model_keys(b, True),
        ),
        "recent_only": (
            _restore_ranker(config, workdir, "recent_only", data, 0),
            raw,
            lambda b: _model_keys(b, True),
        ),
    }
    results = {
        "models": {},
        "split": split,
        "num_requests": len(items),
        "cache": store.manifest["version"],
        "quantization": store.manifest["quantization"],
    }
    for name, (model, inputs, prep) in runs.items():
        t0 = time.monotonic()
        results["models"][name] = score(data, model, inputs, prep)
        _log(f"[evaluate] {name}: {results['models'][name]} ({time.monotonic() - t0:.1f}s)")
    if data.spec.task == "ranking":
        labels = np.concatenate([e["cand_label"] for e in items])
        probs = np.concatenate([e["cand_prob"] for e in items])
        results["oracle_auc"] = metrics.auc(labels, probs)
    # Written whole, then renamed: a reader never sees a half-written results.json.
    path = pathlib.Path(workdir) / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=float))
    tmp.replace(path)
    return results


def score(data, model, batch_iter, prep) -> dict:
    if data.spec.task == "ranking":
        labels, logits, masks = [], [], []
        for batch, out in predict_batches(model, batch_iter, prep):
            labels.append(batch["cand_label"])
            logits.append(out)
            masks.append(batch["cand_mask"])
        return metrics.binary_metrics(
            np.concatenate(labels), np.concatenate(logits), np.concatenate(masks)
        )
    catalog = np.arange(1, data.num_items + 1, dtype=np.int32)

    def with_catalog(b):
        return prep(b) | {"cand_item": np.broadcast_to(catalog, (len(b["user"]), len(catalog)))}

    ranks = []
    for batch, out in predict_batches(model, batch_iter, with_catalog):
        seen = np.zeros(out.shape, bool)
        rows = np.repeat(np.arange(len(out)), batch["seen_item"].shape[1])
        cols = batch["seen_item"].reshape(-1) - 1
        keep = cols >= 0
        seen[rows[keep], cols[keep]] = True
        seen[np.arange(len(out)), batch["target_item"] - 1] = False
        ranks.append(metrics.rank_of_target(out, batch["target_item"] - 1, seen))
    return metrics.ranking_metrics(np.concatenate(ranks), ks=(10, 50, 200))


def results_table(results: dict) -> str:
    rows = []
    for name, m in results["models"].items():
        shown = "  ".join(f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float))
        rows.append(f"{name:<24} {shown}")
    if "oracle_auc" in results:
        rows.append(f"{'oracle':<24} auc={results['oracle_auc']:.4f}")
    return "\n".join(rows)


def train_and_evaluate(config, workdir, mode: str = "all") -> dict | None:
    """Runs one stage, or all of them in order; returns the evaluation results if evaluated."""
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    stages = {
        "train_source": train_source,
        "build_cache": build_cache,
        "train_ranker": train_ranker,
        "evaluate": evaluate,
    }
    todo = list(stages) if mode == "all" else [mode]
    data = load_data(config, workdir)  # Once: every stage reads the same built dataset.
    result = None
    for name in todo:
        t0 = time.monotonic()
        _log(f"== {name} ==")
        result = stages[name](config, workdir, data)
        _log(f"== {name} done in {time.monotonic() - t0:.1f}s ==")
    if "evaluate" in todo:
        print(results_table(result))
        return result
    return None

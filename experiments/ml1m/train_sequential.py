r"""SASRec / HSTU / VISTA on MovieLens: retrieval under the HSTU protocol, or event ranking.

  python -m experiments.ml1m.train_sequential --model=sasrec --epochs=20 --eval_every=1 \
      --seed=0 --out=experiments/ml1m/results/sasrec_seed0.json
  python -m experiments.ml1m.train_sequential --data=ml-100k --model=hstu --epochs=2  # smoke
  python -m experiments.ml1m.train_sequential --task=ranking --model=hstu --epochs=8

`--task=ranking` is the event ranking task of docs/PROTOCOLS.md §2 (every event a request for
its own item, label = rating >= --positive_rating, global time split: the latest 10% of
events test, the 10% before validation) scored at every position of a row in one causal
pass (`vista_jax.sequential_ranking`); AUC, log loss and NE; epochs selected on valid AUC.
Ranking also trains the request-form rankers, each position a request over the events
before it: `full_attention`, `sim_hard`, `twin` (the `--top_k` events of their search) and
`recent_attention` (target attention over the last `--num_recent` events); with
`--prefix_len` they read as far back as the VISTA retriever summarizes. `vista_ranker` is
VISTA's stage 2 on the summaries of a `--model=vista_hstu --export_cache` run
(`--from_cache`, same --prefix_len): each candidate attends to its snapshot's summary tokens
and the last `--num_recent` events; `recent_only` is the same ranker on those events alone.
The retrieval task:

Settings follow meta-recsys/generative-recommenders `configs/ml-1m/*-final.gin` (see
docs/RETRIEVAL_BASELINES.md): d=50, window 200, batch 128, dropout 0.2, sampled softmax with
128 uniform negatives per position, temperature 0.05, Adam(W) lr 1e-3, betas (0.9, 0.98),
weight decay 0. Validation and test are scored against the whole catalog with the history
window excluded (HR@{10,50,200}, NDCG@{10,50,200}, MRR). The reference trains on the
validation item (`--train_on_valid`); by default we hold it out so that the validation-
selected epoch is honest. Progress goes to stderr; the result JSON to --out.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from experiments.ml1m import models
from vista_jax import (
    checkpoints,
    evaluation,
    fingerprints,
    metrics,
    retrieval,
    retrieval_cache,
    sequential_ranking,
    train,
)
from vista_jax.config import RankerConfig
from vista_jax.data import datasets, sequences
from vista_jax.data.features import NUM_ACTIONS
from vista_jax.data.loaders import load_event_log
from vista_jax.models.ranker import Ranker
from vista_jax.models.sequential import build_encoder, preset

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "sasrec", models.MODELS, "Encoder preset, or a ranking-only ranker.")
flags.DEFINE_enum("task", "retrieval", ["retrieval", "ranking"], "What is trained and scored.")
flags.DEFINE_float("positive_rating", 4.0, "Ranking: label = rating >= this.")
flags.DEFINE_enum("data", "ml-1m", ["ml-1m", "ml-100k"], "Dataset.")
flags.DEFINE_string("data_dir", os.environ.get("VISTA_DATA_DIR", ""), "Data root.")
flags.DEFINE_integer("epochs", 10, "Training epochs (one row per user per epoch).")
flags.DEFINE_integer("eval_every", 1, "Evaluate valid and test every K epochs (and at the end).")
flags.DEFINE_float("time_budget_min", 0.0, "Stop after the epoch that passes this (0 = off).")
flags.DEFINE_integer(
    "patience",
    0,
    "Early stopping: stop once this many evaluations in a row bring no gain on the validation "
    "criterion (`vista_jax.train.passes_without_gain`; 0 = run all --epochs).",
)
flags.DEFINE_integer("seed", 0, "Model init, shuffling, dropout and negatives.")
flags.DEFINE_string("out", "", "Result JSON path.")
flags.DEFINE_integer("batch_size", 128, "Users per step.")
flags.DEFINE_integer("window", 200, "History window (max sequence length).")
flags.DEFINE_integer("num_negatives", 128, "Uniform negatives per position.")
flags.DEFINE_float("temperature", 0.05, "Softmax temperature on cosines.")
flags.DEFINE_float("learning_rate", 1e-3, "AdamW learning rate.")
flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay (0 in the ML-1M gin files).")
flags.DEFINE_bool("train_on_valid", False, "Reference setting: train on all but the last event.")
flags.DEFINE_enum("sampling", "per_position", retrieval.NEGATIVE_SAMPLING, "Negatives.")
flags.DEFINE_bool(
    "pack_rows",
    True,
    "Retrieval training of SASRec and HSTU: pack several users' windows into one row "
    "(attention masked to each user's segment; the same loss over the same positions, the "
    "reference's jagged batches) so short histories cost no padding. Other models ignore it.",
)
flags.DEFINE_enum("query_time", "next", ["next", "current"], "HSTU time-bias query time.")
flags.DEFINE_integer("eval_batch_size", 256, "Users per scoring batch.")
flags.DEFINE_integer("num_seeds", 32, "VISTA: summary tokens per snapshot.")
flags.DEFINE_integer("snapshot_every", 40, "VISTA: events per snapshot (divides --window).")
flags.DEFINE_integer(
    "num_recent", 64, "VISTA and recent_attention: raw recent events each position reads."
)
flags.DEFINE_integer("top_k", 64, "sim_hard and twin: history events their search keeps.")
flags.DEFINE_integer("ranker_width", 50, "Request-form rankers: model width (2 heads).")
flags.DEFINE_integer(
    "prefix_len", 0, "VISTA: also summarize up to this many events before the window (0 = off)."
)

flags.DEFINE_string(
    "export_cache", "", "VISTA: after training, write every row's snapshot summaries here."
)
flags.DEFINE_string(
    "from_cache",
    "",
    "VISTA: train a downstream retriever that reads the summaries from this cache (written "
    "by a source run's --export_cache; same data, window, prefix and VISTA flags).",
)
flags.DEFINE_enum(
    "cache_precision", "int8", ["int8", "bf16", "none"],
    "How --export_cache stores the summaries (none = float32 as computed).",
)  # fmt: skip
flags.DEFINE_list(
    "score_caches",
    [],
    "Models that read --from_cache: after training, also score the test split on these "
    "caches' summaries (same rows and shapes, e.g. the source exported at another "
    "--cache_precision), paired against --from_cache (the cache ablation in the result).",
)
flags.DEFINE_list(
    "score_lags",
    [],
    "vista_ranker: after training, also score the test split with --from_cache's summaries "
    "this many events stale (multiples of --snapshot_every; the staleness ablation).",
)
flags.DEFINE_string(
    "resume_dir",
    "",
    "Save the training state here after every evaluation and resume from it when the same "
    "command is run again (so a run longer than one session continues where it stopped).",
)

KS = (10, 50, 200)
RESUMABLE_CHANGES = ("epochs", "time_budget_min", "patience")
SELECTED_PREDICTIONS = "selected_test_predictions.npz"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def evaluate(score_fn, params, split: sequences.Batch, batch_size: int) -> dict[str, float]:
    """Catalog ranks of each request's target, the history window excluded."""
    ranks = []
    for batch, n in sequences.eval_batches(split, batch_size):
        scores = np.asarray(score_fn(params, batch))[:n]
        seen = metrics.seen_mask(batch["item"][:n], scores.shape[1])
        ranks.append(metrics.rank_of_target(scores, batch["target"][:n], seen))
    return metrics.ranking_metrics(np.concatenate(ranks), KS)


def ranking_predictions(logits_fn, params, split: sequences.Batch, batch_size: int) -> dict:
    """Every scored request of the split (`target` > 0): its logit, label, user and event
    index (the request's id), in row order."""
    parts = collections.defaultdict(list)
    for batch, n in sequences.eval_batches(split, batch_size):
        scored = batch["target"][:n] > 0
        rows, positions = np.nonzero(scored)
        parts["logit"].append(np.asarray(logits_fn(params, batch))[:n][scored])
        parts["label"].append(batch["label"][:n][scored].astype(np.uint8))
        parts["user"].append(batch["user"][:n][rows])
        parts["event"].append((batch["start"][:n][rows] + positions + 1).astype(np.int32))
    return {k: np.concatenate(v) for k, v in parts.items()}


def evaluate_ranking(logits_fn, params, split: sequences.Batch, batch_size: int) -> dict:
    """AUC, log loss and NE over the split's scored positions."""
    preds = ranking_predictions(logits_fn, params, split, batch_size)
    return metrics.binary_metrics(preds["label"].astype(np.float32), preds["logit"])


def log_eval(row: dict) -> None:
    v, t = row["valid"], row["test"]
    if "auc" in v:
        log(
            f"  eval epoch {row['epoch']}: valid AUC {v['auc']:.4f} NE {v['ne']:.4f}"
            f" | test AUC {t['auc']:.4f} NE {t['ne']:.4f} ({row['eval_seconds']:.1f}s)"
        )
        return
    log(
        f"  eval epoch {row['epoch']}: valid HR@10 {v['hr@10']:.4f} NDCG@10 {v['ndcg@10']:.4f}"
        f" | test HR@10 {t['hr@10']:.4f} NDCG@10 {t['ndcg@10']:.4f}"
        f" ({row['eval_seconds']:.1f}s)"
    )


class Progress:
    """Resumable training in `resume_dir`: one `vista_jax.checkpoints` step per evaluation.

    Items: the encoder's parameters, the optimizer state, the numpy rng (shuffling) as the
    data state, and the record (epoch, evals, epoch times, wall time) with the run's flags as
    meta. A kill mid-save leaves the previous step readable; a damaged newest step falls back
    to the one before. Resuming under other flags is refused, naming them.
    """

    ITEM = "encoder"

    def __init__(self, directory: str, run_flags: dict):
        self.dir = pathlib.Path(directory).absolute() if directory else None
        self.flags = run_flags
        self._mngr = None

    def _manager(self):
        if self._mngr is None:
            self._mngr = checkpoints.manager(self.dir, (self.ITEM,), keep=2)
        return self._mngr

    def save(self, graphdef, state, rng, record: dict) -> None:
        if self.dir is None:
            return
        mngr = self._manager()
        checkpoints.save(
            mngr, record["epoch"], {self.ITEM: nnx.merge(graphdef, state.params)},
            {"step": state.step, "opt": state.opt_state}, {"rng": rng.bit_generator.state},
            record | {"flags": self.flags},
        )  # fmt: skip
        mngr.wait_until_finished()

    def restore(self, state, rng):
        """(state, record) from the last save, or (state, None) when there is none."""
        if self.dir is None or not self.dir.is_dir() or self._manager().latest_step() is None:
            return state, None
        # The flags are checked first, from the meta alone (every step has the same flags),
        # before any array is read; the record is restored below with the arrays, so both come
        # from the same step even when a damaged newest step falls back to an older one.
        # A flag added since the save compares as its default (the save ran without it).
        meta = checkpoints.read_meta(self.dir)
        saved = {k: meta.get("flags", {}).get(k, FLAGS[k].default) for k in self.flags}
        if saved != self.flags:
            diff = {k: (saved[k], v) for k, v in self.flags.items() if saved[k] != v}
            raise app.UsageError(
                f"{self.dir} holds a run with other flags (saved, now): {diff}. "
                "Fix: rerun with the saved flags or use another --resume_dir"
            )
        opt = {"step": state.step, "opt": state.opt_state}
        targets = {self.ITEM: checkpoints.abstract(state.params)}
        targets[checkpoints.OPT_ITEM] = checkpoints.abstract(opt)
        json_items = (checkpoints.DATA_ITEM, checkpoints.META_ITEM)
        _, restored = checkpoints.restore(self._manager(), targets, json_items=json_items)
        rng.bit_generator.state = restored[checkpoints.DATA_ITEM]["rng"]
        opt = restored[checkpoints.OPT_ITEM]
        state = retrieval.TrainState(opt["step"], restored[self.ITEM], opt["opt"])
        return state, dict(restored[checkpoints.META_ITEM])


def train_and_evaluate() -> tuple[dict, dict | None]:
    """(the result JSON, the selected epoch's test predictions of a ranking run or None)."""
    start = session_start = time.time()
    commit = fingerprints.git_commit()  # The code that runs, not HEAD at the end.
    # ==== data ================================================================================
    models.check_flags(
        FLAGS.model,
        FLAGS.task,
        **{k: getattr(FLAGS, k) for k in models.CHECKED_FLAGS},
    )
    kind = "movielens_1m" if FLAGS.data == "ml-1m" else "recbole_atomic"
    event_log = load_event_log(kind, os.path.join(FLAGS.data_dir, FLAGS.data))
    ranking = FLAGS.task == "ranking"
    can = models.CAPABILITIES[FLAGS.model]
    request_form, uses_ranker = can.family == "request", can.family == "ranker"
    scored = None  # Ranking: the requests of each split (for examples/s beside the AUC).
    if ranking:
        splits = ranking_splits(event_log)
        scored = {
            k: int(np.sum(getattr(splits, k)["target"] > 0)) for k in ("train", "valid", "test")
        }
        log(
            f"{FLAGS.data}: {event_log.num_users} users, {splits.num_items} items; rows "
            f"{ {k: len(getattr(splits, k)['item']) for k in scored} }, scored events {scored}"
        )
    else:
        splits = sequences.from_event_log(
            event_log, FLAGS.window, FLAGS.train_on_valid, FLAGS.prefix_len
        )
        log(
            f"{FLAGS.data}: {event_log.num_users} users, {splits.num_items} items; "
            f"{len(splits.train['item'])} train rows, {len(splits.test['item'])} requests"
        )
    # ==== model and optimizer =================================================================
    vista = dict(
        num_seeds=FLAGS.num_seeds,
        snapshot_every=FLAGS.snapshot_every,
        num_recent=FLAGS.num_recent,
    )
    source = "cached" if FLAGS.from_cache else "live"
    if uses_ranker or request_form:
        # The summaries read from the cache come from a vista_hstu source run: its shapes.
        summary_cfg = preset("vista_hstu", splits.num_items, max_len=FLAGS.window, **vista)
        w = FLAGS.ranker_width
        cfg = RankerConfig(
            num_items=splits.num_items, num_categories=event_log.num_categories, d_model=w,
            num_heads=2, num_layers=1, mlp_hidden=2 * w, num_recent=FLAGS.num_recent,
            summary_dim=summary_cfg.d_model if can.cache == "required" else 0,
        )  # fmt: skip
    else:
        cfg = summary_cfg = preset(
            FLAGS.model, splits.num_items, max_len=FLAGS.window, query_time=FLAGS.query_time,
            summary_source=source, num_actions=NUM_ACTIONS if ranking else 0, **vista,
        )  # fmt: skip
    vista_source = can.cache == "either" and source == "live"
    uncached = splits
    if FLAGS.from_cache:  # The downstream reads summaries, never the events before its window.
        shape = retrieval_cache.summary_shape(summary_cfg)
        splits = retrieval_cache.attach(splits, FLAGS.from_cache, *shape)
        splits = retrieval_cache.without_prefix(splits)
    rngs = nnx.Rngs(FLAGS.seed)
    if uses_ranker:  # (summary_lag 0: the freshest snapshot; the staleness ablation sets it.)
        model = sequential_ranking.PositionSummaryRanker(
            Ranker(cfg, rngs), summary_cfg.snapshot_every
        )
    elif request_form:
        cls, kwargs = models.TARGET_ATTENTION[FLAGS.model]
        ranker = cls(cfg, rngs, chunk_size=4096, **kwargs(FLAGS))
        model = sequential_ranking.PositionTargetRanker(ranker)
    else:
        encoder = build_encoder(cfg, rngs)
        model = sequential_ranking.PositionRanker(encoder, rngs) if ranking else encoder
    tx = retrieval.make_optimizer(FLAGS.learning_rate, weight_decay=FLAGS.weight_decay)
    graphdef, state = retrieval.init_train_state(model, tx)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    # ==== steps: retrieval, one jitted step per packed-position capacity; ranking, one ======
    if ranking:  # Every position of a row is read anyway: nothing to pack, one step.
        ranking_step = jax.jit(sequential_ranking.make_train_step(graphdef, tx), donate_argnums=0)
        step_for = lambda batch: ranking_step  # noqa: E731
    else:
        step_for = retrieval.CapacitySteps(
            graphdef, tx, FLAGS.batch_size * FLAGS.window, num_negatives=FLAGS.num_negatives,
            temperature=FLAGS.temperature, sampling=FLAGS.sampling,
        )  # fmt: skip

    make_score_fn = sequential_ranking.make_logits_fn if ranking else retrieval.make_score_fn
    score_fn = jax.jit(make_score_fn(graphdef))
    evaluate_split = evaluate_ranking if ranking else evaluate
    criterion = "auc" if ranking else "ndcg@10"  # Validation selects the epoch by it.

    def patience_spent(evals) -> bool:
        values = [r["valid"][criterion] for r in evals]
        return train.passes_without_gain(values) >= FLAGS.patience

    int8_score_fn = None
    if vista_source:  # Stage 2 on int8 summaries, as from a cache.
        quantized = nnx.merge(graphdef, state.params)
        (quantized.encoder if ranking else quantized).quantize_summaries = True
        int8_score_fn = jax.jit(make_score_fn(nnx.split(quantized, nnx.Param)[0]))
    key = jax.random.key(FLAGS.seed)
    rng = np.random.default_rng(FLAGS.seed)
    packing = FLAGS.pack_rows and can.packs and not ranking
    # ==== loop ================================================================================
    evals, epoch_seconds, epoch, first = [], [], 0, 1
    # --epochs, --time_budget_min and --patience may change between sessions; nothing else may.
    same = {k: v for k, v in flag_values().items() if k not in RESUMABLE_CHANGES}
    progress = Progress(FLAGS.resume_dir, {"model": FLAGS.model, "seed": FLAGS.seed} | vista | same)
    state, record = progress.restore(state, rng)
    if record is not None:
        evals, epoch_seconds, first = record["evals"], record["epoch_seconds"], record["epoch"] + 1
        start -= record["wall_seconds"]  # Wall time counts every session; the budget, this one.
        log(f"resumed after epoch {record['epoch']} from {FLAGS.resume_dir}")
    # Ranking: the test predictions of the validation-selected epoch so far (for paired
    # tests between models), kept beside the resume steps so a resumed run has them too.
    selected_file = (
        pathlib.Path(FLAGS.resume_dir) / SELECTED_PREDICTIONS if FLAGS.resume_dir else None
    )
    has_file = selected_file is not None and selected_file.is_file()
    selected_preds = dict(np.load(selected_file)) if has_file else None
    epoch, stopped = first - 1, "epochs"
    if FLAGS.patience and patience_spent(evals):  # A resumed run that had stopped stays so.
        log(f"no validation gain in {FLAGS.patience} evaluations before epoch {first}")
        first, stopped = FLAGS.epochs + 1, "patience"
    for epoch in range(first, FLAGS.epochs + 1):
        t0, losses = time.time(), []
        for batch in sequences.train_batches(splits.train, FLAGS.batch_size, rng):
            batch = sequences.pack_rows(batch) if packing else batch
            state, m = step_for(batch)(state, batch, key)
            losses.append(m["loss"])
        train_loss = float(np.mean(jax.device_get(losses)))
        if not np.isfinite(train_loss):
            raise FloatingPointError(f"training loss is {train_loss} at epoch {epoch}")
        epoch_seconds.append(time.time() - t0)
        log(f"epoch {epoch}: loss {train_loss:.4f} ({epoch_seconds[-1]:.1f}s)")
        elapsed = time.time() - session_start
        over_budget = FLAGS.time_budget_min and elapsed > 60 * FLAGS.time_budget_min
        if epoch % FLAGS.eval_every == 0 or epoch == FLAGS.epochs or over_budget:
            t1 = time.time()
            row = {"epoch": epoch, "train_loss": train_loss}
            for split in ("valid", "test"):
                if ranking and split == "test":
                    preds = ranking_predictions(
                        score_fn, state.params, splits.test, FLAGS.eval_batch_size
                    )
                    row["test"] = metrics.binary_metrics(
                        preds["label"].astype(np.float32), preds["logit"]
                    )
                    # A gain on every earlier epoch (the first of tied epochs is the
                    # selected one, as below).
                    valid_aucs = [r["valid"]["auc"] for r in [*evals, row]]
                    if train.passes_without_gain(valid_aucs) == 0:
                        selected_preds = preds | {"epoch": np.int32(epoch)}
                        if selected_file is not None:
                            evaluation.write_npz(selected_file, selected_preds)
                    continue
                row[split] = evaluate_split(
                    score_fn, state.params, getattr(splits, split), FLAGS.eval_batch_size
                )
            if int8_score_fn is not None:
                row["test_int8_summaries"] = evaluate_split(
                    int8_score_fn, state.params, splits.test, FLAGS.eval_batch_size
                )
            row["eval_seconds"] = time.time() - t1
            evals.append(row)
            log_eval(row)
            record = {"epoch": epoch, "evals": evals, "epoch_seconds": epoch_seconds}
            progress.save(graphdef, state, rng, record | {"wall_seconds": time.time() - start})
        if FLAGS.patience and patience_spent(evals):
            log(f"no validation gain in {FLAGS.patience} evaluations: stopped after epoch {epoch}")
            stopped = "patience"
            break
        if over_budget:
            log(f"time budget of {FLAGS.time_budget_min} min reached after epoch {epoch}")
            stopped = "time budget"
            break
    # ==== ablation: the trained model on other or stale summaries (its time is not the run's)
    ablation = None
    if FLAGS.score_caches or FLAGS.score_lags:
        t3 = time.time()
        ablation = cache_ablation(
            score_fn, graphdef, state.params, uncached, splits.test, summary_cfg, epoch
        )
        ablation["seconds"] = time.time() - t3
        start += ablation["seconds"]
    # ==== cache export ========================================================================
    exported = None
    if FLAGS.export_cache:  # (check_flags refused it for any model but a VISTA source.)
        t2 = time.time()
        trained = nnx.merge(graphdef, state.params)
        manifest = retrieval_cache.export(
            trained.encoder if ranking else trained, splits, FLAGS.export_cache,
            version=f"{FLAGS.model}-seed{FLAGS.seed}-epoch{epoch}", step=int(state.step),
            source={"model": FLAGS.model, "epoch": epoch, "commit": commit} | flag_values(),
            quantization=FLAGS.cache_precision,
        )  # fmt: skip
        exported = {"root": FLAGS.export_cache, "version": manifest["version"],
                    "quantization": FLAGS.cache_precision,
                    "seconds": time.time() - t2}  # fmt: skip
        log(f"exported summaries of {manifest['num_rows']} rows as {exported}")
    # ==== summary =============================================================================
    selected = max(evals, key=lambda r: r["valid"][criterion])
    best_test = max(evals, key=lambda r: r["test"][criterion])
    return {
        "task": FLAGS.task,
        "model": FLAGS.model,
        "data": FLAGS.data,
        "seed": FLAGS.seed,
        "config": vista | dataclasses.asdict(cfg) | flag_values(),
        "num_params": int(num_params),
        "epochs_run": epoch,
        "stopped_by": stopped,
        "epoch_seconds": epoch_seconds,
        "evals": evals,
        "validation_selected": {"criterion": f"valid {criterion}"} | selected,
        "last": evals[-1],
        "best_test_oracle": {"note": f"chosen on TEST {criterion}: optimistic, not a result"}
        | best_test,
        "scored_events": scored,
        "wall_seconds": time.time() - start,
        "compiled_capacities": [] if ranking else sorted(step_for.compiled),
        "summary_cache": {"read_from": FLAGS.from_cache or None, "exported": exported},
        "cache_ablation": ablation,
        "git_commit": commit,
        "jax_version": jax.__version__,
        "cpu_count": os.cpu_count(),
    }, selected_preds


def cache_ablation(score_fn, graphdef, params, uncached, test, summary_cfg, epoch: int) -> dict:
    """One trained checkpoint (the last epoch) scored on the test split with other summaries:
    those of each --score_caches version (same rows and shapes: e.g. one source's summaries
    stored int8, bf16 and float32) and those of --from_cache made stale by each --score_lags
    (every position reads the snapshot that many events older). Each is paired against the
    reference (`test`: --from_cache, fresh, as the run scored it with `score_fn`) by a
    bootstrap over users: only the summaries differ. Only test rows of the other caches are
    read (`uncached`: the splits before any cache was attached)."""
    shape = retrieval_cache.summary_shape(summary_cfg)
    tests, scorers = {FLAGS.from_cache: test}, {}  # name -> its test rows, its logits fn
    for root in FLAGS.score_caches:
        if root not in tests:
            cached = retrieval_cache.attach(uncached, root, *shape, only=("test",))
            tests[root] = retrieval_cache.without_prefix(cached).test
    for lag in FLAGS.score_lags:
        stale = nnx.merge(graphdef, params)
        stale.summary_lag = int(lag) // summary_cfg.snapshot_every  # In snapshots.
        tests[f"lag {lag}"] = test
        scorers[f"lag {lag}"] = jax.jit(sequential_ranking.make_logits_fn(nnx.split(stale)[0]))
    preds = {}
    for name, rows in tests.items():
        logits_fn = scorers.get(name, score_fn)  # A cache: the run's own compiled scorer.
        preds[name] = ranking_predictions(logits_fn, params, rows, FLAGS.eval_batch_size)
        log(f"ablation: {name} scored")
    ref, ref_split = preds[FLAGS.from_cache], tests[FLAGS.from_cache]
    for p in preds.values():  # Same requests in the same order: same rows, same batches.
        if not all(np.array_equal(p[k], ref[k]) for k in ("user", "event", "label")):
            raise ValueError("the ablation's test predictions are for different requests")
    label = ref["label"].astype(np.float64)
    variants = [*FLAGS.score_caches, *(f"lag {lag}" for lag in FLAGS.score_lags)]
    others = {name: preds[name]["logit"] for name in variants}
    paired = metrics.paired_auc_bootstraps(label, ref["logit"], others, ref["user"])

    def entry(name, logit):
        return metrics.binary_metrics(label, logit) | (
            {"paired": paired[name]} if name in paired else {}
        )

    def stale_entry(lag):
        inexact = sequential_ranking.stale_inexact(
            ref_split["start"], ref_split["target"] > 0, summary_cfg.snapshot_every,
            lag // summary_cfg.snapshot_every,
        )  # fmt: skip
        return entry(f"lag {lag}", preds[f"lag {lag}"]["logit"]) | {"inexact": inexact}

    caches = {FLAGS.from_cache: entry(FLAGS.from_cache, ref["logit"])}
    caches |= {root: entry(root, preds[root]["logit"]) for root in FLAGS.score_caches}
    return {
        "epoch": epoch,
        "note": "one checkpoint (the last epoch) scored on other summaries of the test "
        "requests; diff = AUC(reference) - AUC(variant), paired bootstrap over users",
        "reference": FLAGS.from_cache,
        "caches": {
            root: {"quantization": retrieval_cache.quantization(root)} | e
            for root, e in caches.items()
        },
        "stale": {str(lag): stale_entry(int(lag)) for lag in FLAGS.score_lags},
    }


def ranking_splits(event_log) -> sequences.SequenceSplits:
    """`sequences.event_ranking` rows under the pipeline's labels and time split."""
    kind = "movielens_1m" if FLAGS.data == "ml-1m" else "recbole_atomic"
    data_cfg = datasets.DataConfig(
        kind=kind, task="ranking", path=os.path.join(FLAGS.data_dir, FLAGS.data),
        history_window=FLAGS.window, num_recent=FLAGS.num_recent,
        positive_rating=FLAGS.positive_rating,
    )  # fmt: skip
    offsets = event_log.user_offsets
    times = np.split(np.asarray(event_log.time, np.int64), offsets[1:-1])
    bounds = datasets.split_bounds(times, data_cfg)
    labels = datasets.event_labels(event_log, data_cfg)
    return sequences.event_ranking(event_log, labels, bounds, FLAGS.window, FLAGS.prefix_len)


def flag_values() -> dict:
    names = (
        "task positive_rating epochs eval_every time_budget_min patience batch_size window "
        "num_negatives temperature learning_rate weight_decay train_on_valid sampling "
        "pack_rows eval_batch_size "
        "prefix_len from_cache top_k ranker_width"
    ).split()
    return {name: getattr(FLAGS, name) for name in names}


def predictions_path(out: str | pathlib.Path) -> pathlib.Path:
    """Where a ranking run's --out JSON keeps its selected epoch's test predictions."""
    out = pathlib.Path(out)
    return out.with_name(out.stem + ".test_predictions.npz")


def main(argv):
    del argv
    result, preds = train_and_evaluate()
    if FLAGS.out:
        path = pathlib.Path(FLAGS.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        if preds is not None:
            evaluation.write_npz(predictions_path(path), preds)
        path.write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {path}")
    s, t = result["validation_selected"], result["last"]
    if result["task"] == "ranking":
        log(
            f"selected epoch {s['epoch']}: test AUC {s['test']['auc']:.4f} NE "
            f"{s['test']['ne']:.4f}; last epoch {t['epoch']}: test AUC {t['test']['auc']:.4f}"
        )
        return
    log(
        f"selected epoch {s['epoch']}: test HR@10 {s['test']['hr@10']:.4f} "
        f"NDCG@10 {s['test']['ndcg@10']:.4f}; last epoch {t['epoch']}: test HR@10 "
        f"{t['test']['hr@10']:.4f} NDCG@10 {t['test']['ndcg@10']:.4f}"
    )


if __name__ == "__main__":
    app.run(main)

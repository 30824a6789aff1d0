r"""Training throughput of the retrieval models (sequences per second), compile excluded.

  python -m experiments.bench.train_throughput [--models=sasrec,hstu,hstu_large,vista_hstu] \
      [--data_dir=$VISTA_DATA_DIR] [--steps=8]

One optimizer step = batch 128 users x window 200, d = 50, 3706 items (ML-1M), sampled
softmax with 128 uniform negatives at every supervised position, dropout on: the reference's
ML-1M training step. Two kinds of batches, each jitted per shape and warmed up on every batch
it times (compiles excluded), then timed with block_until_ready:

* `ml1m` (with --data_dir): `--steps` batches of real ML-1M train rows, the ones
  `train_sequential` trains on, as it does: SASRec/HSTU rows packed several users per row
  (`sequences.pack_rows`, segment-masked attention, as the reference's jagged batches) and
  supervised positions packed for the loss. The headline `sequences_per_second`, comparable
  with the reference's own ML-1M epochs. `ml1m_unpacked` times the same batches one user per
  row (the speed-up of packing, measured in the same run).
* `full`: synthetic rows with all 200 positions supervised (the worst case; packing cannot
  help). The headline when no data is given.

`per_row` sampling (128 negatives shared by a row's positions; not the reference) is timed on
full windows with `--sampling=per_position,per_row`. A matmul calibration measured in the
same run says how busy this shared machine was. `sampled_softmax` says where a step's time
goes: each model's loss timed alone on the same positions (value and gradient) and its
share of the step. Prints progress to stderr and one JSON object as the last stdout line.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from experiments.ml1m.models import CAPABILITIES
from vista_jax import retrieval
from vista_jax.data import sequences
from vista_jax.data.loaders import load_event_log
from vista_jax.models.sequential import build_encoder, preset

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["sasrec", "hstu", "hstu_large", "vista_hstu"], "Presets to time.")
flags.DEFINE_list("sampling", ["per_position"], "Negative sampling variants (+ per_row).")
flags.DEFINE_string(
    "data_dir", os.environ.get("VISTA_DATA_DIR", ""), "Data root with ml-1m/ (empty: full only)."
)
flags.DEFINE_integer("steps", 8, "Timed steps (distinct batches) per model and kind.")
flags.DEFINE_integer("batch", 128, "Sequences per step.")
flags.DEFINE_integer("window", 200, "Positions per sequence.")
flags.DEFINE_integer("num_negatives", 128, "Negatives per position.")
flags.DEFINE_integer("d_model", 50, "Embedding width.")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def synthetic_batch(batch: int, window: int, num_items: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    walk = rng.integers(1, num_items + 1, (batch, window + 1))
    t = np.cumsum(rng.integers(0, 86_400, (batch, window + 1)), axis=1)
    arrays = {"item": walk[:, :-1], "target": walk[:, 1:], "time": t[:, :-1], "next_time": t[:, 1:]}
    return {k: np.asarray(v, np.int32) for k, v in arrays.items()}


def ml1m_batches(data_dir: str, window: int, batch: int, steps: int):
    """(num_items, the first `steps` shuffled batches of ML-1M train rows, as trained on)."""
    event_log = load_event_log("movielens_1m", os.path.join(data_dir, "ml-1m"))
    train = sequences.from_event_log(event_log, window).train
    batches = sequences.train_batches(train, batch, np.random.default_rng(0))
    return event_log.num_items, [next(batches) for _ in range(steps)]


def time_model(name: str, sampling: str, batches: list, num_items: int, pack: bool) -> dict:
    """Steps over `batches` (packed rows where `pack` and the model packs), each batch's shape
    compiled and run once before the timed pass."""
    cfg = preset(name, num_items, d_model=FLAGS.d_model, max_len=FLAGS.window)
    tx = retrieval.make_optimizer()
    graphdef, state = retrieval.init_train_state(build_encoder(cfg, nnx.Rngs(0)), tx)
    step_for = retrieval.CapacitySteps(
        graphdef, tx, FLAGS.batch * FLAGS.window, num_negatives=FLAGS.num_negatives,
        sampling=sampling,
    )  # fmt: skip

    def prepared(batch):
        batch = sequences.pack_rows(batch) if pack and CAPABILITIES[name].packs else batch
        return step_for(batch), {k: jnp.asarray(v) for k, v in batch.items()}

    key = jax.random.key(0)
    work = [prepared(b) for b in batches]
    t0 = time.perf_counter()
    for step, batch in work:  # Compiles every shape, warms up every step.
        state, m = step(state, batch, key)
    jax.block_until_ready((state, m))
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for step, batch in work:
        state, m = step(state, batch, key)
    jax.block_until_ready((state, m))
    step_s = (time.perf_counter() - t0) / len(work)
    rows = [len(b["item"]) for _, b in work]
    loss_s = time_loss([b for _, b in work], num_items, sampling, step_for.capacity)
    out = {
        "sequences_per_second": FLAGS.batch / step_s,
        "step_ms": 1000 * step_s,
        "warmup_and_compile_s": warmup_s,
        "mean_rows_per_step": float(np.mean(rows)),
        "loss": float(m["loss"]),
        # The step's sampled softmax alone (value and gradient, same positions and shapes,
        # random user vectors), and its share of the step.
        "sampled_softmax_ms": 1000 * loss_s,
        "sampled_softmax_share": loss_s / step_s,
    }
    rate = out["sequences_per_second"]
    log(f"{name:>10} {sampling:>12}: {out['step_ms']:.0f} ms/step, {rate:.0f} seq/s "
        f"(sampled softmax {out['sampled_softmax_ms']:.0f} ms)")  # fmt: skip
    return out


def time_loss(batches: list, num_items: int, sampling: str, capacity_of: Callable) -> float:
    """Seconds per step of `retrieval.sampled_softmax_loss`'s value and gradient (user vectors
    and item table) on each batch's targets and packed capacity (`capacity_of(batch)`, the
    step's own), with random user vectors of about unit norm: the loss's part of the step,
    timed alone."""
    dim = FLAGS.d_model
    items = jax.random.normal(jax.random.key(1), (num_items + 1, dim))
    items = items / jnp.linalg.norm(items, axis=-1, keepdims=True)
    work = []
    for batch in batches:
        target = batch["target"]
        capacity = capacity_of(batch)
        user = jax.random.normal(jax.random.key(2), target.shape + (dim,)) / np.sqrt(dim)
        work.append((capacity, user, target))
    grads = {}

    def grad_of(capacity):
        if capacity not in grads:
            loss = functools.partial(
                retrieval.sampled_softmax_loss, num_negatives=FLAGS.num_negatives,
                sampling=sampling, max_positions=capacity,
            )  # fmt: skip
            value = lambda u, t, i, k: loss(u, t, i, k)[0]  # noqa: E731
            grads[capacity] = jax.jit(jax.value_and_grad(value, argnums=(0, 2)))
        return grads[capacity]

    key = retrieval.fast_key(jax.random.key(0))
    for capacity, user, target in work:  # Compile and warm up.
        out = grad_of(capacity)(user, target, items, key)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for capacity, user, target in work:
        out = grad_of(capacity)(user, target, items, key)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / len(work)


def matmul_gflops(n: int = 1024, reps: int = 10) -> float:
    """f32 [n, n] @ [n, n] GFLOP/s now (70-460 on the 2-core machines this ran on)."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    jax.block_until_ready(out)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def rates(results: dict) -> dict:
    return {m: round(r["sequences_per_second"], 1) for m, r in results.items()}


def main(argv):
    del argv
    calibration = {"matmul_gflops_before": matmul_gflops(), "load_avg_before": os.getloadavg()}
    num_items, kinds = 3706, {}
    if FLAGS.data_dir:
        num_items, real = ml1m_batches(FLAGS.data_dir, FLAGS.window, FLAGS.batch, FLAGS.steps)
        kinds["ml1m"] = (real, True)
        kinds["ml1m_unpacked"] = (real, False)
    full = [synthetic_batch(FLAGS.batch, FLAGS.window, num_items)] * FLAGS.steps
    kinds["full"] = (full, False)
    results = {}
    for kind, (batches, pack) in kinds.items():
        models = [m for m in FLAGS.models if kind != "ml1m_unpacked" or CAPABILITIES[m].packs]
        for sampling in FLAGS.sampling if kind == "full" else ["per_position"]:
            log(f"-- {kind} rows, {sampling} negatives")
            results[f"{kind}/{sampling}"] = {
                m: time_model(m, sampling, batches, num_items, pack) for m in models
            }
    calibration |= {"matmul_gflops_after": matmul_gflops(), "load_avg_after": os.getloadavg()}
    log(f"calibration: {calibration}")
    headline = "ml1m" if FLAGS.data_dir else "full"
    summary = {
        "sequences_per_second": rates(results[f"{headline}/per_position"]),
        "config": {
            "batches": headline,
            "batch": FLAGS.batch,
            "window": FLAGS.window,
            "num_negatives_per_position": FLAGS.num_negatives,
            "d_model": FLAGS.d_model,
            "num_items": num_items,
            "dropout": 0.2,
            "timed_steps": FLAGS.steps,
            "devices": [str(d) for d in jax.devices()],
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
        },
        "full_window_sequences_per_second": rates(results["full/per_position"]),
        "details": results,
        "calibration": calibration,
    }
    # Where a step's time goes: the loss alone and its share (the encoder gets the rest).
    summary["sampled_softmax"] = {
        m: {
            "ms": round(r["sampled_softmax_ms"], 1),
            "share_of_step": round(r["sampled_softmax_share"], 3),
        }
        for m, r in results[f"{headline}/per_position"].items()
    }
    if "ml1m_unpacked/per_position" in results:
        summary["ml1m_unpacked_sequences_per_second"] = rates(results["ml1m_unpacked/per_position"])
    if "full/per_row" in results:
        summary["per_row_negatives_sequences_per_second"] = rates(results["full/per_row"])
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)

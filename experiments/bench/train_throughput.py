r"""Training throughput of the retrieval baselines (sequences per second), compile excluded.

  python -m experiments.bench.train_throughput [--models=sasrec,hstu,hstu_large] [--steps=5]

One optimizer step = batch 128 users x window 200, d = 50, 3706 items (ML-1M), sampled
softmax with 128 uniform negatives at every position, dropout on: the reference's ML-1M
training step. Every position of every row is supervised (full windows, the worst case: on
ML-1M about half the positions are, and `max_positions` packing then skips the rest). Each
model is jitted once, warmed up, then `--steps` steps are timed with block_until_ready.
`sequences_per_second` uses the reference's per-position negatives; `per_row_negatives`
the cheaper variant sharing 128 negatives across a row's positions (not the reference). A
matmul calibration measured in the same run says how busy this shared machine was. Prints
progress to stderr and one JSON object as the last stdout line; a `vista` entry can be added
to the same dicts later.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from vista_jax import retrieval
from vista_jax.models.sequential import build_encoder, preset

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "models", ["sasrec", "hstu", "hstu_large", "vista", "vista_hstu"], "Presets to time."
)
flags.DEFINE_list("sampling", ["per_position", "per_row"], "Negative sampling variants.")
flags.DEFINE_integer("steps", 5, "Timed steps per model (after 2 warm-up steps).")
flags.DEFINE_integer("batch", 128, "Sequences per step.")
flags.DEFINE_integer("window", 200, "Positions per sequence.")
flags.DEFINE_integer("num_negatives", 128, "Negatives per position.")
flags.DEFINE_integer("d_model", 50, "Embedding width.")
flags.DEFINE_integer("num_items", 3706, "Catalog size (ML-1M).")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def synthetic_batch(batch: int, window: int, num_items: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    walk = rng.integers(1, num_items + 1, (batch, window + 1))
    t = np.cumsum(rng.integers(0, 86_400, (batch, window + 1)), axis=1)
    arrays = {"item": walk[:, :-1], "target": walk[:, 1:], "time": t[:, :-1], "next_time": t[:, 1:]}
    return {k: jnp.asarray(v, jnp.int32) for k, v in arrays.items()}


def time_model(name: str, sampling: str) -> dict:
    cfg = preset(name, FLAGS.num_items, d_model=FLAGS.d_model, max_len=FLAGS.window)
    tx = retrieval.make_optimizer()
    graphdef, state = retrieval.init_train_state(build_encoder(cfg, nnx.Rngs(0)), tx)
    step = jax.jit(
        retrieval.make_train_step(graphdef, tx, FLAGS.num_negatives, sampling=sampling),
        donate_argnums=0,
    )
    batch = synthetic_batch(FLAGS.batch, FLAGS.window, FLAGS.num_items)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        state, m = compiled(state, batch, key)
    jax.block_until_ready((state, m))
    t0 = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, m = compiled(state, batch, key)
    jax.block_until_ready((state, m))
    step_s = (time.perf_counter() - t0) / FLAGS.steps
    out = {
        "sequences_per_second": FLAGS.batch / step_s,
        "step_ms": 1000 * step_s,
        "compile_s": compile_s,
        "loss": float(m["loss"]),
    }
    rate = out["sequences_per_second"]
    log(f"{name:>10} {sampling:>12}: {out['step_ms']:.0f} ms/step, {rate:.0f} seq/s")
    return out


def matmul_gflops(n: int = 1024, reps: int = 10) -> float:
    """f32 [n, n] @ [n, n] rate now (STACK_NOTES measured ~170 GFLOP/s on a quiet machine)."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    jax.block_until_ready(out)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def main(argv):
    del argv
    calibration = {"matmul_gflops_before": matmul_gflops(), "load_avg_before": os.getloadavg()}
    results = {s: {m: time_model(m, s) for m in FLAGS.models} for s in FLAGS.sampling}
    calibration |= {"matmul_gflops_after": matmul_gflops(), "load_avg_after": os.getloadavg()}
    log(f"calibration: {calibration}")
    headline = results.get("per_position", next(iter(results.values())))
    summary = {
        "sequences_per_second": {
            m: round(r["sequences_per_second"], 1) for m, r in headline.items()
        },
        "config": {
            "batch": FLAGS.batch,
            "window": FLAGS.window,
            "num_negatives_per_position": FLAGS.num_negatives,
            "d_model": FLAGS.d_model,
            "num_items": FLAGS.num_items,
            "supervised_positions": "all (full windows)",
            "dropout": 0.2,
            "headline_sampling": "per_position" if "per_position" in results else FLAGS.sampling[0],
            "timed_steps": FLAGS.steps,
            "devices": [str(d) for d in jax.devices()],
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
        },
        "details": results,
        "calibration": calibration,
    }
    if "per_row" in results and "per_position" in results:
        summary["per_row_negatives_sequences_per_second"] = {
            m: round(r["sequences_per_second"], 1) for m, r in results["per_row"].items()
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)

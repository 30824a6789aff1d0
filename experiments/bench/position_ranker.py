r"""Cost of VISTA's stage 2 scoring every position of ML-1M ranking rows, compile excluded.

  python -m experiments.bench.position_ranker [--steps=5]

`sequential_ranking.PositionSummaryRanker` (`--model=vista_ranker` of `experiments.ml1m.
train_sequential --task=ranking`) against the request form it equals: the `Ranker` on one
request per position, each with its own copy of its snapshot's K summary tokens (how the
position ranker computed it before the keys and values of a snapshot's tokens were shared by
the positions that read it). One batch of the ML-1M ranking setting (128 rows x 200
positions, a snapshot every 40 events, 32 summary tokens of width 50, the last 64 events,
d = 50, 2 heads, 1 block), random ids and summaries; a training step (loss and gradients)
and a scoring pass (logits), each jitted, warmed up, then timed `--steps` times (median).
Both forms in the same run; their largest logit difference says they compute the same
thing. Prints progress to stderr and one JSON object as the last stdout line.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from vista_jax import sequential_ranking
from vista_jax.config import RankerConfig
from vista_jax.models.ranker import Ranker

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 5, "Timed repetitions per form and pass.")
flags.DEFINE_integer("batch", 128, "Rows per step.")
flags.DEFINE_integer("window", 200, "Positions per row.")
flags.DEFINE_integer("snapshot_every", 40, "Events per snapshot.")
flags.DEFINE_integer("num_seeds", 32, "Summary tokens K per snapshot.")
flags.DEFINE_integer("num_recent", 64, "Recent events R each position reads.")
flags.DEFINE_integer("d_model", 50, "Ranker and summary width.")
flags.DEFINE_integer("num_items", 3706, "Item vocabulary (ML-1M).")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def per_position_copies(model: sequential_ranking.PositionSummaryRanker):
    """The reference: the request-form `Ranker`, each position with its snapshot's tokens."""

    def logits(batch):
        b, length = batch["item"].shape
        snapshot_L = (jnp.arange(length) + 1) // model.snapshot_every
        summary = batch["summary_values"][:, snapshot_L]  # [B, L, K, D]
        requests = model.requests(batch) | {
            "summary": summary.reshape((b * length,) + summary.shape[2:]),
            "summary_mask": jnp.ones((b * length,), bool),
        }
        return model.ranker(requests)[0].reshape(b, length)

    return logits


def timed(fn, *args) -> float:
    jax.block_until_ready(fn(*args))  # Compile and warm up.
    times = []
    for _ in range(FLAGS.steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv):
    del argv
    b, length, d = FLAGS.batch, FLAGS.window, FLAGS.d_model
    cfg = RankerConfig(
        num_items=FLAGS.num_items, num_actions=8, num_gap_buckets=16, num_categories=18,
        d_model=d, num_heads=2, num_layers=1, mlp_hidden=2 * d, num_recent=FLAGS.num_recent,
        summary_dim=d,
    )  # fmt: skip
    model = sequential_ranking.PositionSummaryRanker(Ranker(cfg, nnx.Rngs(0)), FLAGS.snapshot_every)
    rng = np.random.default_rng(0)
    ids = {"item": FLAGS.num_items, "action": 8, "gap": 16, "category": 18,
           "target": FLAGS.num_items, "target_category": 18}  # fmt: skip
    batch = {k: jnp.asarray(rng.integers(1, hi, (b, length)), jnp.int32) for k, hi in ids.items()}
    j = length // FLAGS.snapshot_every + 1
    batch["summary_values"] = jnp.asarray(rng.normal(size=(b, j, FLAGS.num_seeds, d)), jnp.float32)
    batch["label"] = jnp.asarray(rng.integers(0, 2, (b, length)), jnp.float32)
    graphdef, params = nnx.split(model)
    forms = {
        "per_snapshot": lambda p, x: nnx.merge(graphdef, p)(x),
        "per_position_copies": lambda p, x: per_position_copies(nnx.merge(graphdef, p))(x),
    }
    result = {"seconds": {}, "positions_per_second": {}}
    logits = {}
    for name, form in forms.items():

        def loss(p, x, form=form):
            scored = x["target"] > 0
            return sequential_ranking.bce_loss(form(p, x), x["label"], scored)[0]

        score = jax.jit(form)
        train = jax.jit(jax.value_and_grad(loss))
        logits[name] = np.asarray(score(params, batch))
        seconds = {"train_step": timed(train, params, batch), "score": timed(score, params, batch)}
        log(f"{name}: {seconds}")
        result["seconds"][name] = seconds
        result["positions_per_second"][name] = {k: b * length / s for k, s in seconds.items()}
    ref, fast = result["seconds"]["per_position_copies"], result["seconds"]["per_snapshot"]
    result["speedup"] = {k: ref[k] / fast[k] for k in ref}
    result["max_abs_logit_diff"] = float(
        np.max(np.abs(logits["per_snapshot"] - logits["per_position_copies"]))
    )
    result["config"] = {
        "batch": b, "window": length, "snapshot_every": FLAGS.snapshot_every,
        "num_seeds": FLAGS.num_seeds, "num_recent": FLAGS.num_recent, "d_model": d,
        "steps": FLAGS.steps, "backend": jax.default_backend(), "jax": jax.__version__,
        "timing": "median wall seconds, compile excluded",
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)

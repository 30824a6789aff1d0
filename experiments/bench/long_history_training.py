r"""Training the source model on long histories: step time and peak memory vs length.

  python -m experiments.bench.long_history_training [--lengths=16384,100000] [--batch=4]

The source model of `experiments/synthetic/config.py` (summarizer + ranker head + L_rec)
takes full optimizer steps on users with L-event histories. Gradients flow through the
chunked summarizer with each chunk rematerialized (`remat=True`, what `train_source` uses), so
activation memory does not grow with L; `--no_remat_at` adds one run without remat to show
what remat saves. Each run is a fresh subprocess (honest peak memory: `PeakMemory` of
history_scaling: host VmHWM growth over the first and the timed steps, compile excluded). Prints
progress to stderr and one JSON object as the last stdout line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types

import jax
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from experiments.bench.history_scaling import (
    PeakMemory,
    _status_kb,
    block,
    log,
    median_seconds,
)
from experiments.synthetic import config as synthetic_config
from vista_jax.config import from_config_dict
from vista_jax.data import examples, synthetic
from vista_jax.models.ranker import Ranker
from vista_jax.models.source import SourceModel, make_loss_fn
from vista_jax.models.summarizer import ReconstructionDecoder, Summarizer
from vista_jax.train import init_train_state, make_train_step

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["16384", "100000"], "History lengths (events per user).")
flags.DEFINE_integer("batch", 4, "Users per step.")
# --chunk_size (events per scan step of the chunked summarizer) comes from history_scaling.
flags.DEFINE_integer("steps", 3, "Timed optimizer steps (median reported).")
flags.DEFINE_integer("no_remat_at", 16384, "Also train once at this length without remat.")
flags.DEFINE_integer("child_length", 0, "Internal: run one measurement and exit.")
flags.DEFINE_bool("child_remat", True, "Internal: remat in the child run.")


class _NoRematSource(SourceModel):
    def __call__(self, batch, remat: bool = False):
        return super().__call__(batch, remat=False)


def training_batch(length: int, batch: int):
    """`batch` synthetic users with `length`-event histories, as the pipeline builds them."""
    syn = synthetic.SyntheticConfig(num_users=batch, history_len=length, seed=0)
    spec = examples.ExampleSpec(task="ranking", history_window=length, num_recent=32)
    items = np.arange(1, synthetic.num_items(syn) + 1)
    item_category = np.concatenate([[0], synthetic.item_topic(syn, items) + 1])
    recs = [synthetic.generate_user(syn, u) for u in range(batch)]
    exs = [examples.ranking_example(r, spec, u, item_category) for u, r in enumerate(recs)]
    return examples.stack(exs), synthetic.num_items(syn), int(item_category.max())


def child(length: int, remat: bool) -> dict:
    config = synthetic_config.get_config()
    config.summarizer.chunk_size = FLAGS.chunk_size
    batch, num_items, num_categories = training_batch(length, FLAGS.batch)
    vocab = types.SimpleNamespace(num_items=num_items, num_categories=num_categories)
    typed = from_config_dict(config)
    scfg = typed.summarizer_for(vocab)
    rcfg = typed.ranker_for(vocab, summary_dim=scfg.d_model)
    cls = SourceModel if remat else _NoRematSource
    r = nnx.Rngs(0)
    model = cls(Summarizer(scfg, r), ReconstructionDecoder(scfg, r), Ranker(rcfg, r))
    batch = {k: v for k, v in batch.items() if k not in ("snapshot", "cand_prob")}
    tx = optax.adamw(1e-3)
    graphdef, state = init_train_state(model, tx)
    step = jax.jit(make_train_step(graphdef, tx, make_loss_fn("ranking", 1.0)), donate_argnums=0)
    compiled = step.lower(state, batch).compile()
    holder = {"state": state}

    def one_step():
        holder["state"], m = compiled(holder["state"], batch)
        block(m)
        holder["metrics"] = m

    # The first execution allocates the step's working set: it is inside the measurement.
    with PeakMemory() as mem:
        one_step()
        seconds = median_seconds(one_step, FLAGS.steps, min_total=0.0, max_repeats=FLAGS.steps)
    m = {k: float(v) for k, v in holder["metrics"].items()}
    return {"length": length, "remat": remat, "step_seconds": seconds, "peak_mb": mem.mb,
            "process_peak_mb": _status_kb("VmHWM") / 1024,
            "events_per_second": length * FLAGS.batch / seconds, **m}  # fmt: skip


def in_subprocess(length: int, remat: bool) -> dict:
    argv = [sys.executable, "-m", "experiments.bench.long_history_training",
            f"--child_length={length}", f"--child_remat={remat}", f"--batch={FLAGS.batch}",
            f"--chunk_size={FLAGS.chunk_size}", f"--steps={FLAGS.steps}"]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"child at L={length} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    if FLAGS.child_length:
        print(json.dumps(child(FLAGS.child_length, FLAGS.child_remat)))
        return
    runs = []
    for length in map(int, FLAGS.lengths):
        runs.append(in_subprocess(length, remat=True))
        log(f"L={length} remat: {runs[-1]}")
    if FLAGS.no_remat_at:
        runs.append(in_subprocess(FLAGS.no_remat_at, remat=False))
        log(f"L={FLAGS.no_remat_at} no remat: {runs[-1]}")
    remat = [r for r in runs if r["remat"]]
    out = {
        "runs": runs,
        "peak_mb_max_over_min_length": remat[-1]["peak_mb"] / max(remat[0]["peak_mb"], 1e-9),
        "config": {"batch": FLAGS.batch, "chunk_size": FLAGS.chunk_size, "steps": FLAGS.steps,
                   "model": "experiments/synthetic/config.py source model",
                   "timing": "median seconds of one optimizer step, compile excluded",
                   "memory": "host VmHWM growth over first + timed steps (fresh process)"},
    }  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)

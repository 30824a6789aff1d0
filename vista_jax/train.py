"""Training: a pure jitted `train_step`, a loop with progress, and Orbax checkpoints.

The trainable state is a pytree `TrainState(step, params, opt_state)`; the model structure
(`nnx.GraphDef`) stays static. Checkpoints are written by one `CheckpointManager` per stage
with each module as its own named item (`summarizer`, `decoder`, `ranker`), plus `opt_state`
and the data iterator's state, so a later stage restores the summarizer alone.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, struct

from vista_jax import sharding
from vista_jax.models.ranker import Ranker
from vista_jax.models.summarizer import ReconstructionDecoder, Summarizer, reconstruction_loss


class TrainingDivergedError(RuntimeError):
    pass


# -- models and losses ------------------------------------------------------------------------
class SourceModel(nnx.Module):
    """Summarizer + stage-2 head + reconstruction decoder, trained end to end."""

    def __init__(self, summarizer: Summarizer, decoder: ReconstructionDecoder, ranker: Ranker):
        self.summarizer = summarizer
        self.decoder = decoder
        self.ranker = ranker

    def __call__(self, batch, remat: bool = True):
        valid = jnp.arange(batch["hist_item"].shape[1])[None] < batch["hist_len"][:, None]
        summary, _ = self.summarizer(
            batch["hist_item"],
            batch["hist_action"],
            batch["hist_gap"],
            valid,
            remat=remat,
            category=batch.get("hist_category"),
        )
        batch = batch | {"summary": summary, "summary_mask": jnp.ones(valid.shape[:1], bool)}
        logits, aux = self.ranker(batch)
        rec = reconstruction_loss(self.summarizer, self.decoder, summary, batch["hist_item"], valid)
        return logits, aux | {"summary": summary, "recon_loss": rec}


def task_loss(task: str, logits, batch) -> jax.Array:
    """Ranking: masked sigmoid BCE. Retrieval: softmax CE with the target at candidate 0."""
    mask = batch["cand_mask"].astype(jnp.float32)
    if task == "ranking":
        bce = optax.sigmoid_binary_cross_entropy(logits, batch["cand_label"])
        return jnp.sum(bce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    logits = jnp.where(batch["cand_mask"], logits, -1e30)
    return jnp.mean(-jax.nn.log_softmax(logits, axis=-1)[:, 0])


def make_loss_fn(task: str, recon_weight: float = 0.0) -> Callable:
    """loss(model, batch) -> (loss, metrics); works for SourceModel and a bare Ranker."""

    def loss_fn(model, batch):
        logits, aux = model(batch)
        main = task_loss(task, logits, batch)
        metrics = {"task_loss": main}
        loss = main
        if "recon_loss" in aux:
            loss = loss + recon_weight * aux["recon_loss"]
            metrics["recon_loss"] = aux["recon_loss"]
        return loss, metrics | {"loss": loss}

    return loss_fn


# -- pure train step --------------------------------------------------------------------------
@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation):
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def make_train_step(graphdef, tx, loss_fn) -> Callable:
    """train_step(state, batch) -> (state, metrics): pure; jit it with donated state."""

    def train_step(state: TrainState, batch):
        def loss_of(params):
            return loss_fn(nnx.merge(graphdef, params), batch)

        (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def make_optimizer(cfg) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(1, cfg.warmup_steps), max(cfg.num_steps, cfg.warmup_steps + 1)
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, weight_decay=cfg.weight_decay),
    )


# -- checkpoints ------------------------------------------------------------------------------
def checkpoint_manager(directory, items: tuple[str, ...], max_to_keep: int = 2):
    handlers = {name: ocp.StandardCheckpointHandler() for name in items}
    handlers["data"] = ocp.JsonCheckpointHandler()
    return ocp.CheckpointManager(
        directory,
        item_names=tuple(handlers),
        item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )


def _named_modules(model: nnx.Module) -> dict[str, nnx.Module]:
    """The checkpoint items of a model: one per top-level module a later stage may restore."""
    if isinstance(model, SourceModel):
        return {name: getattr(model, name) for name in ("summarizer", "decoder", "ranker")}
    return {"ranker": model}


def save_checkpoint(mngr, graphdef, state: TrainState, data_state: dict):
    modules = _named_modules(nnx.merge(graphdef, state.params))
    args = {k: ocp.args.StandardSave(nnx.state(m, nnx.Param)) for k, m in modules.items()}
    args["opt_state"] = ocp.args.StandardSave({"step": state.step, "opt": state.opt_state})
    args["data"] = ocp.args.JsonSave(data_state)
    mngr.save(int(state.step), args=ocp.args.Composite(**args))


def restore_checkpoint(mngr, graphdef, state: TrainState) -> tuple[TrainState, dict]:
    model = nnx.merge(graphdef, state.params)
    modules = _named_modules(model)
    args = {k: ocp.args.StandardRestore(_abstract(m)) for k, m in modules.items()}
    opt_abstract = {"step": state.step, "opt": state.opt_state}
    args["opt_state"] = ocp.args.StandardRestore(
        jax.tree.map(ocp.utils.to_shape_dtype_struct, opt_abstract)
    )
    args["data"] = ocp.args.JsonRestore()
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(**args))
    for name, module in modules.items():
        nnx.update(module, restored[name])
    _, params = nnx.split(model, nnx.Param)
    opt = restored["opt_state"]
    return TrainState(opt["step"], params, opt["opt"]), restored["data"]


def _abstract(module: nnx.Module):
    """Shape/dtype skeleton of a module's parameters: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(module, nnx.Param))


def restore_module(directory, name: str, module: nnx.Module, step: int | None = None):
    """Restore one named item (e.g. the frozen summarizer) into `module`, nothing else."""
    with ocp.CheckpointManager(
        directory, item_names=(name,), item_handlers={name: ocp.StandardCheckpointHandler()}
    ) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {directory}: run the earlier stage")
        restored = mngr.restore(
            step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(_abstract(module))})
        )
    nnx.update(module, restored[name])
    return step


# -- the loop ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Progress:
    """Prints stage, step, examples/s and ETA to stderr at most every `every_s` seconds.

    Rates count from the first update, so the compile of the first step is not in them.
    """

    stage: str
    total_steps: int
    batch_size: int
    every_s: float = 5.0
    _origin: tuple[float, int] | None = None
    _last: float = 0.0

    def update(self, step: int, metrics: dict[str, float], force=False):
        now = time.monotonic()
        if self._origin is None:
            self._origin = (now, step)
        elif not force and now - self._last < self.every_s:
            return
        self._last = now
        t0, step0 = self._origin
        rate = (step - step0) * self.batch_size / max(now - t0, 1e-9)
        eta = f"{(self.total_steps - step) * self.batch_size / rate:.0f}s" if rate else "?"
        shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        print(
            f"[{self.stage}] step {step}/{self.total_steps} {rate:.0f} ex/s ETA {eta} {shown}",
            file=sys.stderr,
            flush=True,
        )


def fit(
    *,
    stage: str,
    model: nnx.Module,
    loss_fn: Callable,
    data: Iterator,
    cfg,
    workdir,
    items: tuple[str, ...],
    to_device: Callable = lambda b: b,
    mesh=None,
    rules=None,
) -> tuple[nnx.Module, dict[str, float]]:
    """Train `model` for cfg.num_steps, resuming from `workdir` if a checkpoint exists.

    `data` is a grain iterator (get_state/set_state); `to_device` turns a host batch into
    model inputs (e.g. adds cached summaries). With a `mesh` (and logical-axis `rules`), the
    state is sharded by `vista_jax.sharding` and batches are split over `data`. Returns the
    trained model and last metrics.
    """
    tx = make_optimizer(cfg)
    graphdef, state = init_train_state(model, tx)
    step_fn = make_train_step(graphdef, tx, loss_fn)
    place = lambda s: s  # noqa: E731
    if mesh is None:
        train_step = jax.jit(step_fn, donate_argnums=0)
    else:
        train_step, place, to_device = _sharded_step(step_fn, state, mesh, rules, to_device)
    state = place(state)
    mngr = checkpoint_manager(workdir, items + ("opt_state",))
    if mngr.latest_step() is not None:
        state, data_state = restore_checkpoint(mngr, graphdef, state)
        state = place(state)
        data.set_state(data_state)
        print(f"[{stage}] resumed from step {int(state.step)}", file=sys.stderr)
    start = int(state.step)
    progress = Progress(stage, cfg.num_steps, cfg.batch_size)
    pending, last = None, {}
    for step in range(start, cfg.num_steps):
        state, metrics = train_step(state, to_device(next(data)))
        if pending is not None:  # Fetch metrics one step late so the device never idles.
            last = _check_finite(stage, step, jax.device_get(pending))
            progress.update(step, last)
        pending = metrics
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.num_steps:
            save_checkpoint(mngr, graphdef, state, data.get_state())
    if pending is not None:
        last = _check_finite(stage, cfg.num_steps, jax.device_get(pending))
        progress.update(cfg.num_steps, last, force=True)
    if start < cfg.num_steps:
        save_checkpoint(mngr, graphdef, state, data.get_state())
    mngr.wait_until_finished()
    mngr.close()
    return nnx.merge(graphdef, state.params), last


def _sharded_step(step_fn, state, mesh, rules, to_device):
    """(jitted step with explicit shardings, state placer, batch placer) for `mesh`."""
    train_step, state_sh = sharding.jit_train_step(step_fn, state, mesh, rules)
    batch_sh = sharding.batch_sharding(mesh)
    place = lambda s: jax.device_put(s, state_sh)  # noqa: E731
    return train_step, place, lambda b: jax.device_put(to_device(b), batch_sh)


def _check_finite(stage, step, metrics) -> dict[str, float]:
    metrics = {k: float(v) for k, v in metrics.items()}
    if not all(math.isfinite(v) for v in metrics.values()):
        raise TrainingDivergedError(
            f"[{stage}] non-finite metrics at step {step}: {metrics}; lower the learning rate "
            "or check the input data"
        )
    return metrics


def predict_batches(model: nnx.Module, batches, to_device=lambda b: b):
    """Yields (host batch, logits as numpy) for every batch, with one jitted forward."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, batch):
        logits, _ = nnx.merge(graphdef, params)(batch)
        return logits

    for batch in batches:
        yield batch, np.asarray(forward(params, to_device(batch)))

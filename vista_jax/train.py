"""Training: a pure jitted `train_step`, one loop with progress, and resumable checkpoints.

The trainable state is a pytree `TrainState(step, params, opt_state)` over a mapping of named
modules (the checkpoint items); the model structure (`nnx.GraphDef`) stays static. There is
one code path: the step is jitted with explicit shardings over a mesh, and one device is a
1x1 mesh.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from vista_jax import checkpoints, sharding
from vista_jax.config import TrainConfig
from vista_jax.errors import CheckpointError


class TrainingDivergedError(RuntimeError):
    pass


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


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(1, cfg.warmup_steps), max(cfg.num_steps, cfg.warmup_steps + 1)
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, weight_decay=cfg.weight_decay),
    )


# -- progress ---------------------------------------------------------------------------------
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


# -- the loop ---------------------------------------------------------------------------------
def fit(
    modules: Mapping[str, nnx.Module],
    loss_fn: Callable,
    data: Iterator,
    train_cfg: TrainConfig,
    workdir,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules,
    *,
    stage: str = "train",
    to_device: Callable = lambda b: b,
    meta: Mapping | None = None,
) -> tuple[dict[str, nnx.Module], dict[str, float]]:
    """Train `modules` for `train_cfg.num_steps`, resuming from `workdir` if it holds a step.

    `loss_fn(modules, batch) -> (loss, metrics)`; `data` is a grain iterator (its state is
    checkpointed); `to_device` turns a host batch into model inputs; `meta` (JSON) is saved
    with every step (e.g. the cache version trained on). Each module is its own checkpoint
    item. Returns the trained modules and the last metrics.
    """
    tx = make_optimizer(train_cfg)
    graphdef, state = init_train_state(nnx.Dict(dict(modules)), tx)
    step_fn = make_train_step(graphdef, tx, loss_fn)
    train_step, state_sh = sharding.jit_train_step(step_fn, state, mesh, rules)
    batch_sh = sharding.batch_sharding(mesh)
    state = jax.device_put(state, state_sh)
    mngr = checkpoints.manager(workdir, tuple(modules), train_cfg.keep_checkpoints)
    if mngr.latest_step() is not None:
        state = _resume(mngr, graphdef, state, state_sh, data, train_cfg, stage)
    start = int(state.step)
    progress = Progress(stage, train_cfg.num_steps, train_cfg.batch_size)
    pending, last = None, {}
    for step in range(start, train_cfg.num_steps):
        batch = jax.device_put(to_device(next(data)), batch_sh)
        state, metrics = train_step(state, batch)
        if pending is not None:  # Fetch metrics one step late so the device never idles.
            last = _check_finite(stage, step, jax.device_get(pending))
            progress.update(step, last)
        pending = metrics
        done = step + 1
        if done % train_cfg.checkpoint_every == 0 and done < train_cfg.num_steps:
            _save(mngr, graphdef, state, data, meta)
    if pending is not None:
        last = _check_finite(stage, train_cfg.num_steps, jax.device_get(pending))
        progress.update(train_cfg.num_steps, last, force=True)
    if start < train_cfg.num_steps:
        _save(mngr, graphdef, state, data, meta)
    mngr.wait_until_finished()
    mngr.close()
    return dict(nnx.merge(graphdef, state.params).items()), last


def _save(mngr, graphdef, state: TrainState, data, meta):
    modules = nnx.merge(graphdef, state.params)
    opt = {"step": state.step, "opt": state.opt_state}
    checkpoints.save(mngr, int(state.step), dict(modules.items()), opt, data.get_state(), meta)


def _resume(mngr, graphdef, state, state_sh, data, train_cfg, stage) -> TrainState:
    latest = mngr.latest_step()
    if latest > train_cfg.num_steps:
        raise CheckpointError(
            f"[{stage}] {mngr.directory} holds a checkpoint at step {latest}, past the "
            f"requested num_steps={train_cfg.num_steps}. Fix: ask for at least {latest} steps "
            "or use a new --workdir"
        )
    modules = nnx.merge(graphdef, state.params)
    targets = {k: checkpoints.abstract(checkpoints.params_of(m)) for k, m in modules.items()}
    opt = {"step": state.step, "opt": state.opt_state}
    targets[checkpoints.OPT_ITEM] = checkpoints.abstract(opt)
    step, restored = checkpoints.restore(mngr, targets, json_items=(checkpoints.DATA_ITEM,))
    for name, module in modules.items():
        nnx.update(module, restored[name])
    _, params = nnx.split(modules, nnx.Param)
    opt = restored[checkpoints.OPT_ITEM]
    data.set_state(restored[checkpoints.DATA_ITEM])
    print(f"[{stage}] resumed from step {step}", file=sys.stderr)
    return jax.device_put(TrainState(opt["step"], params, opt["opt"]), state_sh)


def _check_finite(stage, step, metrics) -> dict[str, float]:
    metrics = {k: float(v) for k, v in metrics.items()}
    if not all(math.isfinite(v) for v in metrics.values()):
        raise TrainingDivergedError(
            f"[{stage}] non-finite metrics at step {step}: {metrics}; lower the learning rate "
            "or check the input data"
        )
    return metrics

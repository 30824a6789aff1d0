"""Training: a pure jitted `train_step`, one loop with progress, and resumable checkpoints.

The trainable state is a pytree `TrainState(step, params, opt_state)` over a mapping of named
modules (the checkpoint items); the model structure (`nnx.GraphDef`) stays static. There is
one code path: the step is jitted with explicit shardings over a mesh, and one device is a
1x1 mesh.

Early stopping (`EarlyStoppingConfig`, the same rule for every model): every `eval_every`
steps a `validate(modules) -> metrics` pass runs; the best step is saved under
`<workdir>/best/` and training stops after `patience` passes without improvement. Its state
travels in every checkpoint's `meta` item, so a resumed run continues it, and a stopped run
stays stopped. Later stages read the selected model through `model_dir(workdir)`.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from vista_jax import checkpoints, distributed, sharding
from vista_jax.config import EARLY_STOPPING_METRICS, EarlyStoppingConfig, TrainConfig
from vista_jax.errors import CheckpointError

BEST_DIR = "best"  # Under a stage directory: the validation-selected step (early stopping).
FIT_META = "fit"  # Meta key: early-stopping state and training counters (JSON).


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


# -- early stopping ---------------------------------------------------------------------------
@dataclasses.dataclass
class EarlyStopping:
    """Validation-driven stopping: the best step so far and the passes since it improved."""

    cfg: EarlyStoppingConfig
    best_step: int = -1
    best_metrics: dict = dataclasses.field(default_factory=dict)
    bad_passes: int = 0
    stopped: bool = False
    history: list = dataclasses.field(default_factory=list)  # [step, metric value] per pass

    def due(self, done: int, last_step: int) -> bool:
        return self.cfg.enabled and (done % self.cfg.eval_every == 0 or done == last_step)

    def observe(self, step: int, metrics: dict[str, float]) -> bool:
        """Records a validation pass; True when it is the new best."""
        self.history.append([step, float(metrics[self.cfg.metric])])
        sign = EARLY_STOPPING_METRICS[self.cfg.metric]
        values = [v for _, v in self.history]
        self.bad_passes = passes_without_gain(values, sign, self.cfg.min_delta)
        if self.bad_passes == 0:
            self.best_step, self.best_metrics = step, dict(metrics)
            return True
        self.stopped = self.bad_passes >= self.cfg.patience
        return False

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "cfg"}


def passes_without_gain(values, sign: float = 1.0, min_delta: float = 0.0) -> int:
    """Validation passes since the best one, the rule of every early stop in the project.

    A pass is a gain when `sign * (value - best) > min_delta`, best being the last gain
    before it (the first pass always is): ties and improvements within `min_delta` are not
    gains, so of tied passes the first is the selected one. Training stops once this reaches
    the patience.
    """
    best, since = None, 0
    for value in values:
        if best is None or sign * (value - best) > min_delta:
            best, since = value, 0
        else:
            since += 1
    return since


def model_dir(workdir) -> pathlib.Path:
    """Where a stage's selected model lives: `<workdir>/best` when early stopping saved one."""
    best = pathlib.Path(workdir).absolute() / BEST_DIR
    return (
        best
        if best.is_dir() and any(p.name.isdigit() for p in best.iterdir())
        else (pathlib.Path(workdir).absolute())
    )


@dataclasses.dataclass
class _Clock:
    """Training examples/s without the first step (the compile) and validation passes."""

    batch_size: int
    wall_s: float = 0.0
    train_s: float = 0.0
    steps: int = 0
    _t: float | None = None

    def tick(self, now: float):
        if self._t is not None:
            self.train_s += now - self._t
            self.steps += 1
        self._t = now

    def pause(self):
        self._t = None

    def examples_per_s(self) -> float:
        return self.steps * self.batch_size / self.train_s if self.train_s else float("nan")


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
    validate: Callable[[Mapping[str, nnx.Module]], dict[str, float]] | None = None,
    early_stopping: EarlyStoppingConfig | None = None,
) -> tuple[dict[str, nnx.Module], dict]:
    """Train `modules` for up to `train_cfg.num_steps`, resuming from `workdir` if it holds a
    step, and stopping early on validation when `early_stopping` is enabled.

    `loss_fn(modules, batch) -> (loss, metrics)`; `data` is a grain iterator (its state is
    checkpointed) of global batches, or in a multi-process run of this process's block of
    each (`vista_jax.data.inputs.batched`), assembled into the global batch here;
    `to_device` turns a host batch into model inputs; `meta` (JSON) is saved with every
    step (e.g. the cache version trained on); `validate(modules)` scores the
    validation requests (needed when early stopping is on). Each module is its own
    checkpoint item. Returns the trained (last) modules and a report: last training metrics,
    steps, wall time, examples/s and the early-stopping record (JSON-able).
    """
    early = EarlyStopping(early_stopping or EarlyStoppingConfig())
    if early.cfg.enabled and validate is None:
        raise ValueError(f"[{stage}] early stopping needs a validate function")
    tx = make_optimizer(train_cfg)
    graphdef, state = init_train_state(nnx.Dict(dict(modules)), tx)
    step_fn = make_train_step(graphdef, tx, loss_fn)
    train_step, state_sh = sharding.jit_train_step(step_fn, state, mesh, rules)
    batch_sh = sharding.batch_sharding(mesh)
    state = jax.device_put(state, state_sh)
    mngr = checkpoints.manager(workdir, tuple(modules), train_cfg.keep_checkpoints)
    best_mngr = None
    if early.cfg.enabled:
        best_dir = pathlib.Path(workdir).absolute() / BEST_DIR
        best_mngr = checkpoints.manager(best_dir, tuple(modules), keep=1)
    report = {"steps": 0, "wall_s": 0.0, "train_s": 0.0, "timed_steps": 0}
    if mngr.latest_step() is not None:
        state, fit_meta = _resume(mngr, graphdef, state, state_sh, data, train_cfg, stage)
        report |= {k: v for k, v in fit_meta.items() if k in report}
        if "early_stopping" in fit_meta:
            early = EarlyStopping(early.cfg, **fit_meta["early_stopping"])
    start = int(state.step)
    clock = _Clock(train_cfg.batch_size)
    t_start = time.monotonic()

    saved = {"main": mngr.latest_step()}

    def save(target_mngr):
        fit_meta = _fit_meta(report, clock, t_start, int(state.step), early)
        _save(target_mngr, graphdef, state, data, dict(meta or {}) | {FIT_META: fit_meta})
        if target_mngr is mngr:
            saved["main"] = int(state.step)

    progress = Progress(stage, train_cfg.num_steps, train_cfg.batch_size)
    pending, last = None, {}
    step = start
    while step < train_cfg.num_steps and not early.stopped:
        batch = distributed.global_batch(to_device(next(data)), batch_sh)
        state, metrics = train_step(state, batch)
        if pending is not None:  # Fetch metrics one step late so the device never idles.
            last = _check_finite(stage, step, jax.device_get(pending))
            progress.update(step, last)
            clock.tick(time.monotonic())
        pending = metrics
        step += 1
        if early.due(step, train_cfg.num_steps):
            clock.pause()
            last = _check_finite(stage, step, jax.device_get(pending))
            pending = None
            _validation_pass(early, step, validate, graphdef, state, stage, lambda: save(best_mngr))
        if step % train_cfg.checkpoint_every == 0 and step < train_cfg.num_steps:
            save(mngr)
    if pending is not None:
        last = _check_finite(stage, step, jax.device_get(pending))
        progress.update(step, last, force=True)
    if step > start and saved["main"] != step:
        save(mngr)
    for m in (mngr, best_mngr):
        if m is not None:
            m.wait_until_finished()
            m.close()
    report = _fit_meta(report, clock, t_start, step, early) | {"last_metrics": last}
    return dict(nnx.merge(graphdef, state.params).items()), report


def _validation_pass(early, step, validate, graphdef, state, stage, save_best):
    t0 = time.monotonic()
    metrics = validate(dict(nnx.merge(graphdef, state.params).items()))
    improved = early.observe(step, metrics)
    if improved:
        save_best()
    shown = " ".join(f"{k}={metrics[k]:.4f}" for k in ("auc", "logloss", "ne") if k in metrics)
    verdict = "best" if improved else f"no gain {early.bad_passes}/{early.cfg.patience}"
    print(
        f"[{stage}] step {step} valid {shown} ({verdict}, {time.monotonic() - t0:.1f}s)"
        + (" -> early stop" if early.stopped else ""),
        file=sys.stderr,
        flush=True,
    )


def _fit_meta(report: dict, clock: _Clock, t_start: float, step: int, early) -> dict:
    """Training counters so far (summed over resumed runs) and the early-stopping record."""
    train_s = report["train_s"] + clock.train_s
    timed = report["timed_steps"] + clock.steps
    return {
        "steps": step,
        "wall_s": round(report["wall_s"] + time.monotonic() - t_start, 2),
        "train_s": round(train_s, 3),
        "timed_steps": timed,
        "examples_per_s": timed * clock.batch_size / train_s if train_s else float("nan"),
        "early_stopping": early.to_json(),
    }


def _save(mngr, graphdef, state: TrainState, data, meta):
    modules = nnx.merge(graphdef, state.params)
    opt = {"step": state.step, "opt": state.opt_state}
    checkpoints.save(mngr, int(state.step), dict(modules.items()), opt, data.get_state(), meta)


def _resume(mngr, graphdef, state, state_sh, data, train_cfg, stage):
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
    json_items = (checkpoints.DATA_ITEM, checkpoints.META_ITEM)
    step, restored = checkpoints.restore(mngr, targets, json_items=json_items)
    for name, module in modules.items():
        nnx.update(module, restored[name])
    _, params = nnx.split(modules, nnx.Param)
    opt = restored[checkpoints.OPT_ITEM]
    data.set_state(restored[checkpoints.DATA_ITEM])
    print(f"[{stage}] resumed from step {step}", file=sys.stderr)
    fit_meta = dict((restored[checkpoints.META_ITEM] or {}).get(FIT_META, {}))
    return jax.device_put(TrainState(opt["step"], params, opt["opt"]), state_sh), fit_meta


def _check_finite(stage, step, metrics) -> dict[str, float]:
    metrics = {k: float(v) for k, v in metrics.items()}
    if not all(math.isfinite(v) for v in metrics.values()):
        raise TrainingDivergedError(
            f"[{stage}] non-finite metrics at step {step}: {metrics}; lower the learning rate "
            "or check the input data"
        )
    return metrics

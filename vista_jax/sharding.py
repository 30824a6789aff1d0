"""Logical axis names -> mesh shardings, at one boundary (docs/ARCHITECTURE.md, Sharding).

Model code names logical axes only (`vocab`, `embed`, `heads`, `mlp`, `seeds`, `batch`); the
mesh shape and the rules `((logical, mesh_axis | tuple | None), ...)` are configuration.
Policy:
  * a logical name missing from the rules is an error (catches typos);
  * two dims of one array on the same mesh axis is an error naming the parameter;
  * a dim not divisible by its mesh axes' size falls back to replicated for that dim
    (XLA would pad it); `sharding_table` marks every such fallback, so the golden test
    shows it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vista_jax.errors import ConfigError

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices=None) -> Mesh:
    """A mesh with Auto (GSPMD) axis types over all (or the given) devices.

    A 1x1 mesh (the default) takes the first device: one device is a mesh too, so training
    has one code path. A multi-process run needs a mesh over every process's devices, in
    `jax.devices()` order (grouped by process, so each feeds a contiguous block of a batch).
    """
    devices = jax.devices() if devices is None else list(devices)
    if jax.process_count() > 1 and math.prod(shape) != len(devices):
        raise ConfigError(  # Each process drives its own devices: the mesh needs them all.
            f"a run of {jax.process_count()} processes needs a mesh over all {len(devices)} "
            f"devices, but mesh shape {tuple(shape)} holds {math.prod(shape)}. Fix: set "
            f"--config.mesh.shape so its product is {len(devices)}, e.g. ({len(devices)}, 1)"
        )
    if math.prod(shape) == 1:
        devices = devices[:1]
    if len(shape) != len(axes):
        raise ConfigError(
            f"mesh shape {tuple(shape)} and axes {tuple(axes)} differ in length. "
            "Fix: give config.mesh.shape one entry per axis"
        )
    if math.prod(shape) != len(devices):
        raise ConfigError(
            f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices but {len(devices)} are "
            f"available. Fix: set --config.mesh.shape so its product is {len(devices)}"
        )
    grid = np.asarray(devices).reshape(tuple(shape))
    return Mesh(grid, tuple(axes), axis_types=(AxisType.Auto,) * len(axes))


def _mesh_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def logical_to_mesh_spec(logical_spec, rules: Rules, path: str = "<array>") -> PartitionSpec:
    """Map each logical dim name through `rules`; reject one mesh axis used twice."""
    table = dict(rules)
    out, used = [], {}
    for name in logical_spec:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"{path}: logical axis {name!r} has no rule in {sorted(table)}")
        axes = _mesh_axes(table[name])
        for axis in axes:
            if axis in used:
                raise ValueError(
                    f"{path}: logical axes {used[axis]!r} and {name!r} both map to mesh axis "
                    f"{axis!r}; one array cannot be sharded twice over one mesh axis"
                )
            used[axis] = name
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def _fit_to_shape(spec: PartitionSpec, shape, mesh: Mesh) -> tuple[PartitionSpec, list[str]]:
    """Replicate dims whose size the mesh axes do not divide; return the notes."""
    out, notes = [], []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        size = math.prod(mesh.shape[a] for a in _mesh_axes(entry))
        if dim % size:
            notes.append(f"dim {dim} % {size} != 0 -> replicated")
            entry = None
        out.append(entry)
    return PartitionSpec(*out), notes


def _logical_spec(variable: nnx.Variable) -> tuple:
    meta = variable.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        if meta.get(key) is not None:
            return tuple(meta[key])
    return ()


def _param_entries(params_state, mesh: Mesh, rules: Rules):
    """(path, logical spec, fitted mesh spec, shape, notes) for every parameter."""
    for path, var in nnx.to_flat_state(params_state):
        name = "/".join(str(p) for p in path)
        logical = _logical_spec(var)
        spec = logical_to_mesh_spec(logical, rules, name)
        fitted, notes = _fit_to_shape(spec, var.shape, mesh)
        yield path, name, logical, fitted, var.shape, notes


def param_shardings(params_state, mesh: Mesh, rules: Rules):
    """The params state with each Variable's value replaced by its `NamedSharding`."""
    fitted = {path: spec for path, _, _, spec, _, _ in _param_entries(params_state, mesh, rules)}
    flat = [
        (path, var.replace(NamedSharding(mesh, fitted[path])))
        for path, var in nnx.to_flat_state(params_state)
    ]
    return nnx.from_flat_state(flat)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) dim over `data`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec("data"))


def _mirror_params(tree, params, shardings, replicated):
    """Subtrees shaped like `params` (optimizer moments) take the param shardings."""
    structure = jax.tree.structure(params)
    mirrors = lambda x: jax.tree.structure(x) == structure  # noqa: E731
    return jax.tree.map(lambda x: shardings if mirrors(x) else replicated, tree, is_leaf=mirrors)


def train_state_shardings(state, mesh: Mesh, rules: Rules):
    """Shardings for a `TrainState`: params by the rules, moments alike, scalars replicated."""
    shardings = param_shardings(state.params, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = _mirror_params(state.opt_state, state.params, shardings, replicated)
    return state.replace(step=replicated, params=shardings, opt_state=opt)


def shard_train_state(state, mesh: Mesh, rules: Rules):
    """`device_put` a `TrainState` onto `mesh` by `train_state_shardings`."""
    return jax.device_put(state, train_state_shardings(state, mesh, rules))


def jit_train_step(train_step, state, mesh: Mesh, rules: Rules):
    """`train_step(state, batch)` jitted with explicit shardings and donated state.

    Returns (jitted step, state shardings); metrics come back replicated.
    """
    state_sh = train_state_shardings(state, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(
        train_step,
        in_shardings=(state_sh, batch_sharding(mesh)),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )
    return jitted, state_sh


def sharding_table(params_state, mesh: Mesh, rules: Rules) -> list[str]:
    """`path | logical spec | mesh spec | shape` per parameter (the golden sharding dump)."""
    lines = []
    for _, name, logical, spec, shape, notes in _param_entries(params_state, mesh, rules):
        note = f"  ({'; '.join(notes)})" if notes else ""
        lines.append(f"{name} | {logical} | {spec!r}{note} | {tuple(shape)}")
    return lines

"""Orbax checkpoints: one `CheckpointManager` per stage, each module its own named item.

Items: the modules by name (`summarizer`, `decoder`, `ranker`), `opt_state` (step and
optimizer state), `data` (the input iterator's state, JSON) and `meta` (JSON: what the model
was trained from, e.g. the cache version of a downstream ranker). A later stage restores one
item alone. Restores check shapes first (a config that differs from the run that wrote the
checkpoint is named, field by field) and fall back from an unreadable latest step to the
newest good one, with a warning naming the bad step; a step that fails because it holds other
arrays than the model (written by another version of it) is an error naming them instead.
"""

from __future__ import annotations

import logging
import pathlib
import sys
from collections.abc import Mapping

import jax
import orbax.checkpoint as ocp
from flax import nnx

from vista_jax.errors import CheckpointError

# Restoring one item of a multi-item step makes Orbax warn about every other item, several
# times per restore; restoring a subset is this module's design, so those lines are dropped.
logging.getLogger("absl").addFilter(
    lambda record: "could not be restored" not in record.getMessage()
)

DATA_ITEM = "data"
OPT_ITEM = "opt_state"
META_ITEM = "meta"


def manager(directory, modules: tuple[str, ...], keep: int = 2) -> ocp.CheckpointManager:
    handlers = {name: ocp.StandardCheckpointHandler() for name in modules + (OPT_ITEM,)}
    handlers[DATA_ITEM] = ocp.JsonCheckpointHandler()
    handlers[META_ITEM] = ocp.JsonCheckpointHandler()
    return ocp.CheckpointManager(
        directory,
        item_names=tuple(handlers),
        item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )


def abstract(tree):
    """Shape/dtype skeleton (with shardings) of a pytree: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def params_of(module: nnx.Module):
    return nnx.state(module, nnx.Param)


def save(mngr, step: int, modules: Mapping[str, nnx.Module], opt_state, data_state, meta):
    args = {k: ocp.args.StandardSave(params_of(m)) for k, m in modules.items()}
    args[OPT_ITEM] = ocp.args.StandardSave(opt_state)
    args[DATA_ITEM] = ocp.args.JsonSave(data_state)
    args[META_ITEM] = ocp.args.JsonSave(dict(meta or {}))
    mngr.save(step, args=ocp.args.Composite(**args))


def _leaf_shapes(tree) -> dict[str, tuple]:
    """{"embed/item/embedding": shape} for every array of a (metadata or abstract) tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        if parts and parts[-1] == "value":  # nnx Variables flatten to a `value` leaf.
            parts = parts[:-1]
        if hasattr(leaf, "shape"):
            out["/".join(parts)] = tuple(leaf.shape)
    return out


def _differences(mngr, step: int, targets: Mapping) -> tuple[list[str], list[str]]:
    """From one read of the step's metadata: (`item/path: checkpoint (..), config (..)` for
    every array whose shape differs, `item/path: not in the checkpoint` or `not in the model`
    for every array that only one side has)."""
    stored = mngr.item_metadata(step)
    shapes, other = [], []
    for item, target in targets.items():
        meta = stored.get(item) if stored is not None else None
        if meta is None:
            continue
        have, want = _leaf_shapes(meta), _leaf_shapes(target)
        shapes += [f"{item}/{n}: checkpoint {have[n]}, config {shape}"
                   for n, shape in want.items() if n in have and have[n] != shape]  # fmt: skip
        other += [f"{item}/{n}: not in the checkpoint" for n in sorted(want.keys() - have.keys())]
        other += [f"{item}/{n}: not in the model" for n in sorted(have.keys() - want.keys())]
    return shapes, other


def restore(mngr, targets: Mapping, *, json_items=(), step: int | None = None):
    """(step, {item: restored}) from the newest readable step (or `step`).

    `targets` maps item names to abstract pytrees; `json_items` are restored as JSON.
    """
    where = pathlib.Path(str(mngr.directory))
    steps = [step] if step is not None else sorted(mngr.all_steps(), reverse=True)
    if not steps:
        raise CheckpointError(
            f"no checkpoint under {where}. Fix: run the stage that writes it first "
            "(--mode=all runs every stage in order)"
        )
    args = {k: ocp.args.StandardRestore(v) for k, v in targets.items()}
    args |= {k: ocp.args.JsonRestore() for k in json_items}
    for s in steps:
        try:
            mismatches, other = _differences(mngr, s, targets)
        except Exception as e:  # Unreadable metadata: the step is damaged.
            _warn_bad(where, s, e)
            continue
        if mismatches:
            raise CheckpointError(
                f"checkpoint step {s} under {where} was written with another model config: "
                + "; ".join(mismatches[:3])
                + ". Fix: use the config it was trained with, or a new --workdir"
            )
        try:
            return s, mngr.restore(s, args=ocp.args.Composite(**args))
        except Exception as e:  # Truncated or corrupt arrays: try an older step.
            if other:  # Unless it was written by another version of the model.
                raise CheckpointError(
                    f"checkpoint step {s} under {where} was written by another version of "
                    "the model: " + "; ".join(other[:3]) + ". Fix: restore it with the code "
                    "and config that wrote it, or retrain that stage in a new --workdir"
                ) from e
            _warn_bad(where, s, e)
    raise CheckpointError(
        f"no readable checkpoint under {where} (tried steps {steps}). Fix: delete the "
        "directory to retrain that stage from scratch"
    )


def _warn_bad(where, step, error):
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    print(
        f"WARNING: checkpoint step {step} under {where} is unreadable "
        f"({type(error).__name__}: {first}); falling back to an earlier step",
        file=sys.stderr,
        flush=True,
    )


def restore_module(directory, name: str, module: nnx.Module, step: int | None = None) -> int:
    """Restore one named item (e.g. the frozen summarizer) into `module`; returns its step."""
    directory = pathlib.Path(directory).absolute()
    if not directory.is_dir():
        raise CheckpointError(
            f"no checkpoint directory {directory}. Fix: run the stage that writes it first "
            "(--mode=all runs every stage in order)"
        )
    with ocp.CheckpointManager(
        directory, item_names=(name,), item_handlers={name: ocp.StandardCheckpointHandler()}
    ) as mngr:
        step, restored = restore(mngr, {name: abstract(params_of(module))}, step=step)
    nnx.update(module, restored[name])
    return step


def read_meta(directory) -> dict:
    """The `meta` item of the newest step under `directory` ({} when there is none)."""
    directory = pathlib.Path(directory).absolute()
    if not directory.is_dir():
        return {}
    handlers = {META_ITEM: ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(directory, item_names=(META_ITEM,), item_handlers=handlers) as m:
        if m.latest_step() is None:
            return {}
        _, restored = restore(m, {}, json_items=(META_ITEM,))
    return dict(restored[META_ITEM] or {})

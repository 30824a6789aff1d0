"""Multi-process (multi-host) runs under `jax.distributed`: the one place that knows of them.

A run of N processes (one per host, or one per GPU) calls `initialize` first; every other
module asks this one for the process index and count, and for the few collective steps a
run needs (docs/MULTIHOST.md):

  * `batch_shard(mesh)`: which contiguous block of every global batch this process feeds
    (its devices' rows of the mesh's `data` axis); `vista_jax.data.inputs.batched` reads only
    that block of the example stream, and `global_batch` assembles the global `jax.Array`
    from the blocks (`jax.make_array_from_process_local_data`).
  * `primary_first(fn)`: process 0 runs `fn` (e.g. a dataset build) before the others reuse
    its result.
  * `broadcast_text`, `barrier` and `ProcessGroup` (the collectives a cache build shares:
    `vista_jax.store_group`).

A single process never calls `jax.distributed.initialize`, and every helper here is then a
no-op: the single-process path is the N = 1 case of the same code.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from vista_jax import sharding
from vista_jax.errors import ConfigError

T = TypeVar("T")
_MAX_TEXT_BYTES = 1 << 16  # broadcast/gather payloads are fixed-size byte arrays


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    """How to join a multi-process run (run.py's flags of the same names).

    `enabled` with nothing else lets `jax.distributed.initialize` detect the cluster (SLURM,
    Open MPI, Cloud TPU, Kubernetes) and read `JAX_COORDINATOR_ADDRESS`; explicit values
    override what it detects. Giving any value enables it.
    """

    enabled: bool = False
    coordinator_address: str | None = None  # host:port of process 0's coordinator
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None  # devices this process drives (GPUs)
    initialization_timeout_s: int = 300

    @property
    def requested(self) -> bool:
        explicit = (self.coordinator_address, self.num_processes, self.process_id)
        return self.enabled or any(v is not None for v in explicit) or bool(self.local_device_ids)


def initialize(options: DistributedOptions) -> bool:
    """Joins the multi-process run `options` asks for; returns whether one was joined.

    Must run before anything touches a JAX backend. CPU collectives use gloo (the loopback
    tests and CPU clusters); GPU and TPU backends bring their own.
    """
    if not options.requested:
        return False
    _check(options)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=options.coordinator_address,
        num_processes=options.num_processes,
        process_id=options.process_id,
        local_device_ids=list(options.local_device_ids) if options.local_device_ids else None,
        initialization_timeout=options.initialization_timeout_s,
    )
    return True


def _check(options: DistributedOptions) -> None:
    n, i = options.num_processes, options.process_id
    if n is not None and n < 1:
        raise ConfigError(f"--num_processes must be >= 1, got {n}. Fix: give the process count")
    if i is not None and (i < 0 or (n is not None and i >= n)):
        raise ConfigError(
            f"--process_id must lie in [0, num_processes={n}), got {i}. "
            "Fix: number the processes 0..N-1"
        )
    address = options.coordinator_address
    if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
        raise ConfigError(
            f"--coordinator_address must be host:port, got {address!r}. "
            "Fix: e.g. --coordinator_address=10.0.0.1:1234 (process 0's host)"
        )


# -- who am I ---------------------------------------------------------------------------------
def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_primary() -> bool:
    """Process 0: the one that writes shared files (stages.json, results.json, manifests)."""
    return jax.process_index() == 0


# -- collectives (no-ops in one process) ------------------------------------------------------
def barrier(name: str) -> None:
    """Waits until every process reached the barrier of this `name`."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _to_bytes(text: str) -> np.ndarray:
    raw = text.encode()
    if len(raw) + 4 > _MAX_TEXT_BYTES:
        raise ValueError(f"collective payload of {len(raw)} bytes exceeds {_MAX_TEXT_BYTES - 4}")
    buf = np.zeros(_MAX_TEXT_BYTES, np.uint8)
    buf[:4] = np.frombuffer(np.uint32(len(raw)).tobytes(), np.uint8)
    buf[4 : 4 + len(raw)] = np.frombuffer(raw, np.uint8)
    return buf


def _from_bytes(buf) -> str:
    buf = np.asarray(buf, np.uint8)
    size = int(np.frombuffer(buf[:4].tobytes(), np.uint32)[0])
    return buf[4 : 4 + size].tobytes().decode()


def broadcast_text(text: str) -> str:
    """Process 0's `text`, on every process (the others' arguments are ignored)."""
    if jax.process_count() == 1:
        return text
    return _from_bytes(multihost_utils.broadcast_one_to_all(_to_bytes(text)))


def gather_text(text: str) -> list[str]:
    """Every process's `text`, in process order, on every process."""
    if jax.process_count() == 1:
        return [text]
    stacked = np.asarray(multihost_utils.process_allgather(_to_bytes(text)))
    return [_from_bytes(row) for row in stacked]


def primary_first(fn: Callable[[], T], name: str = "primary_first") -> T:
    """`fn()` on process 0, then on the others (which then find what it built, e.g. a
    dataset directory, instead of racing to build it)."""
    if jax.process_count() == 1:
        return fn()
    result = fn() if is_primary() else None
    barrier(f"{name}:built")
    return result if is_primary() else fn()


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """The processes of this run as `vista_jax.store_group` sees them (JSON payloads)."""

    index: int
    count: int

    def broadcast(self, payload: dict) -> dict:
        return json.loads(broadcast_text(json.dumps(payload)))

    def gather(self, payload: dict) -> list[dict]:
        return [json.loads(t) for t in gather_text(json.dumps(payload))]


def process_group() -> ProcessGroup:
    return ProcessGroup(jax.process_index(), jax.process_count())


# -- batches ----------------------------------------------------------------------------------
def batch_shard(mesh: Mesh) -> tuple[int, int]:
    """(index, count): this process feeds block `index` of `count` equal, contiguous blocks of
    every global batch: the rows its devices hold under the batch sharding.

    (0, 1) in one process. Processes whose devices hold the same rows (a `model` axis across
    hosts) feed the same block.
    """
    rows = mesh.shape["data"]
    held = sharding.batch_sharding(mesh).addressable_devices_indices_map((rows,)).values()
    starts = sorted({index[0].indices(rows)[0] for index in held})
    size = len(starts)
    if starts != list(range(starts[0], starts[0] + size)) or starts[0] % size or rows % size:
        raise ConfigError(
            f"this process holds rows {starts} of the mesh's {rows} `data` rows, not one "
            "contiguous block. Fix: order the mesh devices by process (sharding.make_mesh)"
        )
    return starts[0] // size, rows // size


def global_batch(batch, batch_sharding: NamedSharding):
    """This process's block of a batch -> the global batch, a `jax.Array` per leaf sharded
    by `batch_sharding` (in one process, the batch itself, placed)."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding, np.asarray(x)), batch
    )

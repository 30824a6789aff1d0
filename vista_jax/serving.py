"""Serving: score requests from a downstream ranker and one pinned summary-store version.

A request is `(user_ids [B], candidate_ids [B, C] or [C][, recent events])`. The scorer reads
each user's newest cache row (one `SummaryStore.read_quantized` per request: int8 and scales,
dequantized on device inside the ranker's compiled call) and never a user's event record, so
its cost does not depend on how long the history is. The recent events (stage 2's raw input,
fresher than the summary) come with the request, as the batch fields
`recent_item / recent_action / recent_gap [B, R']` and `recent_len [B]`
(`vista_jax.data.examples.recent_arrays` builds them from a user's last R + 1 events).

A user whose row is absent from the version is scored from the recent events alone, by the
`recent_only` ranker (or, without one, by the downstream ranker with its summary masked), and
flagged in `ScoredRequests.recent_only`. The version is pinned: by default the one the
downstream checkpoint was trained on, never whatever CURRENT names at the time.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vista_jax import cache, checkpoints, pipeline
from vista_jax.config import ExperimentConfig, from_config_dict
from vista_jax.data.datasets import SequenceData
from vista_jax.errors import CheckpointError, RequestError
from vista_jax.models.ranker import Ranker
from vista_jax.quantize import decode
from vista_jax.store import SummaryStore, SummaryStoreError
from vista_jax.train import model_dir

RECENT_KEYS = ("recent_item", "recent_action", "recent_gap", "recent_len")
FALLBACKS = ("recent_only", "masked")  # How users without a summary are scored.


@dataclasses.dataclass(frozen=True)
class ServingIndex:
    """What serving needs of a dataset: ids, item categories and each user's newest cache row.

    No event record: a scorer built from it cannot read the raw history.
    """

    num_items: int
    item_category: np.ndarray  # [I+1] category of each item (0 = padding / unknown)
    user_rows: np.ndarray  # [U] int64: the row of the user's newest snapshot; -1 if none
    config_hash: str  # Summarizer config + data: what the store must have been built from.

    @property
    def num_users(self) -> int:
        return len(self.user_rows)

    @property
    def num_categories(self) -> int:
        return int(self.item_category.max(initial=0))

    @classmethod
    def from_data(cls, config: ExperimentConfig, data: SequenceData) -> ServingIndex:
        counts = np.diff(data.row_offsets)
        return cls(
            num_items=data.num_items,
            item_category=np.asarray(data.item_category, np.int32),
            user_rows=np.where(counts > 0, data.row_offsets[1:] - 1, -1).astype(np.int64),
            config_hash=cache.cache_hash(config.summarizer_for(data), data),
        )


@dataclasses.dataclass(frozen=True)
class ScoredRequests:
    """Scores of one request batch, and how each user was scored."""

    logits: np.ndarray  # [B, C] float32
    recent_only: np.ndarray  # [B] bool: no summary in this version; scored from recent events
    coverage: np.ndarray  # [B] int64: events the user's summary covers (0 when recent_only)
    version: str  # The store version the summaries came from.

    @property
    def probabilities(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits))


class Scorer:
    """Scores candidates from cached summaries and recent events; see the module docstring."""

    def __init__(
        self,
        ranker: Ranker,
        store: SummaryStore,
        index: ServingIndex,
        fallback: Ranker | None = None,
    ):
        if ranker.cfg.summary_dim != store.d:
            raise CheckpointError(
                f"the downstream ranker reads {ranker.cfg.summary_dim}-wide summaries but store "
                f"version {store.version!r} holds {store.d}-wide ones. Fix: serve the version "
                "the ranker was trained on"
            )
        self.ranker_config = ranker.cfg
        self.store = store
        self.index = index
        table = jnp.asarray(index.item_category, jnp.int32)  # One device copy, both rankers.
        self._forward = request_forward(ranker, table)
        self._fallback = request_forward(fallback, table) if fallback is not None else None

    @classmethod
    def load(
        cls,
        config,
        workdir,
        data: SequenceData | ServingIndex,
        *,
        version: str | None = None,
        fallback: str = "recent_only",
    ) -> Scorer:
        """The `downstream` ranker of `workdir` on a pinned version of its cache.

        `version` defaults to the one the ranker was trained on. `fallback` scores users
        without a summary with the `recent_only` ranker, or (`"masked"`) with the downstream
        ranker and no summary tokens.
        """
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        config = from_config_dict(config)
        index = data if isinstance(data, ServingIndex) else ServingIndex.from_data(config, data)
        directory = pathlib.Path(workdir).absolute() / "downstream"
        meta = checkpoints.read_meta(directory)
        if not meta:
            raise CheckpointError(
                f"no downstream checkpoint under {directory}. Fix: train it first "
                "(--mode=train_ranker)"
            )
        store = _open_pinned(cache.cache_root(workdir, config.cache.root), version, meta, directory)
        _check_lineage(store, index, meta, directory)
        ranker = _restore(config, index, directory, store.d)
        other = None
        if fallback == "recent_only":
            other = _restore(config, index, directory.parent / "recent_only", 0)
        return cls(ranker, store, index, other)

    def score(self, user_ids, candidate_ids, recent: Mapping | None = None) -> ScoredRequests:
        """Logits [B, C] for each user's candidates; see `ScoredRequests`."""
        users = _user_ids(user_ids, self.index)
        items = _candidate_ids(candidate_ids, len(users), self.index)
        rows = self.index.user_rows[users]
        read = self.store.read_quantized(np.maximum(rows, 0))  # int8 + scales: decoded on device
        present = read.present & (rows >= 0)
        request = self._recent_request(recent, len(users)) | {
            "cand_item": items,
            "summary_values": read.values,
            "summary_mask": present,
        }
        if read.scale is not None:
            request["summary_scale"] = read.scale
        logits = np.array(self._forward(request))  # A writable host copy.
        if self._fallback is not None and not present.all():
            logits[~present] = self._score_absent(request, np.flatnonzero(~present))
        coverage = np.where(present, read.coverage, 0)
        return ScoredRequests(logits, ~present, coverage, self.store.version)

    def _score_absent(self, request: dict, absent: np.ndarray) -> np.ndarray:
        """The fallback's logits for the rows without a summary only, padded to a power of two
        of rows (a few compiled shapes, whatever the number absent)."""
        size = 1 << (len(absent) - 1).bit_length()
        rows = np.concatenate([absent, np.full(size - len(absent), absent[0])])
        sub = {k: np.asarray(v)[rows] for k, v in request.items()}
        return np.asarray(self._fallback(sub))[: len(absent)]

    def _recent_request(self, recent: Mapping | None, b: int) -> dict[str, np.ndarray]:
        """The ranker's recent-event ids, right-padded to R with padding zeroed; zeros when
        not given. Checked on the host, in one pass over the three id arrays."""
        cfg = self.ranker_config
        if recent is None:
            recent = {k: np.zeros((b, 0), np.int32) for k in RECENT_KEYS[:3]}
            recent["recent_len"] = np.zeros((b,), np.int32)
        arrays = _recent_arrays(recent, b, cfg.num_recent)
        ids = np.stack([arrays[k] for k in RECENT_KEYS[:3]])  # [3, B, W]
        valid = np.arange(ids.shape[2]) < arrays["recent_len"][:, None]
        ids = np.where(valid, ids, 0)  # Padding is ignored, whatever it holds.
        low = np.array([1, 0, 0])[:, None, None]
        high = np.array([cfg.num_items, cfg.num_actions - 1, cfg.num_gap_buckets - 1])
        if (valid & ((ids < low) | (ids > high[:, None, None]))).any():
            for key, x, lo, hi in zip(RECENT_KEYS[:3], ids, low.ravel(), high, strict=True):
                _check_range(key, x[valid], int(lo), int(hi))  # Names the first bad array.
        ids = np.pad(ids, [(0, 0), (0, 0), (0, cfg.num_recent - ids.shape[2])]).astype(np.int32)
        out = dict(zip(RECENT_KEYS[:3], ids, strict=True))
        out["recent_len"] = arrays["recent_len"].astype(np.int32)
        return out


def request_forward(model: Ranker, item_category) -> Callable[[dict], jax.Array]:
    """`request -> logits [B, C]`, one jit for this model (its structure closed over, so
    nothing is hashed per call). A request holds ids and the summaries as stored
    (`summary_values`, `summary_scale` for int8): dequantization and the item -> category
    lookups of candidates and recent events run on device, in the same compiled call.
    `item_category` may be a device array already (shared by several rankers)."""
    graphdef, params = nnx.split(model)
    table = jnp.asarray(item_category, jnp.int32)

    @jax.jit
    def forward(params, table, request):
        batch = dict(request)
        batch["summary"] = decode(batch.pop("summary_values"), batch.pop("summary_scale", None))
        batch["cand_category"] = table[batch["cand_item"]]
        batch["recent_category"] = table[batch["recent_item"]]
        return nnx.merge(graphdef, params)(batch)[0]

    return lambda request: forward(params, table, request)


# -- loading ----------------------------------------------------------------------------------
def _open_pinned(root: str, version: str | None, meta: dict, directory) -> SummaryStore:
    pinned = version or meta.get("cache_version")
    if pinned is None:
        raise CheckpointError(
            f"the downstream checkpoint under {directory} does not name the cache version it "
            "was trained on. Fix: pass version=<id> (a version of the same summarizer)"
        )
    try:
        return SummaryStore.open(root, version=pinned)
    except SummaryStoreError as e:
        if version is not None:
            raise
        raise SummaryStoreError(
            f"the downstream checkpoint under {directory} was trained on cache version "
            f"{pinned!r}, which cannot be opened: {e} (keep it when collecting garbage: "
            "keep=...; or retrain the ranker on the current cache, --mode=train_ranker)"
        ) from e


def _check_lineage(store: SummaryStore, index: ServingIndex, meta: dict, directory) -> None:
    """The version must come from the summarizer the ranker was trained on, and index the
    data (users, rows) the index describes."""
    built = store.manifest["config_hash"]
    trained = meta.get("config_hash")
    if trained is not None and trained != built:
        raise CheckpointError(
            f"the downstream checkpoint under {directory} was trained on summaries with "
            f"config_hash {trained!r} (version {meta.get('cache_version')!r}), but store "
            f"version {store.version!r} was built with {built!r}. Fix: serve a version built "
            "by the same summarizer, or retrain the ranker on this one (--mode=train_ranker)"
        )
    if index.config_hash != built:
        raise SummaryStoreError(
            f"store version {store.version!r} was built with config_hash {built!r}, but the "
            f"config and data given describe {index.config_hash!r}: its rows index other "
            "users or another summarizer. Fix: load the scorer with the config and data the "
            "cache was built from"
        )


def _restore(config: ExperimentConfig, index: ServingIndex, directory, dim: int) -> Ranker:
    ranker = pipeline.build_ranker(config, index, dim, 0)
    # The step evaluate scores: the validation-selected one (best/) under early stopping.
    checkpoints.restore_module(model_dir(directory), "ranker", ranker)
    return ranker


# -- request checks ---------------------------------------------------------------------------
def _integers(name: str, x, ndim: tuple[int, ...]) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim not in ndim or not (np.issubdtype(x.dtype, np.integer) or x.size == 0):
        raise RequestError(
            f"{name} must be a {' or '.join(f'{n}-D' for n in ndim)} integer array, got "
            f"{x.dtype} of shape {x.shape}. Fix: pass dense integer ids"
        )
    return x.astype(np.int64)


def _check_range(name: str, x: np.ndarray, low: int, high: int) -> None:
    bad = np.flatnonzero((x < low) | (x > high))
    if len(bad):
        raise RequestError(
            f"{name} holds {len(bad)} value(s) outside [{low}, {high}], e.g. {x.flat[bad[0]]} "
            f"at flat position {bad[0]}. Fix: map raw ids to the dense ids the model was "
            "trained on (docs/ARCHITECTURE.md, Id conventions)"
        )


def _user_ids(user_ids, index: ServingIndex) -> np.ndarray:
    users = _integers("user_ids", user_ids, (1,))
    _check_range("user_ids", users, 0, index.num_users - 1)
    return users


def _candidate_ids(candidate_ids, b: int, index: ServingIndex) -> np.ndarray:
    """[B, C] candidate ids; a [C] vector is every user's candidates."""
    items = _integers("candidate_ids", candidate_ids, (1, 2))
    if items.ndim == 1:
        items = np.broadcast_to(items, (b, len(items)))
    if items.shape[0] != b:
        raise RequestError(
            f"candidate_ids has {items.shape[0]} rows for {b} users. Fix: one row per user, "
            "or one [C] vector for all"
        )
    _check_range("candidate_ids", items, 1, index.num_items)
    return items.astype(np.int32)


def _recent_arrays(recent: Mapping, b: int, r: int) -> dict[str, np.ndarray]:
    missing = [k for k in RECENT_KEYS if k not in recent]
    if missing:
        raise RequestError(f"recent events lack {missing}. Fix: pass all of {RECENT_KEYS}")
    out = {k: _integers(k, recent[k], (2,)) for k in RECENT_KEYS[:3]}
    out["recent_len"] = _integers("recent_len", recent["recent_len"], (1,))
    width = out["recent_item"].shape[1]
    for k, x in out.items():
        if x.shape != ((b, width) if k != "recent_len" else (b,)):
            raise RequestError(
                f"{k} has shape {x.shape}, expected {(b, width) if k != 'recent_len' else (b,)}"
                f" ({b} users, {width} recent events). Fix: one row per user"
            )
    if width > r:
        raise RequestError(
            f"recent events are {width} wide; the ranker reads at most {r}. Fix: pass each "
            f"user's last {r} events, left aligned"
        )
    _check_range("recent_len", out["recent_len"], 0, width)
    return out

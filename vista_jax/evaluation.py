"""Scoring held-out requests and reporting: metrics per model, the results file and table.

Ranking requests are scored on their labelled candidates (AUC, log loss, NE). Retrieval
requests are scored against the whole catalog: every item, with its category, is a
candidate; items in the request's history window are excluded from the ranking, except the
target itself.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from vista_jax import metrics
from vista_jax.data.datasets import SequenceData

RETRIEVAL_KS = (10, 50, 200)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, batch):
    """One compile per model structure and batch shape, reused by every validation pass."""
    logits, _ = nnx.merge(graphdef, params)(batch)
    return logits


def jitted_forward(model: nnx.Module) -> Callable[[dict], jax.Array]:
    """`batch -> logits` of `model`, jitted (parameters are arguments, not constants; the
    compile is shared by every model of the same structure and batch shape)."""
    graphdef, params = nnx.split(model)
    return lambda batch: _forward(graphdef, params, batch)


def predict_batches(model: nnx.Module, batches: Iterable[dict], to_device=lambda b: b):
    """Yields (host batch, logits as numpy) for every batch, with one jitted forward."""
    forward = jitted_forward(model)
    for batch in batches:
        yield batch, np.asarray(forward(to_device(batch)))


def score(data: SequenceData, model, batches: Iterable[dict], prep: Callable) -> dict:
    if data.spec.task == "ranking":
        return score_ranking(model, batches, prep)
    return score_retrieval(data, model, batches, prep)


@dataclasses.dataclass(frozen=True)
class Predictions:
    """Every scored (unmasked) candidate of a ranking evaluation, in request order."""

    label: np.ndarray  # float [N]
    logit: np.ndarray  # float [N]
    user: np.ndarray  # int [N]: the request's user (the unit of a paired bootstrap)
    num_requests: int
    requests_per_s: float


def predict_ranking(model, batches, prep) -> Predictions:
    """The model's logit for every candidate, and the scoring speed.

    `requests_per_s` counts requests (rows with a candidate) scored per second of model
    forward passes after the first batch, so the compile is not in it (nan with one batch).
    """
    labels, logits, users, num_requests = [], [], [], 0
    timed_requests, t0 = 0, None
    for batch, out in predict_batches(model, batches, prep):
        rows = int(np.any(batch["cand_mask"], axis=1).sum())
        if t0 is None:
            t0 = time.monotonic()
        else:
            timed_requests += rows
        num_requests += rows
        mask = np.asarray(batch["cand_mask"], bool)
        labels.append(np.asarray(batch["cand_label"])[mask])
        logits.append(np.asarray(out)[mask])
        users.append(np.broadcast_to(np.asarray(batch["user"])[:, None], mask.shape)[mask])
    seconds = time.monotonic() - t0 if t0 is not None else 0.0
    return Predictions(
        label=np.concatenate(labels).astype(np.float64),
        logit=np.concatenate(logits).astype(np.float64),
        user=np.concatenate(users).astype(np.int64),
        num_requests=num_requests,
        requests_per_s=timed_requests / seconds if timed_requests else float("nan"),
    )


def ranking_scores(p: Predictions) -> dict[str, float]:
    """AUC, log loss, NE, base rate and count over the candidates, and the scoring speed."""
    out = metrics.binary_metrics(p.label, p.logit)
    return out | {"num_requests": p.num_requests, "requests_per_s": p.requests_per_s}


def score_ranking(model, batches, prep) -> dict[str, float]:
    return ranking_scores(predict_ranking(model, batches, prep))


def score_retrieval(data: SequenceData, model, batches, prep) -> dict[str, float]:
    catalog = np.arange(1, data.num_items + 1, dtype=np.int32)

    catalog_category = data.item_category[catalog].astype(np.int32)

    def with_catalog(b):
        shape = (len(b["user"]), len(catalog))
        return prep(b) | {  # Candidates carry their features, as in training.
            "cand_item": np.broadcast_to(catalog, shape),
            "cand_category": np.broadcast_to(catalog_category, shape),
        }

    ranks = []
    for batch, out in predict_batches(model, batches, with_catalog):
        # Catalog columns are item ids 1..I; the mask's column 0 (padding) is dropped.
        seen = metrics.seen_mask(batch["seen_item"], data.num_items + 1)[:, 1:]
        ranks.append(metrics.rank_of_target(out, batch["target_item"] - 1, seen))
    return metrics.ranking_metrics(np.concatenate(ranks), ks=RETRIEVAL_KS)


TABLE_SKIP = ("num_requests", "count", "base_rate")  # Shown in the header, not per model.


def results_table(results: dict) -> str:
    """The printed table: a header naming split and request count, then a row per model.

    Columns are the scalar metrics; a model's training record (`train`) adds its epochs and
    training examples/s.
    """
    first = next(iter(results["models"].values()))
    names = [k for k, v in first.items() if k not in TABLE_SKIP and not isinstance(v, dict)]
    extra = (
        ("epochs", "examples_per_s")
        if any("train" in m for m in results["models"].values())
        else ()
    )
    lines = [
        f"{results['split']} split, {results['num_requests']} requests, cache "
        f"{results['cache']['version']} ({results['cache']['quantization']})",
        f"{'model':<24} " + " ".join(f"{n[:14]:>14}" for n in names + list(extra)),
    ]

    def show(v):
        if v is None:
            return f"{'-':>14}"
        v = float(v)
        return f"{v:>14.0f}" if abs(v) >= 100 or (v.is_integer() and abs(v) > 1) else f"{v:>14.4f}"

    for model, m in results["models"].items():
        train = m.get("train", {})
        cells = [show(m.get(n)) for n in names] + [show(train.get(n)) for n in extra]
        lines.append(f"{model:<24} " + " ".join(cells))
    if "oracle_auc" in results:
        lines.append(f"{'oracle':<24} {results['oracle_auc']:>8.4f}")
    return "\n".join(lines)


def json_safe(obj):
    """NaN and infinities become null: strict JSON readers (and report scripts) accept it."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating) and not np.isfinite(obj):
        return None
    return obj


def write_json(path, obj) -> None:
    """Written whole, then renamed: a reader never sees a half-written file."""
    path = pathlib.Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=1, default=float))
    tmp.replace(path)


def read_json(path) -> dict:
    return json.loads(pathlib.Path(path).read_text())


def write_npz(path, arrays: dict) -> None:
    """Compressed, written whole, then renamed: a kill mid-write leaves the previous file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


class CandidateLogits(NamedTuple):
    """Every model's logits on one set of candidates (what a paired test needs)."""

    label: np.ndarray  # [N]
    user: np.ndarray  # [N]: the unit a paired bootstrap resamples
    logits: dict[str, np.ndarray]  # model -> [N]


def same_candidates(a, b) -> bool:
    """Whether two scorings (`Predictions` or `CandidateLogits`) are of the same candidates:
    labels and users equal, in the same order."""
    return np.array_equal(a.label, b.label) and np.array_equal(a.user, b.user)


def shared_candidates(predictions: dict[str, Predictions]) -> CandidateLogits:
    """The models' predictions as one `CandidateLogits`; a ValueError naming the model when
    they were not all scored on the same candidates (labels and users in the same order)."""
    first = next(iter(predictions.values()))
    for name, p in predictions.items():
        if not same_candidates(p, first):
            raise ValueError(f"{name} was not scored on the same candidates as the others")
    return CandidateLogits(first.label, first.user, {n: p.logit for n, p in predictions.items()})


def write_predictions(path, scored: CandidateLogits) -> None:
    """npz arrays `label`, `user` and `logit.<model>` (atomically)."""
    logits = {f"logit.{name}": logit for name, logit in scored.logits.items()}
    write_npz(path, {"label": scored.label, "user": scored.user} | logits)


def read_predictions(path) -> CandidateLogits:
    """What `write_predictions` wrote."""
    with np.load(path) as f:
        logits = {k.removeprefix("logit."): f[k] for k in f.files if k.startswith("logit.")}
        return CandidateLogits(f["label"], f["user"], logits)

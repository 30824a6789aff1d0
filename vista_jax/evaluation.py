"""Scoring held-out requests and reporting: metrics per model, the results file and table.

Ranking requests are scored on their labelled candidates (AUC, log loss, NE). Retrieval
requests are scored against the whole catalog: every item, with its category, is a
candidate; items in the request's history window are excluded from the ranking, except the
target itself.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Iterable

import jax
import numpy as np
from flax import nnx

from vista_jax import metrics
from vista_jax.data.datasets import SequenceData

RETRIEVAL_KS = (10, 50, 200)


def jitted_forward(model: nnx.Module) -> Callable[[dict], jax.Array]:
    """`batch -> logits` of `model`, jitted once (parameters are arguments, not constants)."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, batch):
        logits, _ = nnx.merge(graphdef, params)(batch)
        return logits

    return lambda batch: forward(params, batch)


def predict_batches(model: nnx.Module, batches: Iterable[dict], to_device=lambda b: b):
    """Yields (host batch, logits as numpy) for every batch, with one jitted forward."""
    forward = jitted_forward(model)
    for batch in batches:
        yield batch, np.asarray(forward(to_device(batch)))


def score(data: SequenceData, model, batches: Iterable[dict], prep: Callable) -> dict:
    if data.spec.task == "ranking":
        return score_ranking(model, batches, prep)
    return score_retrieval(data, model, batches, prep)


def score_ranking(model, batches, prep) -> dict[str, float]:
    labels, logits, masks = [], [], []
    for batch, out in predict_batches(model, batches, prep):
        labels.append(batch["cand_label"])
        logits.append(out)
        masks.append(batch["cand_mask"])
    return metrics.binary_metrics(
        np.concatenate(labels), np.concatenate(logits), np.concatenate(masks)
    )


def history_exclusion(seen_item_BxW: np.ndarray, target_B: np.ndarray, num_items: int):
    """[B, I] mask of catalog items to leave out: the history window, but never the target."""
    b = len(target_B)
    seen = np.zeros((b, num_items), bool)
    rows = np.repeat(np.arange(b), seen_item_BxW.shape[1])
    cols = seen_item_BxW.reshape(-1) - 1
    keep = cols >= 0
    seen[rows[keep], cols[keep]] = True
    seen[np.arange(b), target_B - 1] = False
    return seen


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
        seen = history_exclusion(batch["seen_item"], batch["target_item"], data.num_items)
        ranks.append(metrics.rank_of_target(out, batch["target_item"] - 1, seen))
    return metrics.ranking_metrics(np.concatenate(ranks), ks=RETRIEVAL_KS)


def results_table(results: dict) -> str:
    """The printed table: a header naming split and request count, then a row per model."""
    names = [k for k in next(iter(results["models"].values())) if k != "num_requests"]
    lines = [
        f"{results['split']} split, {results['num_requests']} requests, cache "
        f"{results['cache']['version']} ({results['cache']['quantization']})",
        f"{'model':<24} " + " ".join(f"{n:>8}" for n in names),
    ]
    show = lambda v: f"{int(v):>8d}" if float(v).is_integer() and abs(v) > 1 else f"{v:>8.4f}"  # noqa: E731
    for model, m in results["models"].items():
        lines.append(f"{model:<24} " + " ".join(show(m[n]) for n in names))
    if "oracle_auc" in results:
        lines.append(f"{'oracle':<24} {results['oracle_auc']:>8.4f}")
    return "\n".join(lines)


def write_json(path, obj) -> None:
    """Written whole, then renamed: a reader never sees a half-written file."""
    path = pathlib.Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    tmp.replace(path)


def read_json(path) -> dict:
    return json.loads(pathlib.Path(path).read_text())

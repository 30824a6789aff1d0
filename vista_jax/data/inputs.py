"""Input wiring: which requests each split holds, as grain datasets (training) or lists.

Training streams are `grain.MapDataset`s (shuffled, repeated, with a resumable iterator
state that the trainer checkpoints); evaluation requests are plain lists in a fixed order.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import numpy as np

from vista_jax.data import examples as ex
from vista_jax.data.datasets import SequenceData

# Host-side keys that never reach the device: bookkeeping for joins and evaluation.
_HOST_ONLY = ("seen_item", "snapshot")


def is_eval_user(user: int, data: SequenceData) -> bool:
    """Ranking task: a fixed 1 in `eval_every` users is held out (never trained on)."""
    return user % data.config.eval_every == 0


def train_examples(data: SequenceData, seed: int, with_history: bool = True) -> grain.MapDataset:
    """An endless shuffled stream of training examples (with sampled negatives/candidates).

    `with_history=False` is the cache-fed (downstream) stream: no example slices the
    summarizer's window out of the record; otherwise the examples are the same, draw for draw.
    """
    spec = data.spec
    if spec.task == "ranking":
        users = np.array([u for u in range(data.num_users) if not is_eval_user(u, data)])
        ds = grain.MapDataset.source(users).shuffle(seed=seed).repeat()
        return ds.random_map(
            lambda u, rng: ex.ranking_example(
                data.source[int(u)], spec, int(u), data.item_category, rng, with_history
            ),
            seed=seed,
        )
    pairs = ex.retrieval_requests(data.lengths, "train")
    ds = grain.MapDataset.source(pairs).shuffle(seed=seed).repeat()
    return ds.random_map(
        lambda p, rng: ex.retrieval_example(
            data.source[int(p[0])],
            spec,
            int(p[1]),
            int(data.row_offsets[p[0]]),
            data.item_category,
            rng,
            with_history,
        ),
        seed=seed,
    )


def eval_examples(data: SequenceData, split: str = "test") -> list[dict[str, np.ndarray]]:
    """The requests of a held-out split, in user order.

    Retrieval: one request per user with at least 3 events (shorter users cannot give a
    train, a validation and a test event and are left out); `max_eval_users` keeps the first N
    of those requests.
    """
    spec = data.spec
    if spec.task == "ranking":
        return [
            ex.ranking_example(data.source[u], spec, u, data.item_category)
            for u in range(data.num_users)
            if is_eval_user(u, data)
        ]
    pairs = ex.retrieval_requests(data.lengths, split)
    if data.config.max_eval_users:
        pairs = pairs[: data.config.max_eval_users]
    return [
        ex.retrieval_example(
            data.source[int(u)], spec, int(t), int(data.row_offsets[u]), data.item_category, None
        )
        for u, t in pairs
    ]


def batches(items: list, size: int) -> Iterator[dict[str, np.ndarray]]:
    for i in range(0, len(items), size):
        yield ex.stack(items[i : i + size])


def model_inputs(batch: dict, drop_history: bool = False) -> dict:
    """The keys a model reads; `drop_history` leaves out the raw history (cache-fed models)."""
    skip = ("hist_",) if drop_history else ()
    return {k: v for k, v in batch.items() if not k.startswith(skip) and k not in _HOST_ONLY}

"""Input wiring: which requests each split holds, as grain datasets (training) or lists.

Training streams are `grain.MapDataset`s (shuffled, repeated, with a resumable iterator
state that the trainer checkpoints); evaluation requests are plain lists in a fixed order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grain
import numpy as np

from vista_jax.data import examples as ex
from vista_jax.data.datasets import SequenceData
from vista_jax.errors import ConfigError

# Host-side keys that never reach the device: bookkeeping for joins and evaluation.
_HOST_ONLY = ("seen_item", "snapshot")


def is_eval_user(user: int, data: SequenceData, split: str = "test") -> bool:
    """Synthetic ranking: a fixed 1 in `eval_every` users is held out (never trained on) as
    test (u % eval_every == 0); validation is the next one (u % eval_every == 1)."""
    return user % data.config.eval_every == (1 if split == "valid" else 0)


def _train_users(data: SequenceData, hold_out_valid: bool) -> np.ndarray:
    """Synthetic ranking: the users trained on (neither test nor, if asked, validation)."""
    held = ("test", "valid") if hold_out_valid else ("test",)
    users = range(data.num_users)
    return np.array([u for u in users if not any(is_eval_user(u, data, s) for s in held)])


def _spec(data: SequenceData, live: bool, with_history: bool = True) -> ex.ExampleSpec:
    if live and not with_history:
        raise ValueError("a live stream is for raw-history models: it needs with_history=True")
    return dataclasses.replace(data.spec, live=True) if live else data.spec


def train_examples(
    data: SequenceData,
    seed: int,
    with_history: bool = True,
    *,
    live: bool = False,
    hold_out_valid: bool = False,
) -> grain.MapDataset:
    """An endless shuffled stream of training examples (with sampled negatives/candidates).

    Three readers, one stream: the source model's examples (`hist_*` is the snapshot's
    window); `live` for the raw-history baselines (`hist_*` ends at the request); and
    `with_history=False` for cache-fed (downstream) models: no example slices the
    summarizer's window out of the record, and otherwise the examples are the same, draw for
    draw. `hold_out_valid` (synthetic, with early stopping): the validation users are not
    trained on either; event logs never train on their validation events.
    """
    spec = _spec(data, live, with_history)
    if spec.requests == "every_event":
        pairs = ex.event_requests(data.lengths, data.split_bounds, "train")
        ds = grain.MapDataset.source(pairs).shuffle(seed=seed).repeat()
        return ds.map(lambda p: _event_example(data, spec, p, with_history))
    if spec.task == "ranking":
        ds = grain.MapDataset.source(_train_users(data, hold_out_valid)).shuffle(seed=seed).repeat()
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


def _event_example(
    data: SequenceData, spec: ex.ExampleSpec, pair, with_history: bool = True
) -> dict[str, np.ndarray]:
    u, t = int(pair[0]), int(pair[1])
    offset = int(data.row_offsets[u])
    return ex.event_example(data.source[u], spec, t, offset, data.item_category, with_history)


def num_train_requests(data: SequenceData, hold_out_valid: bool = False) -> int:
    """Distinct training requests (one epoch); synthetic counts users."""
    if data.spec.requests == "every_event":
        return len(ex.event_requests(data.lengths, data.split_bounds, "train"))
    if data.spec.task == "ranking":
        return len(_train_users(data, hold_out_valid))
    return len(ex.retrieval_requests(data.lengths, "train"))


def eval_examples(
    data: SequenceData, split: str = "test", live: bool = False
) -> list[dict[str, np.ndarray]]:
    """The requests of a held-out split, in user order.

    Retrieval: one request per user with at least 3 events (shorter users cannot give a
    train, a validation and a test event and are left out); `max_eval_users` keeps the first N
    of those requests. Event-log ranking: every event of the split; `max_eval_users` keeps the
    requests of the first N users that have any.
    """
    spec = _spec(data, live)
    if spec.requests == "every_event":
        pairs = ex.event_requests(data.lengths, data.split_bounds, split)
        if data.config.max_eval_users:
            users = np.unique(pairs[:, 0])[: data.config.max_eval_users]
            pairs = pairs[np.isin(pairs[:, 0], users)]
        return [_event_example(data, spec, p) for p in pairs]
    if spec.task == "ranking":
        return [
            ex.ranking_example(data.source[u], spec, u, data.item_category)
            for u in range(data.num_users)
            if is_eval_user(u, data, split)
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


def batches(items: list, size: int, pad: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Stacked batches of `size`; `pad` fills the last one up to `size` with copies of its
    last request whose candidates are masked out (ranking: one compiled shape, same metrics)."""
    for i in range(0, len(items), size):
        chunk = items[i : i + size]
        if pad and len(chunk) < size:
            filler = chunk[-1] | {"cand_mask": np.zeros_like(chunk[-1]["cand_mask"])}
            chunk = chunk + [filler] * (size - len(chunk))
        yield ex.stack(chunk)


def batched(ds: grain.MapDataset, batch_size: int, shard: tuple[int, int] = (0, 1)):
    """Global batches of `batch_size` from an example stream; with `shard` = (index, count)
    (`vista_jax.distributed.batch_shard`), only block `index` of `count` contiguous blocks of
    each, which this process feeds.

    Global batch g holds stream elements [g*B, (g+1)*B) whatever the process count, so
    N processes train on the examples one process would, in the same order; each reads only
    its own. The iterator state counts global batches: a run resumes under another count.
    """
    index, count = shard
    if batch_size % count:
        raise ConfigError(
            f"batch size {batch_size} does not split over {count} input shards (processes). "
            f"Fix: use a batch size divisible by {count}"
        )
    if count == 1:
        return ds.batch(batch_size)
    return ds.batch(batch_size // count)[index::count]


def model_inputs(batch: dict, drop_history: bool = False) -> dict:
    """The keys a model reads; `drop_history` leaves out the raw history (cache-fed models)."""
    skip = ("hist_",) if drop_history else ()
    return {k: v for k, v in batch.items() if not k.startswith(skip) and k not in _HOST_ONLY}

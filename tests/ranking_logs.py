"""Small random event logs under the pipeline's ranking split, shared by the position tests.

Users of the given lengths, their events interleaved in time (so the global time cutoffs fall
at different places for each), ratings 1-5 (label = rating >= 4), 20% validation and 20% test.
"""

import numpy as np

from vista_jax.data import datasets, eventlog, sequences


def ranking_log(lengths, num_items, time_span, window, prefix, categories=None):
    """(event log, labels, split bounds, `sequences.event_ranking` rows). With `categories`,
    item i has category `categories[i % len(categories)]` ("" = unknown)."""
    rng = np.random.default_rng(0)
    n = sum(lengths)
    user = np.repeat(np.arange(len(lengths)), lengths)
    item = rng.integers(1, num_items + 1, n)
    category = None if categories is None else np.array(categories)[item % len(categories)]
    time = np.concatenate([np.sort(rng.choice(time_span, k, replace=False)) for k in lengths])
    rating = rng.integers(1, 6, n).astype(float)
    log = eventlog.from_columns(user=user, item=item, time=time, rating=rating, category=category)
    cfg = datasets.DataConfig(
        kind="table", task="ranking", path="<test>", history_window=window, num_recent=window,
        valid_fraction=0.2, test_fraction=0.2,
    )  # fmt: skip
    times = np.split(np.asarray(log.time, np.int64), log.user_offsets[1:-1])
    bounds = datasets.split_bounds(times, cfg)
    labels = datasets.event_labels(log, cfg)
    return log, labels, bounds, sequences.event_ranking(log, labels, bounds, window, prefix)

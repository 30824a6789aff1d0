"""Event ranking scored at every position (`sequences.event_ranking`, `sequential_ranking`).

The rows score every request of the pipeline's time split exactly once, with its label and
the events before it as history; a position's logit reads nothing of the event it scores
(its rating is the label) or of any later event; a downstream ranker on the int8 cache equals
the source on int8 summaries.
"""

import numpy as np
import pytest
from flax import nnx
from ranking_logs import ranking_log

from vista_jax import retrieval_cache, sequential_ranking
from vista_jax.data import examples, sequences
from vista_jax.data.features import NUM_ACTIONS
from vista_jax.errors import DataError
from vista_jax.models.sequential import build_encoder, preset

NUM_ITEMS, WINDOW, PREFIX, EVERY, SEEDS = 15, 8, 6, 4, 3
LENGTHS = [1, 2, 5, 8, 9, 23, 40]  # One event only, short, window-sized, lifelong.


@pytest.fixture(scope="module")
def data():
    return ranking_log(LENGTHS, NUM_ITEMS, 10_000, WINDOW, PREFIX)


def test_row_starts_score_every_event_once():
    for n in range(1, 60):
        scored = []
        for a, first in sequences.ranking_row_starts(n, WINDOW):
            scored += [a + p + 1 for p in range(first, WINDOW) if a + p + 1 < n]
            assert first == 0 or first == WINDOW // 2
        assert scored == list(range(1, n)), n


def test_rows_score_each_request_of_the_split_once_with_its_label_and_history(data):
    log, labels, bounds, splits = data
    offsets, item, action = log.user_offsets, np.asarray(log.item), np.asarray(log.action)
    time = np.asarray(log.time, np.int64) - np.min(log.time)
    for split in ("train", "valid", "test"):
        rows, seen = getattr(splits, split), []
        for r in range(len(rows["item"])):
            u, a = int(rows["user"][r]), int(rows["start"][r])
            lo = int(offsets[u])
            for p in np.flatnonzero(rows["target"][r] > 0):
                t = a + p + 1
                seen.append((u, t))
                assert rows["target"][r, p] == item[lo + t]
                assert rows["label"][r, p] == labels[lo + t]
                assert rows["next_time"][r, p] == time[lo + t]  # When the request happens.
                # History: the window's events a..t-1, then the P events before the window.
                np.testing.assert_array_equal(rows["item"][r, : p + 1], item[lo + a : lo + t])
                np.testing.assert_array_equal(rows["action"][r, : p + 1], action[lo + a : lo + t])
                np.testing.assert_array_equal(rows["time"][r, : p + 1], time[lo + a : lo + t])
                before = item[lo + max(0, a - PREFIX) : lo + a]
                np.testing.assert_array_equal(rows["prefix"][r, : len(before)], before)
                assert not rows["prefix"][r, len(before) :].any()
                assert p + 1 >= min(t, WINDOW // 2)  # At least W/2 window events (or all).
        lengths = np.diff(offsets)
        want = [(int(u), int(t)) for u, t in examples.event_requests(lengths, bounds, split)]
        assert sorted(seen) == [ut for ut in want if ut[1] > 0], split  # Event 0: no history.


def _ranker(name, source="live"):
    sizes = dict(d_model=8, attn_dim=8, linear_dim=8, ffn_hidden=8, max_len=WINDOW)
    vista = dict(num_seeds=SEEDS, snapshot_every=EVERY, num_recent=WINDOW)
    cfg = preset(name, NUM_ITEMS, summary_source=source, num_actions=NUM_ACTIONS, **sizes, **vista)
    rngs = nnx.Rngs(0)
    return sequential_ranking.PositionRanker(build_encoder(cfg, rngs), rngs)


@pytest.mark.parametrize("name", ["sasrec", "hstu", "vista_hstu"])
def test_a_position_reads_nothing_of_the_event_it_scores_or_later(data, name):
    _, _, _, splits = data
    batch = dict(splits.train)
    if not name.startswith("vista"):
        batch = {k: v for k, v in batch.items() if k not in ("prefix", "prefix_action")}
    model = _ranker(name)
    logits = np.asarray(model(batch))
    rng = np.random.default_rng(1)
    full = np.flatnonzero(np.all(batch["item"] > 0, axis=1))
    r = int(full[0])
    for p in range(WINDOW - 1):
        changed = {k: v.copy() for k, v in batch.items()}
        # Event start + p + 1 (the one scored at p: its rating is the label) and all later.
        changed["item"][r, p + 1 :] = rng.integers(1, NUM_ITEMS + 1, WINDOW - p - 1)
        changed["action"][r, p + 1 :] = rng.integers(1, 6, WINDOW - p - 1)
        changed["time"][r, p + 1 :] += 1000
        changed["next_time"][r, p + 1 :] += 1000
        changed["label"][r, p + 1 :] = 1 - changed["label"][r, p + 1 :]
        after = np.asarray(model(changed))
        np.testing.assert_allclose(after[r, : p + 1], logits[r, : p + 1], rtol=1e-5, atol=1e-5)
        assert not np.allclose(after[r, p + 1 :], logits[r, p + 1 :])  # Later ones did change.


def test_downstream_on_the_int8_cache_equals_the_source_on_int8_summaries(data, tmp_path):
    _, _, _, splits = data
    source = _ranker("vista_hstu")
    retrieval_cache.export(
        source.encoder, splits, tmp_path, version="v1", step=1, source={}, batch_size=4
    )
    shape = retrieval_cache.summary_shape(source.encoder.cfg)
    cached = retrieval_cache.attach(splits, tmp_path, *shape)
    downstream = _ranker("vista_hstu", source="cached")
    params = nnx.state(source, nnx.Param)
    nnx.update(downstream, params.filter(lambda path, _: "summarizer" not in path))
    source.encoder.quantize_summaries = True
    for name in ("train", "valid", "test"):
        live = getattr(splits, name)
        read = {k: v for k, v in getattr(cached, name).items() if "prefix" not in k}
        np.testing.assert_allclose(
            np.asarray(downstream(read)), np.asarray(source(live)), rtol=1e-4, atol=1e-4
        )


def test_the_loss_is_the_mean_over_scored_positions_only():
    logits = np.array([[2.0, -1.0, 5.0]], np.float32)
    label = np.array([[1.0, 0.0, 0.0]], np.float32)
    scored = np.array([[True, True, False]])
    loss, count = sequential_ranking.bce_loss(logits, label, scored)
    want = np.mean([np.log1p(np.exp(-2.0)), np.log1p(np.exp(-1.0))])
    assert float(count) == 2 and float(loss) == pytest.approx(want, rel=1e-5)


def test_a_log_too_short_for_every_split_is_refused(data):
    log, labels, bounds, _ = data
    with pytest.raises(DataError, match="no train and no valid request"):
        sequences.event_ranking(log, labels, np.zeros_like(bounds), WINDOW)

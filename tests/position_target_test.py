"""The request-form rankers scored at every position of event-ranking rows.

`sequential_ranking.PositionTargetRanker` scores every position of a row in one call; each
position's logit must equal the request form's (`FullTargetAttentionRanker`, SIM-hard, TWIN,
recent-N) on a request built directly from the user's events: the events before it, as far
back as the row reaches (its prefix and window), with the event's item as the candidate.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ranking_logs import ranking_log

from vista_jax import sequential_ranking
from vista_jax.config import RankerConfig
from vista_jax.data.features import gap_buckets
from vista_jax.models.ranker import Ranker
from vista_jax.models.sim import SimHardRanker
from vista_jax.models.target_attention import FullTargetAttentionRanker
from vista_jax.models.twin import TwinRanker

NUM_ITEMS, WINDOW, PREFIX, K = 20, 8, 6, 3
LENGTHS = [1, 2, 5, 9, 23, 40]  # One event only, short, window-sized, beyond the prefix.
RANKERS = {
    "full_attention": (FullTargetAttentionRanker, {}),
    "sim_hard": (SimHardRanker, {"top_k": K}),
    "twin": (TwinRanker, {"top_k": K}),
    "recent": (FullTargetAttentionRanker, {"recent": 4}),
}


@pytest.fixture(scope="module")
def data():
    categories = ["drama", "comedy", "horror", ""]  # Item i: categories[i % 4]; "" = unknown.
    log, _, _, rows = ranking_log(LENGTHS, NUM_ITEMS, 100_000, WINDOW, PREFIX, categories)
    return log, rows


def _rows(splits):
    """Every row of every split, one batch."""
    parts = [getattr(splits, s) for s in ("train", "valid", "test")]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _events(log):
    """Per-event item, action, gap bucket and category, flat over users."""
    return {
        "item": np.asarray(log.item),
        "action": np.asarray(log.action),
        "gap": gap_buckets(np.asarray(log.time, np.int64), log.user_offsets),
        "category": np.asarray(log.category),
    }


def test_rows_carry_each_input_events_gap_and_category(data):
    log, splits = data
    ev, offsets = _events(log), log.user_offsets
    assert log.num_categories == 3 and (ev["category"] == 0).any()
    rows = _rows(splits)
    for r in range(len(rows["item"])):
        lo, a = int(offsets[rows["user"][r]]), int(rows["start"][r])
        n = int(np.sum(rows["item"][r] > 0))
        p0 = max(0, a - PREFIX)
        for name in ("gap", "category"):
            np.testing.assert_array_equal(rows[name][r, :n], ev[name][lo + a : lo + a + n])
            np.testing.assert_array_equal(
                rows[f"prefix_{name}"][r, : a - p0], ev[name][lo + p0 : lo + a]
            )
        scored = np.flatnonzero(rows["target"][r])
        np.testing.assert_array_equal(
            rows["target_category"][r, scored], ev["category"][lo + a + scored + 1]
        )


def _direct_requests(log, rows):
    """(request batch with one candidate each, (row, position) of each) from the raw log."""
    ev, offsets = _events(log), log.user_offsets
    width = PREFIX + WINDOW
    hist = {name: [] for name in ev}
    lengths, cand, cand_category, where = [], [], [], []
    for r, p in zip(*np.nonzero(rows["target"]), strict=True):
        lo, a = int(offsets[rows["user"][r]]), int(rows["start"][r])
        t = a + p + 1  # The scored event; its history reaches back to the row's prefix.
        h0 = max(0, a - PREFIX)
        for name, x in ev.items():
            hist[name].append(np.pad(x[lo + h0 : lo + t], (0, width - (t - h0))))
        lengths.append(t - h0)
        cand.append([ev["item"][lo + t]])
        cand_category.append([ev["category"][lo + t]])
        where.append((r, p))
    batch = {f"hist_{name}": np.stack(x) for name, x in hist.items()}
    batch |= {"hist_len": np.array(lengths), "cand_item": np.array(cand)}
    batch["cand_category"] = np.array(cand_category)
    return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}, tuple(np.array(where).T)


@pytest.mark.parametrize("name", sorted(RANKERS))
@pytest.mark.parametrize("chunk", [5, 4096])
def test_every_position_equals_the_request_form_on_its_own_history(data, name, chunk):
    log, splits = data
    cls, kw = RANKERS[name]
    cfg = RankerConfig(
        num_items=NUM_ITEMS, num_categories=log.num_categories, d_model=8, num_heads=2,
        mlp_hidden=16,
    )  # fmt: skip
    ranker = cls(cfg, nnx.Rngs(0), chunk_size=chunk, **kw)
    rows = _rows(splits)
    got = np.asarray(sequential_ranking.PositionTargetRanker(ranker)(rows))
    requests, where = _direct_requests(log, rows)
    want = np.asarray(ranker(requests)[0][:, 0])
    assert len(want) == sum(LENGTHS) - len(LENGTHS)  # Every event but a first one.
    np.testing.assert_allclose(got[where], want, rtol=1e-5, atol=1e-5)


def test_a_position_reads_no_later_event(data):
    """Changing every event after position p (and its candidate) leaves logit p unchanged."""
    log, splits = data
    cfg = RankerConfig(num_items=NUM_ITEMS, num_categories=3, d_model=8, mlp_hidden=16)
    model = sequential_ranking.PositionTargetRanker(FullTargetAttentionRanker(cfg, nnx.Rngs(1)))
    rows = _rows(splits)
    base = np.asarray(model(rows))
    p = WINDOW // 2
    later = np.arange(WINDOW) > p
    changed = dict(rows)
    for name in ("item", "action", "gap", "category", "target", "target_category"):
        changed[name] = np.where(later, (rows[name] + 1) % 3 + 1, rows[name])
    got = np.asarray(model(changed))
    np.testing.assert_allclose(got[:, : p + 1], base[:, : p + 1], rtol=1e-6, atol=1e-6)
    assert not np.allclose(got[:, p + 1 :], base[:, p + 1 :])


# dim 0: no summaries, the recent-only ranker; lag: the staleness ablation (in snapshots).
@pytest.mark.parametrize("dim, lag", [(6, 0), (0, 0), (6, 2)])
def test_vista_stage2_at_every_position_equals_the_ranker_on_its_request(data, dim, lag):
    """PositionSummaryRanker: position p = `Ranker` on snapshot (p+1)//S's tokens (with a
    lag, max(0, (p+1)//S - lag)'s) and the last R events before the scored event."""
    log, splits = data
    every, num_seeds, r = 4, 2, 3
    rows = {k: v for k, v in _rows(splits).items() if not k.startswith("prefix")}
    n, j = len(rows["item"]), WINDOW // every + 1
    rng = np.random.default_rng(3)
    rows["summary_values"] = rng.normal(size=(n, j, num_seeds, 6)).astype(np.float32)
    cfg = RankerConfig(
        num_items=NUM_ITEMS, num_categories=log.num_categories, d_model=8, num_heads=2,
        num_layers=2, mlp_hidden=16, num_recent=r, summary_dim=dim,
    )  # fmt: skip
    ranker = Ranker(cfg, nnx.Rngs(2))
    got = np.asarray(sequential_ranking.PositionSummaryRanker(ranker, every, lag)(rows))
    ev, offsets = _events(log), log.user_offsets
    requests, where = {f"recent_{name}": [] for name in ev}, []
    summaries, lengths, cand, cand_category, inexact = [], [], [], [], 0
    for row, p in zip(*np.nonzero(rows["target"]), strict=True):
        lo, a = int(offsets[rows["user"][row]]), int(rows["start"][row])
        t = a + p + 1
        h0 = max(0, t - r)
        for name, x in ev.items():
            requests[f"recent_{name}"].append(np.pad(x[lo + h0 : lo + t], (0, r - (t - h0))))
        lengths.append(t - h0)
        summaries.append(rows["summary_values"][row, max(0, (p + 1) // every - lag)])
        inexact += bool(a > 0 and (p + 1) // every < lag)  # Asked older than the row holds.
        cand.append([ev["item"][lo + t]])
        cand_category.append([ev["category"][lo + t]])
        where.append((row, p))
    batch = {k: jnp.asarray(np.stack(v), jnp.int32) for k, v in requests.items()}
    batch |= {
        "recent_len": jnp.asarray(lengths, jnp.int32),
        "cand_item": jnp.asarray(cand, jnp.int32),
        "cand_category": jnp.asarray(cand_category, jnp.int32),
    }
    if dim:
        batch |= {"summary": jnp.asarray(np.stack(summaries)),
                  "summary_mask": jnp.ones(len(lengths), bool)}  # fmt: skip
    want = np.asarray(ranker(batch)[0][:, 0])
    np.testing.assert_allclose(got[tuple(np.array(where).T)], want, rtol=1e-5, atol=1e-5)
    count = sequential_ranking.stale_inexact(rows["start"], rows["target"] > 0, every, lag)
    assert count == inexact and (lag == 0 or 0 < inexact < len(where))
    if lag:  # Stale summaries change the scores.
        fresh = np.asarray(sequential_ranking.PositionSummaryRanker(ranker, every)(rows))
        assert not np.allclose(fresh[tuple(np.array(where).T)], want, atol=1e-4)

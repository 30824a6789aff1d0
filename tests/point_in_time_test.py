"""Point in time by event time: `cache.as_of(store, data, user, t)` never sees an event at or
after t, and sees every event before it (a snapshot, then the raw events since).

The rows are built by the cache build's own code (`cache.row_blocks`, which stamps each row
with its last covered event's time) over event logs full of timestamp ties, with a
"summarizer" whose summary is the number of events it read, so the test can tell which
snapshot a read returned.
"""

import numpy as np
import pytest
import tensorstore as ts

from vista_jax import cache
from vista_jax.data import examples as ex
from vista_jax.data.datasets import SequenceData
from vista_jax.store import NO_EVENTS, SummaryStore, SummaryStoreError

K, D, W = 2, 3, 64


def _sequence_data(num_users=12, seed=0) -> SequenceData:
    rng = np.random.default_rng(seed)
    spec = ex.ExampleSpec(
        task="retrieval", history_window=W, num_recent=4, snapshot_every=3, num_items=50
    )
    records = []
    for u in range(num_users):
        n = int(rng.integers(4, 40))
        # Steps of 0 make ties: several events in one second, as in ML-1M's ratings.
        time = 1_000 + np.cumsum(rng.choice([0, 0, 1, 7], n)).astype(np.int64)
        records.append(
            {
                "user": np.int64(u),
                "item": rng.integers(1, 51, n).astype(np.int32),
                "action": np.ones(n, np.int32),
                "time": time,
                "category": np.zeros(n, np.int32),
            }
        )
    lengths = np.array([len(r["item"]) for r in records])
    counts = [len(ex.snapshot_positions(int(n), spec)) for n in lengths]
    return SequenceData(
        source=records,
        config=None,
        spec=spec,
        num_users=num_users,
        num_items=50,
        lengths=lengths,
        item_category=np.zeros(51, np.int32),
        row_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        fingerprint="test",
    )


def _count_events(hist):
    """A stand-in summarizer: every summary value is the number of events it read."""
    n = np.asarray(hist["hist_len"], np.float32)
    return np.broadcast_to(n[:, None, None], (len(n), K, D)).copy(), None


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data = _sequence_data()
    root = str(tmp_path_factory.mktemp("pit") / "cache")
    SummaryStore.write_version(
        root, version="v1", summaries=cache.row_blocks(data, _count_events, 8),
        num_rows=data.num_rows, config_hash="c", summarizer_step=1, quantization="none",
        context=ts.Context(),
    )  # fmt: skip
    return data, SummaryStore.open(root, context=ts.Context())


def _assert_point_in_time(store, data, user, t):
    got = cache.as_of(store, data, user, t)
    times = data.source[user]["time"]
    seen = np.concatenate([times[: got.covered], got.since["time"]])
    assert np.all(seen < t), f"user {user} at {t}: saw an event at or after t"
    before = int(np.sum(times < t))
    assert got.covered + len(got.since["time"]) == before  # nothing before t is missing
    np.testing.assert_array_equal(
        got.since["item"], data.source[user]["item"][got.covered : before]
    )
    # The newest snapshot: no snapshot of the schedule covering only events before t is larger.
    usable = [s for s in data.snapshots(user) if s == 0 or times[s - 1] < t]
    assert got.covered == max(usable)
    np.testing.assert_array_equal(got.summary, np.full((K, D), min(got.covered, W), np.float32))
    assert got.event_time == (times[got.covered - 1] if got.covered else NO_EVENTS)
    return got


def test_no_request_sees_its_own_label_or_any_event_at_or_after_it(built):
    """Every leave-one-out request (train, valid, test) at its label's time."""
    data, store = built
    ties_refused = 0
    for split in ex.SPLITS:
        for user, t_pos in ex.retrieval_requests(data.lengths, split):
            times = data.source[user]["time"]
            label_time = int(times[t_pos])
            got = _assert_point_in_time(store, data, user, label_time)
            assert got.covered + len(got.since["time"]) <= t_pos  # the label is not seen
            positions = data.snapshots(user)
            by_position = int(positions[ex.snapshot_for(t_pos, positions)])
            ties_refused += by_position > got.covered  # a tie with the label's time
    # The data has ties: a join by position alone would have shown events at the label's
    # time to some requests, and as_of refused them.
    assert ties_refused > 0


def test_any_time_between_before_and_after_the_events(built):
    data, store = built
    for user in range(data.num_users):
        times = data.source[user]["time"]
        for t in [times[0] - 5, times[0], *(times + 1), times[-1] + 10**6]:
            _assert_point_in_time(store, data, user, int(t))


def test_rows_are_stamped_and_the_version_has_a_watermark(built):
    data, store = built
    newest = max(int(data.source[u]["time"][s - 1]) for u in range(data.num_users)
                 for s in data.snapshots(u) if s)  # fmt: skip
    assert store.watermark == newest
    user = 3
    rows = np.arange(data.row_offsets[user], data.row_offsets[user + 1])
    stamps = store.read_quantized(rows).event_time
    times = data.source[user]["time"]
    expected = [times[s - 1] if s else NO_EVENTS for s in data.snapshots(user)]
    np.testing.assert_array_equal(stamps, expected)


def test_as_of_refuses_rows_without_stamps(tmp_path):
    data = _sequence_data(num_users=2)
    root = str(tmp_path / "cache")
    SummaryStore.write_version(
        root, version="v1", summaries=np.zeros((data.num_rows, K, D), np.float32),
        coverage=np.zeros(data.num_rows, np.int64), config_hash="c", summarizer_step=1,
    )  # fmt: skip
    with pytest.raises(SummaryStoreError, match="event-time stamp"):
        cache.as_of(SummaryStore.open(root), data, 0, 2_000)


@pytest.mark.parametrize("count, chunk_rows", [(2, 4), (3, 5), (4, 64)])
def test_row_blocks_of_process_shares_make_the_whole_build(count, chunk_rows):
    """A multi-host build's processes each summarize `store_group.row_range` (shares cut
    inside a user's rows too); together they give every row once, as one process does."""
    from vista_jax import store_group

    data = _sequence_data()

    def rows_of(blocks):
        out = {}
        for b in blocks:
            for i, row in enumerate(b.row_ids.tolist()):
                out[row] = (b.summaries[i, 0, 0], b.coverage[i], b.event_time[i])
        return out

    whole = rows_of(cache.row_blocks(data, _count_events, 8))
    parts = [
        rows_of(cache.row_blocks(data, _count_events, 8, rows))
        for rows in (
            store_group.row_range(data.num_rows, chunk_rows, i, count) for i in range(count)
        )
    ]
    assert sum(len(p) for p in parts) == len(whole) == data.num_rows
    assert {row: v for p in parts for row, v in p.items()} == whole

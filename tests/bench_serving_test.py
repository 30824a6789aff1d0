"""The serving benchmark at a tiny size: the record's shape, and what each path reads (full
target attention one event record per request, VISTA none). No wall-clock asserts."""

import json

import numpy as np
import pytest

from experiments.bench import serving

LATENCY_KEYS = {"p50_ms", "p99_ms", "mean_ms", "qps_batch1", "requests", "records_read",
                "events_read", "qps", "batch", "batch_p50_ms", "batches"}  # fmt: skip


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    cfg = serving.ServeBenchConfig(
        lengths=(100, 200), full_ta_length=200, users=2, candidates=4, k=2, d=4,
        rounds=3, vista_per_round=2, warmup=1, batch=3, batch_rounds=2,
    )  # fmt: skip
    return cfg, serving.measure(cfg, tmp_path_factory.mktemp("data"))


def test_record_has_the_issue_fields_and_is_json(record):
    cfg, out = record
    assert json.loads(json.dumps(out)) == out
    assert LATENCY_KEYS <= set(out["vista"]) and LATENCY_KEYS <= set(out["full_ta"])
    assert {"read_p50_ms", "input_p50_ms", "forward_p50_ms"} <= set(out["full_ta"])
    assert set(out["vista_by_length"]) == {"100", "200"}
    # VISTA at full TA's length: its batch-1 latencies, plus the batched throughput.
    assert out["vista_by_length"]["200"].items() <= out["vista"].items()
    assert out["qps_ratio_batch1"] == pytest.approx(
        out["vista"]["qps_batch1"] / out["full_ta"]["qps_batch1"]
    )
    assert out["vista"]["batch"] == out["full_ta"]["batch"] == cfg.batch
    assert out["vista"]["batches"] == cfg.batch_rounds * cfg.vista_per_round
    assert out["full_ta"]["batches"] == cfg.batch_rounds
    assert out["p50_ratio_full_ta_over_vista"] == pytest.approx(
        out["full_ta"]["p50_ms"] / out["vista"]["p50_ms"]
    )
    assert out["qps_ratio_vista_over_full_ta"] == pytest.approx(
        out["vista"]["qps"] / out["full_ta"]["qps"]
    )
    by_length = out["vista_by_length"]
    assert out["vista_p50_ratio_1m_over_1k"] == pytest.approx(
        by_length["200"]["p50_ms"] / by_length["100"]["p50_ms"]
    )
    assert out["full_ta"]["requests"] == cfg.rounds
    assert by_length["100"]["requests"] == cfg.rounds * cfg.vista_per_round
    assert out["config"]["summarizer"]["num_seeds"] == cfg.k
    assert out["config"]["ranker"]["summary_dim"] == cfg.d
    assert out["config"]["candidates"] == 4 and "load_avg" in out["config"]


def test_full_ta_reads_each_users_record_and_vista_reads_none(record):
    cfg, out = record
    num_recent = out["config"]["num_recent"]
    assert out["full_ta"]["records_read"] == cfg.rounds  # One record per request...
    # ... of the whole history and the recent events (the record's length).
    assert out["full_ta"]["events_read"] == cfg.rounds * (200 + num_recent)
    for length in ("100", "200"):
        assert out["vista_by_length"][length]["records_read"] == 0
        assert out["vista_by_length"][length]["events_read"] == 0


def test_batches_take_users_in_turn_with_their_own_inputs():
    reqs = [
        serving.Request(np.array([u]), np.full((1, 2), 10 * u, np.int32),
                        {k: np.full((1, 3), u) for k in serving.RECENT_KEYS})
        for u in range(3)
    ]  # fmt: skip
    out = serving.batched(reqs, 4)
    assert len(out) == 3
    assert out[1].users.tolist() == [1, 2, 0, 1]
    assert out[1].candidates[:, 0].tolist() == [10, 20, 0, 10]
    assert out[2].recent["recent_item"].shape == (4, 3)
    assert out[2].recent["recent_len"][:, 0].tolist() == [2, 0, 1, 2]


def test_counting_source_counts_records_and_events():
    count = serving.ReadCount()
    source = serving.CountingSource([{"item": [1, 2, 3]}, {"item": [4]}], count)
    read = serving.counted(lambda u: {"total": 0.0, "n": len(source[u]["item"])}, count)
    assert read(0) == {"total": 0.0, "n": 3, "records": 1, "events": 3}
    assert read(1)["events"] == 1 and (count.records, count.events) == (2, 4)

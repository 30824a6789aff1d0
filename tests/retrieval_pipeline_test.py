"""The retrieval protocol end to end on real data (ML-100K) and on a CSV event log."""

import numpy as np
from data_env import real_data_dir

from experiments.eventlog import config as eventlog_config
from experiments.ml1m import config as ml1m_config
from vista_jax import pipeline


def _check(results):
    for name in ("vista_source", "vista_downstream", "recent_only"):
        m = results["models"][name]
        assert {"hr@10", "ndcg@10", "hr@200", "mrr"} <= set(m)
        assert 0.0 <= m["hr@10"] <= m["hr@50"] <= m["hr@200"] <= 1.0 and np.isfinite(m["mrr"])


def test_ml100k_retrieval_pipeline(tmp_path):
    config = ml1m_config.get_config("tiny")
    config.data.path = str(real_data_dir("ml-100k"))
    results = pipeline.train_and_evaluate(config, tmp_path, "all")
    _check(results)
    assert results["num_requests"] == 100


def test_csv_event_log_pipeline(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["user,item,timestamp,rating,category"]
    for user in range(30):
        for t in range(int(rng.integers(5, 40))):
            item = int(rng.integers(1, 60))
            rows.append(f"u{user},i{item},{1000 + 10 * t},{rng.integers(1, 6)},g{item % 5}")
    path = tmp_path / "events.csv"
    path.write_text("\n".join(rows) + "\n")
    config = eventlog_config.get_config("tiny")
    config.data.path = str(path)
    config.data.snapshot_every = 8
    _check(pipeline.train_and_evaluate(config, tmp_path / "work", "all"))

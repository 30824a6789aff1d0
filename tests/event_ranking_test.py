"""Ranking on an event log: labels, time splits, point-in-time requests, early stopping, and
one tiny end-to-end run of `experiments/eventlog/config.py:ranking,tiny`."""

import json

import grain
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.eventlog import config as eventlog_config
from vista_jax import pipeline, sharding
from vista_jax.config import EarlyStoppingConfig, TrainConfig
from vista_jax.data import datasets
from vista_jax.data import examples as ex
from vista_jax.train import BEST_DIR, EarlyStopping, fit, model_dir, passes_without_gain


def _data_cfg(**kw):
    return datasets.DataConfig(kind="table", history_window=4, num_recent=2, task="ranking", **kw)


def test_global_time_split_cuts_all_users_at_one_time_and_never_splits_a_tie():
    times = [np.array([1, 2, 3, 4, 5, 6, 7, 8]), np.array([5, 9, 9, 10])]  # 12 events
    bounds = datasets.split_bounds(times, _data_cfg())
    # 10% of 12 rounds to 1: the test cutoff is the latest time (10); validation starts at
    # the next-latest event's time (9), and both events at 9 go to validation.
    np.testing.assert_array_equal(bounds, [[8, 8], [1, 3]])
    lengths = np.array([8, 4])
    for split, want in [("train", [[0, t] for t in range(8)] + [[1, 0]]),
                        ("valid", [[1, 1], [1, 2]]), ("test", [[1, 3]])]:  # fmt: skip
        np.testing.assert_array_equal(ex.event_requests(lengths, bounds, split).tolist(), want)


def test_per_user_split_takes_each_users_last_events():
    times = [np.arange(10), np.arange(3)]
    bounds = datasets.split_bounds(times, _data_cfg(split="per_user"))
    np.testing.assert_array_equal(bounds, [[8, 9], [3, 3]])  # 0.1 * 3 rounds to 0


def test_splits_partition_every_event():
    rng = np.random.default_rng(0)
    times = [np.sort(rng.integers(0, 50, n)) for n in (1, 7, 30, 12)]
    lengths = np.array([len(t) for t in times])
    for split_kind in datasets.SPLITS:
        bounds = datasets.split_bounds(times, _data_cfg(split=split_kind))
        pairs = np.concatenate([ex.event_requests(lengths, bounds, s) for s in ex.EVENT_SPLITS])
        assert sorted(map(tuple, pairs.tolist())) == [
            (u, t) for u, n in enumerate(lengths) for t in range(n)
        ]


def _record(n=20, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "user": np.int64(2),
        "item": rng.integers(1, 30, n).astype(np.int32),
        "action": rng.integers(1, 6, n).astype(np.int32),
        "time": np.cumsum(rng.integers(1, 100, n)).astype(np.int64),
        "category": rng.integers(1, 4, n).astype(np.int32),
        "label": rng.integers(0, 2, n).astype(np.float32),
    }


SPEC = ex.ExampleSpec(task="ranking", history_window=6, num_recent=3, snapshot_every=4,
                      requests="every_event")  # fmt: skip


@pytest.mark.parametrize("live", [False, True])
def test_event_request_is_its_item_with_its_label_and_only_earlier_history(live):
    record, item_category = _record(), np.arange(30) % 4
    spec = ex.dataclasses.replace(SPEC, live=live)
    for t in range(20):
        e = ex.event_example(record, spec, t, 100, item_category)
        assert e["cand_item"].tolist() == [record["item"][t]]
        assert e["cand_label"].tolist() == [record["label"][t]]
        assert e["cand_category"].tolist() == [item_category[record["item"][t]]]
        s = int(e["snapshot"])
        assert s == t if live else (s <= t and s % 4 == 0 and t - s < 4)
        assert e["row"] == (-1 if live else 100 + s // 4)
        n_hist, n_rec = int(e["hist_len"]), int(e["recent_len"])
        assert n_hist == min(s, 6) and n_rec == min(t, 3)
        np.testing.assert_array_equal(e["hist_item"][:n_hist], record["item"][s - n_hist : s])
        np.testing.assert_array_equal(e["recent_action"][:n_rec], record["action"][t - n_rec : t])


def test_labels_come_from_the_label_column_else_the_rating_threshold():
    class Log:
        label, rating = None, np.array([1.0, 3.5, 4.0, 5.0])

    cfg = _data_cfg(positive_rating=4.0)
    np.testing.assert_array_equal(datasets.event_labels(Log, cfg), [0, 0, 1, 1])
    Log.label = np.array([1, 0, 0, 1])
    np.testing.assert_array_equal(datasets.event_labels(Log, cfg), [1, 0, 0, 1])


# -- early stopping ---------------------------------------------------------------------------
def test_early_stopping_keeps_the_best_and_counts_patience():
    es = EarlyStopping(EarlyStoppingConfig(eval_every=1, patience=2, min_delta=0.01))
    verdicts = [es.observe(s, {"auc": a}) for s, a in enumerate([0.6, 0.7, 0.705, 0.69], 1)]
    assert verdicts == [True, True, False, False] and es.stopped and es.best_step == 2
    es = EarlyStopping(EarlyStoppingConfig(eval_every=1, patience=1, metric="logloss"))
    assert es.observe(1, {"logloss": 0.5}) and es.observe(2, {"logloss": 0.4})
    assert not es.observe(3, {"logloss": 0.45}) and es.stopped


@pytest.mark.parametrize(
    "values, sign, min_delta, since",
    [
        ([], 1.0, 0.0, 0),
        ([0.6], 1.0, 0.0, 0),
        ([0.6, 0.7, 0.7], 1.0, 0.0, 1),  # A tie is no gain: the first of tied is the best.
        ([0.6, 0.7, 0.69, 0.71, 0.70, 0.70], 1.0, 0.0, 2),
        ([0.6, 0.7, 0.705, 0.709, 0.711], 1.0, 0.01, 0),  # Gains counted from the last gain.
        ([0.6, 0.7, 0.705, 0.709], 1.0, 0.01, 2),
        ([0.5, 0.4, 0.45, 0.41], -1.0, 0.0, 2),  # Lower is better (log loss).
    ],
)
def test_passes_without_gain_counts_from_the_best_pass(values, sign, min_delta, since):
    assert passes_without_gain(values, sign, min_delta) == since
    es = EarlyStopping(EarlyStoppingConfig(eval_every=1, patience=99, min_delta=min_delta,
                                           metric="auc" if sign > 0 else "logloss"))  # fmt: skip
    for step, v in enumerate(values):  # The incremental rule of `fit` is the same rule.
        es.observe(step, {es.cfg.metric: v})
    assert es.bad_passes == since


class _Scalar(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.zeros(()))


def _fit(workdir, script, num_steps=20):
    """Trains a scalar for up to num_steps; validation returns the scripted AUCs in turn."""
    calls = []

    def validate(modules):
        calls.append(float(modules["m"].w[...]))
        return {"auc": script[len(calls) - 1]}

    cfg = TrainConfig(batch_size=1, num_steps=num_steps, learning_rate=0.1, warmup_steps=1,
                      weight_decay=0.0, grad_clip=1.0, checkpoint_every=100,
                      keep_checkpoints=2)  # fmt: skip
    data = iter(grain.MapDataset.source(np.ones((4, 1), np.float32)).batch(1).repeat())
    mesh = sharding.make_mesh((1, 1), ("data", "model"))
    rules = (("batch", "data"),)
    _, report = fit({"m": _Scalar()}, lambda m, b: ((m["m"].w[...] - 3.0) ** 2, {}), data, cfg,
                    workdir, mesh, rules, validate=validate,
                    early_stopping=EarlyStoppingConfig(eval_every=2, patience=2))  # fmt: skip
    return report, calls


def test_fit_stops_after_patience_saves_the_best_step_and_stays_stopped(tmp_path):
    report, calls = _fit(tmp_path, [0.5, 0.6, 0.55, 0.58, 0.9])
    assert len(calls) == 4 and report["steps"] == 8  # passes at steps 2, 4, 6, 8; stop
    es = report["early_stopping"]
    assert es["best_step"] == 4 and es["stopped"] and es["history"][1] == [4, 0.6]
    assert model_dir(tmp_path) == (tmp_path / BEST_DIR).absolute()
    assert sorted(int(p.name) for p in (tmp_path / BEST_DIR).iterdir() if p.name.isdigit()) == [4]
    again, calls = _fit(tmp_path, [0.99])  # A rerun resumes the stopped state: no training.
    assert calls == [] and again["early_stopping"]["best_step"] == 4


def test_fit_without_improvement_runs_to_the_cap(tmp_path):
    report, calls = _fit(tmp_path, [0.5, 0.6, 0.7, 0.8, 0.9], num_steps=9)
    assert len(calls) == 5 and report["steps"] == 9 and not report["early_stopping"]["stopped"]
    assert report["early_stopping"]["best_step"] == 9  # the last step is always validated


# -- end to end -------------------------------------------------------------------------------
def _events_csv(path, users=24, events=30, seed=0):
    """Users with a planted taste (even or odd items) and ratings that follow it."""
    rng = np.random.default_rng(seed)
    lines = ["user,item,timestamp,rating,category"]
    for u in range(users):
        for j in range(events):
            item = int(rng.integers(1, 41))
            rating = 5 if (item + u) % 2 == 0 else int(rng.integers(1, 4))
            lines.append(f"u{u},{item},{1000 + 37 * j + u},{rating},c{item % 5}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_ranking(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rank")
    config = eventlog_config.get_config("ranking,tiny")
    config.data.path = str(_events_csv(tmp / "events.csv"))
    config.data.max_eval_users = 0
    config.source.num_steps = config.downstream.num_steps = 6
    config.source.batch_size = config.downstream.batch_size = 16
    config.early_stopping.update(eval_every=3, max_requests=40)
    return pipeline.train_and_evaluate(config, tmp / "work"), tmp / "work"


def test_results_json_has_every_model_with_metrics_cost_and_provenance(tiny_ranking):
    results, workdir = tiny_ranking
    assert json.loads((workdir / "results.json").read_text()) == results
    want = {"vista_source", "vista_source_on_cache", "vista_downstream", "recent_only",
            "full_attention", "sim_hard", "twin"}  # fmt: skip
    assert set(results["models"]) == want
    for m in results["models"].values():
        assert 0.0 <= m["auc"] <= 1.0 and m["logloss"] > 0 and m["ne"] > 0
        assert (
            m["num_requests"] == results["num_requests"] == results["dataset"]["requests"]["test"]
        )
        assert m["train"]["steps"] == 6 and m["train"]["epochs"] > 0
        assert [s for s, _ in m["train"]["valid_history"]] == [3, 6]
        assert m["train"]["examples_per_s"] > 0 and m["train"]["wall_s"] > 0
    paired = results["paired"]
    assert paired["reference"] == "vista_downstream" and set(paired["models"]) == want - {
        "vista_downstream"
    }
    for name, test in paired["models"].items():
        gap = results["models"]["vista_downstream"]["auc"] - results["models"][name]["auc"]
        assert test["diff"] == pytest.approx(gap, abs=1e-9)
        assert test["ci95"][0] <= test["ci95"][1] and 0 < test["p_value"] <= 1
        assert 1 < test["num_groups"] <= results["dataset"]["num_users"]
    prov = results["provenance"]
    assert prov["git_commit"] and prov["command"] and prov["early_stopping"]["eval_every"] == 3
    assert set(prov["stages"]) == set(pipeline.STAGES)

import dataclasses

import numpy as np
import pytest

from experiments.synthetic import config as synthetic_config
from vista_jax.config import from_config_dict
from vista_jax.data import synthetic as S

CFG = S.SyntheticConfig(num_users=8, history_len=1000, seed=3)
KEYS = {
    "user": (np.int64, ()),
    "item": (np.int32, (1032,)),
    "action": (np.int32, (1032,)),
    "time": (np.int64, (1032,)),
    "category": (np.int32, (1032,)),
    "cand_item": (np.int32, (32,)),
    "cand_label": (np.float32, (32,)),
    "cand_prob": (np.float32, (32,)),
}


def _eq(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_determinism_and_random_access():
    sweep = list(S.iter_users(CFG))
    assert len(sweep) == CFG.num_users
    again = list(S.iter_users(CFG))
    for a, b in zip(sweep, again, strict=True):
        _eq(a, b)
    # any user alone, in any order, equals the same user from the sweep
    for u in (5, 0, 7):
        _eq(S.generate_user(CFG, u), sweep[u])
    _eq(next(S.iter_users(CFG, start=6, stop=7)), sweep[6])
    assert [int(r["user"]) for r in S.iter_users(CFG, 2, 5)] == [2, 3, 4]


def test_different_seeds_differ():
    a = S.generate_user(CFG, 1)
    b = S.generate_user(dataclasses.replace(CFG, seed=4), 1)
    assert not np.array_equal(a["item"], b["item"])
    assert not np.array_equal(S.item_effects(CFG), S.item_effects(dataclasses.replace(CFG, seed=4)))
    # different users differ too
    assert not np.array_equal(a["item"], S.generate_user(CFG, 2)["item"])


def test_shapes_dtypes_ids():
    ni, nc = S.num_items(CFG), S.num_categories(CFG)
    assert ni == 16 * 64 and nc == 16
    for rec in S.iter_users(CFG):
        assert set(rec) == set(KEYS)
        for k, (dt, shape) in KEYS.items():
            assert np.asarray(rec[k]).dtype == dt, k
            assert np.shape(rec[k]) == shape, k
        for k in ("item", "cand_item"):
            assert rec[k].min() >= 1 and rec[k].max() <= ni
        assert rec["category"].min() >= 1 and rec["category"].max() <= nc
        np.testing.assert_array_equal(rec["category"], S.item_topic(CFG, rec["item"]) + 1)
        assert set(np.unique(rec["action"])) <= {1, 2}
        assert np.all(np.diff(rec["time"]) >= 0)
        assert rec["time"][0] > 1_000_000_000
        assert set(np.unique(rec["cand_label"])) <= {0.0, 1.0}
        assert np.all((rec["cand_prob"] > 0) & (rec["cand_prob"] < 1))


def test_planted_structure():
    cfg = dataclasses.replace(CFG, num_users=40, history_len=2000)
    n = cfg.history_len
    liked_interest = liked_noise = total_interest = total_noise = 0
    for rec in S.iter_users(cfg):
        ui = S.interests(cfg, int(rec["user"]))
        all_sets = np.concatenate([ui.dormant, ui.active, ui.returning, ui.decoy])
        assert len(np.unique(all_sets)) == len(all_sets)
        topic = rec["category"] - 1
        hist = topic[:n]
        share = np.bincount(hist, minlength=cfg.num_topics) / n
        # dormant: frequent over the whole history, absent after dormant_end (and in recent)
        assert ui.dormant_end == round(cfg.dormant_frac * n)
        late = topic[ui.dormant_end :]
        late_share = np.bincount(late, minlength=cfg.num_topics) / late.size
        noise_share = cfg.noise_frac / cfg.num_topics
        for t in ui.dormant:
            assert share[t] > 2.5 * noise_share
            assert late_share[t] < 2 * noise_share  # only background noise left
        early = topic[: ui.dormant_end]
        # dormant topics dominate the early part; decoys are noise-level everywhere
        early_share = np.bincount(early, minlength=cfg.num_topics) / early.size
        assert early_share[ui.dormant].min() > 4 * noise_share
        assert share[ui.decoy].max() < 2.5 * noise_share
        # active topics are present in the recent events
        assert np.isin(ui.active, topic[-cfg.num_recent :]).any()
        # returning topics: absent (noise level) between windows and at the end
        (a0, a1), (b0, b1) = ui.returning_windows
        for t in ui.returning:
            in_win = np.mean(hist[a0:a1] == t)
            gap = np.mean(hist[a1:b0] == t)
            assert in_win > 4 * noise_share and gap < 2 * noise_share
        # actions: interest events mostly liked, noise mostly disliked
        is_interest = np.isin(topic, np.concatenate([ui.dormant, ui.active, ui.returning]))
        liked = rec["action"] == 2
        liked_interest += liked[is_interest].sum()
        total_interest += is_interest.sum()
        liked_noise += liked[~is_interest].sum()
        total_noise += (~is_interest).sum()
    assert liked_interest / total_interest > 0.7
    assert liked_noise / total_noise < 0.25


def test_label_probabilities_follow_formula():
    cfg = CFG
    eff = S.item_effects(cfg)
    for u in range(cfg.num_users):
        rec, ui = S.generate_user(cfg, u), S.interests(cfg, u)
        t = S.item_topic(cfg, rec["cand_item"])
        recent = np.unique(rec["category"][-cfg.num_recent :] - 1)
        logit = (
            cfg.bias
            + cfg.w_dormant * np.isin(t, ui.dormant)
            + cfg.w_returning * np.isin(t, ui.returning)
            + cfg.w_active * (np.isin(t, ui.active) | np.isin(t, recent))
            + eff[rec["cand_item"] - 1]
        )
        np.testing.assert_allclose(rec["cand_prob"], 1 / (1 + np.exp(-logit)), rtol=1e-6)
    # about a third of candidates come from dormant topics
    srcs = [
        np.isin(S.item_topic(cfg, r["cand_item"]), S.interests(cfg, int(r["user"])).dormant)
        for r in S.iter_users(cfg)
    ]
    assert 0.15 < np.mean(np.concatenate(srcs)) < 0.5


def test_oracle_auc_and_long_range_gap():
    cfg = S.SyntheticConfig(num_users=500, history_len=2000, seed=0)
    rep = S.auc_report(cfg)
    assert 0.78 < rep["oracle_auc"] < 0.90, rep
    assert rep["oracle_auc"] - rep["recent_only_auc"] >= 0.05, rep
    assert S.oracle_auc(cfg, users=range(100)) == pytest.approx(
        S.auc_report(cfg, users=range(100))["oracle_auc"]
    )
    assert S.recent_only_oracle_auc(cfg, users=range(100)) < S.oracle_auc(cfg, users=range(100))


def test_history_count_predictor_gains_with_length_when_interests_are_sparse():
    """Sparse dormant interests: per-topic history counts tell more the longer the history,
    while what the recent events tell does not depend on the length."""
    reports = {
        n: S.auc_report(S.SyntheticConfig(num_users=300, history_len=n, dormant_weight=0.1))
        for n in (125, 2000)
    }
    short, long = reports[125], reports[2000]
    assert long["history_count_auc"] > short["history_count_auc"] + 0.05, reports
    assert abs(long["recent_only_auc"] - short["recent_only_auc"]) < 0.03, reports
    for rep in reports.values():
        assert rep["recent_only_auc"] < rep["history_count_auc"] <= rep["oracle_auc"], rep


@pytest.mark.parametrize("history_len", [S.MIN_HISTORY_LEN, 100, 1_000_000])
def test_extreme_lengths(history_len):
    cfg = S.SyntheticConfig(num_users=1, history_len=history_len, seed=1)
    rec = S.generate_user(cfg, 0)
    assert rec["item"].shape == (history_len + cfg.num_recent,)
    assert rec["time"].dtype == np.int64 and np.all(np.diff(rec["time"]) >= 0)
    assert rec["item"].min() >= 1 and rec["item"].max() <= S.num_items(cfg)


def test_config_validation():
    with pytest.raises(ValueError):
        S.SyntheticConfig(history_len=S.MIN_HISTORY_LEN - 1)
    with pytest.raises(ValueError):
        S.SyntheticConfig(num_topics=4)
    with pytest.raises(ValueError):
        S.SyntheticConfig(cand_frac_uniform=0.5)


def test_every_generator_field_is_a_config_key_of_the_experiment():
    """`--config.data.<field>` works for every generator knob (absl config flags refuse keys
    the config dict lacks), and a changed value reaches the generator."""
    c = synthetic_config.get_config()
    assert {f.name for f in dataclasses.fields(S.SyntheticConfig)} <= set(c.data)
    c.data.dormant_weight = 0.5
    assert from_config_dict(c).data.synthetic.dormant_weight == 0.5

"""vista_jax.costs against a reference count: the matmul FLOPs in the model's own jaxpr."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from vista_jax import costs
from vista_jax.config import RankerConfig, SummarizerConfig
from vista_jax.models.ranker import Ranker
from vista_jax.models.target_attention import FullTargetAttentionRanker

B, C, R, K, D = 1, 5, 4, 3, 8


def jaxpr_matmul_flops(jaxpr) -> float:
    """2 x multiply-adds of every dot_general, scans counted `length` times."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[i] for i in contract])
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in _subs(eqn):
            total += times * jaxpr_matmul_flops(sub)
    return total


def _subs(eqn):
    """The jaxprs inside an equation (jit, scan, remat, custom derivatives)."""
    for value in eqn.params.values():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr
            elif hasattr(v, "eqns"):
                yield v


def forward_flops(model, batch) -> float:
    graphdef, params = nnx.split(model)
    fn = lambda p, b: nnx.merge(graphdef, p)(b)[0]  # noqa: E731
    return jaxpr_matmul_flops(jax.make_jaxpr(fn)(params, batch).jaxpr)


def ranker_cfg(summary_dim: int) -> RankerConfig:
    return RankerConfig(num_items=20, d_model=D, num_heads=2, num_layers=2, mlp_hidden=12,
                        num_recent=R, summary_dim=summary_dim)  # fmt: skip


def request(length: int = 0, summary_dim: int = 0) -> dict:
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(1, 6, (B, n)).astype(np.int32)  # noqa: E731
    batch = {"cand_item": ids(C), "recent_item": ids(R), "recent_action": ids(R),
             "recent_gap": ids(R), "recent_len": np.full(B, R)}  # fmt: skip
    if summary_dim:
        batch |= {"summary": np.ones((B, K, summary_dim), np.float32),
                  "summary_mask": np.ones(B, bool)}  # fmt: skip
    if length:
        batch |= {"hist_item": ids(length), "hist_action": ids(length), "hist_gap": ids(length),
                  "hist_len": np.full(B, length)}  # fmt: skip
    return batch


@pytest.mark.parametrize("summary_dim", [0, 6])
def test_ranker_flops_equal_the_jaxpr_count(summary_dim):
    cfg = ranker_cfg(summary_dim)
    model = Ranker(cfg, nnx.Rngs(0))
    want = forward_flops(model, request(summary_dim=summary_dim))
    assert costs.ranker_flops(cfg, C, K) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("length", [16, 48])
def test_full_target_attention_flops_equal_the_jaxpr_count(length):
    cfg = ranker_cfg(0)
    model = FullTargetAttentionRanker(cfg, nnx.Rngs(0), chunk_size=16)
    want = forward_flops(model, request(length=length))
    assert costs.full_target_attention_flops(length, cfg, C) == pytest.approx(want, rel=1e-9)


def test_summarizer_cost_is_linear_and_the_ranker_is_flat():
    scfg = SummarizerConfig(num_items=20, d_model=D, num_heads=2, num_seeds=K)
    rcfg = dataclasses.replace(ranker_cfg(D), num_layers=1)
    a, b, c = (costs.per_request(scfg, rcfg, n, C) for n in (1000, 2000, 3000))
    assert c["summarizer"] - b["summarizer"] == pytest.approx(b["summarizer"] - a["summarizer"])
    assert (
        a["vista_downstream"] == c["vista_downstream"] and a["recent_only"] < a["vista_downstream"]
    )
    assert c["full_target_attention"] > 2.5 * a["full_target_attention"] / 1.01
    train = costs.training(scfg, rcfg, 1000, C, source_examples=10, downstream_examples=20)
    assert train["vista_downstream"] == costs.TRAIN_OVER_FORWARD * 20 * a["vista_downstream"]

"""The summarizer's parallel, chunked and recurrent forms agree; seeds and padding are inert."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vista_jax.config import SummarizerConfig
from vista_jax.models import qla
from vista_jax.models.summarizer import Summarizer

B, L = 3, 37
TOL = dict(rtol=1e-4, atol=1e-5)


def _model(chunk_size=8, attention="qla", seed=0) -> Summarizer:
    cfg = SummarizerConfig(
        num_items=50, d_model=16, num_heads=2, num_layers=2, num_seeds=4, sglu_hidden=32,
        chunk_size=chunk_size, attention=attention,
    )  # fmt: skip
    return Summarizer(cfg, nnx.Rngs(seed))


def _events(seed=0, lengths=(L, 0, L // 2 + 1)):
    """Random events [B, L] with ragged lengths (one empty history) and random padding ids."""
    rng = np.random.default_rng(seed)
    valid = np.arange(L)[None] < np.array(lengths)[:, None]
    item = rng.integers(1, 51, (B, L))
    action = rng.integers(1, 8, (B, L))
    gap = rng.integers(0, 16, (B, L))
    return tuple(jnp.asarray(x, jnp.int32) for x in (item, action, gap)) + (jnp.asarray(valid),)


def _repad(events, seed):
    """Same valid events, different ids in every padded slot."""
    item, action, gap, valid = events
    rng = np.random.default_rng(seed)
    noise = [rng.integers(0, hi, (B, L)) for hi in (51, 8, 16)]
    return tuple(
        jnp.where(valid, x, n) for x, n in zip((item, action, gap), noise, strict=True)
    ) + (valid,)


def _summary(model, events, form):
    return model(*events, form=form)[0]


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_three_forms_agree_on_states_and_summaries(chunk_size):
    model, events = _model(chunk_size), _events()
    ref = model.history_states(*events, form="parallel")
    for form in ("chunked", "recurrent"):
        states = model.history_states(*events, form=form)
        for got, want in zip(states, ref, strict=True):
            np.testing.assert_allclose(got.kv_sum, want.kv_sum, **TOL)
            np.testing.assert_array_equal(got.count, want.count)
        np.testing.assert_allclose(model.readout(states), model.readout(ref), **TOL)


@pytest.mark.parametrize("block", [1, 4, 7, 37])
def test_blocked_chunk_step_equals_parallel_form(block):
    """The chunked form's step cuts a chunk into causal blocks; it must equal the reference."""
    keys = jax.random.split(jax.random.key(0), 5)
    q, k = (jax.nn.silu(jax.random.normal(kk, (B, L, 2, 4))) for kk in keys[:2])
    v = jax.random.normal(keys[2], (B, L, 2, 4))
    valid = _events()[3]
    state = qla.QLAState(jax.random.normal(keys[3], (B, 2, 4, 4)), jnp.array([3.0, 0.0, 5.0]))
    out, st = qla.qla_chunk_step(state, q, k, v, valid, block=block)
    ref, ref_st = qla.qla_parallel(q, k, v, valid, state)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(st.kv_sum, ref_st.kv_sum, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(st.count, ref_st.count)


def test_empty_history_summary_is_the_seed_only_summary():
    model = _model()
    item, action, gap, valid = _events(lengths=(0, 0, 0))
    summary = _summary(model, (item, action, gap, valid), "chunked")
    np.testing.assert_allclose(summary, model.readout(model.initial_states(B)), atol=1e-6)
    np.testing.assert_allclose(summary[0], summary[1], atol=1e-6)
    no_events = _summary(model, (item[:, :0], action[:, :0], gap[:, :0], valid[:, :0]), "chunked")
    np.testing.assert_allclose(no_events, summary, atol=1e-6)


@pytest.mark.parametrize("form", ["parallel", "chunked", "recurrent"])
def test_padding_never_changes_the_summary(form):
    model, events = _model(chunk_size=5), _events(seed=1)
    a = _summary(model, events, form)
    b = _summary(model, _repad(events, seed=7), form)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_seeds_never_read_each_other():
    """d summary_j / d seed_i == 0 for i != j: each seed only reads the history and itself."""
    model, events = _model(), _events(seed=2)
    states = model.history_states(*events, form="parallel")
    graphdef, params = nnx.split(model)

    def summary_of_seeds(seeds):
        m = nnx.merge(graphdef, params)
        m.seeds = nnx.Param(seeds)  # a fresh module of this trace: rebinding is allowed
        return m.readout(states)[0]  # [K, D] of user 0

    jac = jax.jacrev(summary_of_seeds)(model.seeds[...])  # [K, D, K, D]
    k = jac.shape[0]
    off_diagonal = ~np.eye(k, dtype=bool)[:, None, :, None]
    assert np.max(np.abs(np.where(off_diagonal, jac, 0.0))) == 0.0
    assert np.max(np.abs(jac)) > 0.0


def test_history_states_do_not_read_the_seeds():
    model, events = _model(), _events(seed=3)
    before = model.history_states(*events)
    model.seeds[...] = model.seeds[...] * 5.0 + 1.0
    after = model.history_states(*events)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a.kv_sum, b.kv_sum)


def _grads(model, events, form, remat):
    weights = jax.random.normal(jax.random.key(0), (B, 4, 16))
    graphdef, params = nnx.split(model)

    def loss(params):
        m = nnx.merge(graphdef, params)
        return jnp.sum(m(*events, form=form, remat=remat)[0] * weights)

    return jax.jit(jax.grad(loss))(params)


def test_chunked_remat_gradients_equal_parallel_gradients():
    model, events = _model(chunk_size=8), _events(seed=4)
    ref = jax.tree.leaves(_grads(model, events, "parallel", False))
    got = jax.tree.leaves(_grads(model, events, "chunked", True))
    for g, r in zip(got, ref, strict=True):
        # Gradients sum many terms (up to ~1e3 here) in another order: float32 leaves ~1e-6 of
        # the leaf's scale on near-zero entries, so the absolute slack follows that scale.
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(r))))


def test_softmax_variant_runs_and_ignores_padding():
    model, events = _model(attention="softmax"), _events(seed=5)
    a = _summary(model, events, "chunked")
    b = _summary(model, _repad(events, seed=8), "chunked")
    assert a.shape == (B, 4, 16) and np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="attention='qla'"):
        model.history_states(*events)


def test_reconstruction_cannot_copy_its_target_from_padding():
    """A one-event history: the decoder predicts that event from padding, so its loss must not
    depend on the event's input embedding (targets are stop-gradient). Padded window slots
    once held the first event and leaked it through the residual stream."""
    from vista_jax.models.summarizer import ReconstructionDecoder, reconstruction_loss

    model = _model()
    decoder = ReconstructionDecoder(model.cfg, nnx.Rngs(1))
    # The head starts at zero, which would make any input inert; give it weights.
    head = decoder.head.kernel
    head[...] = jax.random.normal(jax.random.key(2), head.shape)
    item = np.zeros((1, 8), np.int32)
    item[0, 0] = 7
    valid = np.arange(8)[None] < 1
    summary = jax.random.normal(jax.random.key(0), (1, model.cfg.num_seeds, model.cfg.d_model))

    loss = lambda m: reconstruction_loss(m, decoder, summary, item, valid)  # noqa: E731
    grads = nnx.grad(loss)(model)
    assert float(loss(model)) > 0
    np.testing.assert_array_equal(grads["embed"]["item"]["embedding"][...][7], 0.0)


@pytest.mark.parametrize("summary_scale", [1.0, 30.0])
def test_reconstruction_starts_at_the_trivial_loss(summary_scale):
    """At initialization the decoder predicts zero whatever the summaries' scale, so the loss
    is exactly 1 (unit-norm targets) and only the head gets a gradient: reconstruction cannot
    swamp the task's first updates. The residual once reached the head unnormalized, and the
    first loss grew with the summaries' norm (about d + 1 for unit-RMS summaries)."""
    from vista_jax.models.summarizer import ReconstructionDecoder, reconstruction_loss

    model, events = _model(), _events(seed=3)
    decoder = ReconstructionDecoder(model.cfg, nnx.Rngs(1))
    item, _, _, valid = events
    keep = np.asarray(valid).any(axis=1)
    item, valid = item[keep], valid[keep]
    shape = (item.shape[0], model.cfg.num_seeds, model.cfg.d_model)
    summary = summary_scale * jax.random.normal(jax.random.key(0), shape)

    loss = lambda dec, s: reconstruction_loss(model, dec, s, item, valid)  # noqa: E731
    np.testing.assert_allclose(float(loss(decoder, summary)), 1.0, rtol=1e-5)
    grads = nnx.grad(loss)(decoder, summary)
    norms = {
        "/".join(map(str, path)): float(jnp.linalg.norm(g[...]))
        for path, g in nnx.to_flat_state(grads)
    }
    assert norms["head/kernel"] > 0, norms
    assert all(v == 0 for k, v in norms.items() if not k.startswith("head/")), norms
    summary_grad = jax.grad(lambda s: loss(decoder, s))(summary)
    np.testing.assert_array_equal(summary_grad, 0.0)

"""The three QLA forms compute the same thing (the chunked and recurrent are fast paths)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vista_jax.models import qla


def _inputs(seed=0, b=3, length=37, h=2, e=4):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k = (jax.nn.silu(jax.random.normal(kk, (b, length, h, e))) for kk in keys[:2])
    v = jax.random.normal(keys[2], (b, length, h, e))
    lengths = jnp.array([length, 0, length // 2])[:b]
    valid = jnp.arange(length)[None] < lengths[:, None]
    return q, k, v, valid


def _naive(q, k, v, valid):
    """Loop definition: o_i = q_i * mean_{j<=i, valid} k_j v_j^T."""
    q, k, v, valid = map(np.asarray, (q, k, v, valid))
    out = np.zeros_like(v)
    for b in range(q.shape[0]):
        s = np.zeros((q.shape[2], q.shape[3], q.shape[3]))
        n = 0
        for i in range(q.shape[1]):
            if valid[b, i]:
                s += np.einsum("he,hf->hef", k[b, i], v[b, i])
                n += 1
            out[b, i] = np.einsum("he,hef->hf", q[b, i], s / max(n, 1))
    return out


def test_parallel_matches_loop_definition():
    q, k, v, valid = _inputs()
    out, _ = qla.qla_parallel(q, k, v, valid)
    np.testing.assert_allclose(out, _naive(q, k, v, valid), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_and_recurrent_match_parallel(chunk):
    q, k, v, valid = _inputs()
    ref, ref_state = qla.qla_parallel(q, k, v, valid)
    for out, state in (
        qla.qla_chunked(q, k, v, valid, chunk_size=chunk),
        qla.qla_recurrent(q, k, v, valid),
    ):
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.kv_sum, ref_state.kv_sum, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(state.count, ref_state.count)


def test_continuing_from_a_state_equals_one_pass():
    q, k, v, valid = _inputs(seed=1)
    ref, ref_state = qla.qla_parallel(q, k, v, valid)
    cut = 20
    out1, state = qla.qla_chunked(q[:, :cut], k[:, :cut], v[:, :cut], valid[:, :cut], chunk_size=8)
    out2, state = qla.qla_recurrent(q[:, cut:], k[:, cut:], v[:, cut:], valid[:, cut:], state)
    np.testing.assert_allclose(jnp.concatenate([out1, out2], 1), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.kv_sum, ref_state.kv_sum, rtol=1e-5, atol=1e-5)


def test_padding_never_changes_valid_outputs_or_state():
    q, k, v, valid = _inputs(seed=2)
    noise = jax.random.normal(jax.random.key(9), q.shape) * 100.0
    pad = ~valid[..., None, None]
    out_a, st_a = qla.qla_chunked(q, k, v, valid, chunk_size=8)
    out_b, st_b = qla.qla_chunked(
        q, jnp.where(pad, noise, k), jnp.where(pad, noise, v), valid, chunk_size=8
    )
    np.testing.assert_allclose(jnp.where(~pad, out_a, 0), jnp.where(~pad, out_b, 0), atol=1e-6)
    np.testing.assert_allclose(st_a.kv_sum, st_b.kv_sum, atol=1e-6)

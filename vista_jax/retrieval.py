"""Retrieval training and scoring for the sequential encoders (SASRec, HSTU).

Follows generative-recommenders `research/` (see docs/RETRIEVAL_BASELINES.md):

* every valid position t is supervised by the item at t + 1 (sampled softmax);
* 128 negatives drawn uniformly from the catalog independently for every position
  (`LocalNegativesSampler`), a negative equal to the position's positive gets logit -5e4;
* logits are cosines (L2-normalized user and item embeddings) over temperature 0.05;
* the loss is the mean over supervised positions of the whole batch;
* Adam(W) with lr 1e-3, betas (0.9, 0.98), weight decay 0 (the ML-1M gin files), no warmup.

Uniform per-position negatives never materialize a [B, L, R, D] gather of embeddings: their
logits are computed chunk by chunk of positions, each gathering only its own block, with a
custom backward pass (`sampled_logits`, exact). `per_row` shares R negatives among a
row's positions (a cheaper variant, not the reference).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vista_jax.data import sequences
from vista_jax.models.sequential import SequentialEncoder
from vista_jax.quantize import decode
from vista_jax.train import TrainState, init_train_state  # noqa: F401  (one train state)

NEGATIVE_SAMPLING = ("per_position", "per_row")
_MASKED_LOGIT = -5e4  # The reference's logit for a negative equal to the positive.


def uniform_items(key, shape, num_items: int) -> jax.Array:
    """Uniform ids in 1..num_items: 32 random bits mod num_items (bias < num_items / 2^32).

    Half the cost of `jax.random.randint` (which draws twice to remove that bias).
    """
    bits = jax.random.bits(key, shape, jnp.uint32)
    return (bits % jnp.uint32(num_items)).astype(jnp.int32) + 1


def sampled_softmax_loss(
    user_BxLxD,
    target_BxL,
    items_IxD,
    key,
    num_negatives: int = 128,
    temperature: float = 0.05,
    sampling: str = "per_position",
    max_positions: int | None = None,
):
    """Mean over positions with target > 0 of -log softmax([pos, negatives])[pos].

    `items_IxD` is the normalized tied table with padding row 0; negatives are uniform over
    items 1..I-1. `max_positions` (per_position only) first packs the supervised positions
    into that many slots, so padding costs nothing; it must be >= their count (the caller
    picks it per batch). Returns (loss, metrics).
    """
    if sampling not in NEGATIVE_SAMPLING:
        raise ValueError(f"sampling must be one of {NEGATIVE_SAMPLING}, got {sampling!r}")
    if max_positions is not None and sampling == "per_position":
        user_BxLxD, target_BxL = _pack_positions(user_BxLxD, target_BxL, max_positions)
    num_items = items_IxD.shape[0] - 1
    batch, length = target_BxL.shape
    if sampling == "per_position":
        neg_BxLxR = uniform_items(key, (batch, length, num_negatives), num_items)
        ids_BxLxK = jnp.concatenate([target_BxL[..., None], neg_BxLxR], axis=-1)
        dim = user_BxLxD.shape[-1]
        logits = sampled_logits(
            user_BxLxD.reshape(-1, dim), items_IxD, ids_BxLxK.reshape(batch * length, -1)
        )
        logits_BxLxK = logits.reshape(batch, length, -1)
        pos_BxL, neg_logits = logits_BxLxK[..., 0], logits_BxLxK[..., 1:]
    else:
        neg_BxR = uniform_items(key, (batch, num_negatives), num_items)
        neg_BxLxR = jnp.broadcast_to(neg_BxR[:, None], (batch, length, num_negatives))
        pos_BxL = jnp.einsum("bld,bld->bl", user_BxLxD, items_IxD[target_BxL])
        neg_logits = jnp.einsum("bld,brd->blr", user_BxLxD, items_IxD[neg_BxR])
    collide_BxLxR = neg_BxLxR == target_BxL[..., None]
    neg_logits = jnp.where(collide_BxLxR, _MASKED_LOGIT, neg_logits / temperature)
    logits = jnp.concatenate([pos_BxL[..., None] / temperature, neg_logits], axis=-1)
    nll_BxL = -jax.nn.log_softmax(logits, axis=-1)[..., 0]
    weight_BxL = (target_BxL > 0).astype(nll_BxL.dtype)
    count = jnp.sum(weight_BxL)
    loss = jnp.sum(nll_BxL * weight_BxL) / jnp.maximum(count, 1.0)
    collisions = jnp.sum(collide_BxLxR * weight_BxL[..., None])
    return loss, {"loss": loss, "positions": count, "masked_negatives": collisions}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def sampled_logits(user_NxD, items_IxD, ids_NxK, chunk: int = 64) -> jax.Array:
    """logits[n, k] = user[n] . items[ids[n, k]], exact, chunk by chunk of positions.

    Each chunk of positions gathers its own [chunk, K, D] embeddings and reduces them against
    its users, so the block stays in cache and the [N, K, D] gather never exists in memory
    (unchunked, XLA:CPU spends most of the gather writing that buffer); the backward pass
    (below) works chunk by chunk too. Measured on a 2-core CPU (16k positions, K = 129,
    D = 50, 3.7k items; best of 5, three rounds): the loss's value and gradient 256-263 ms,
    against 396-403 ms when each chunk multiplied against the whole table ([256, I] cosine
    blocks, K columns kept) and the backward pass multiplied dense [256, I] blocks.
    """
    user_CxcxD, ids_Cxcxk = _chunks(chunk, user_NxD, ids_NxK)

    def block(args):
        user_cxD, ids_cxK = args
        return jnp.einsum("cd,ckd->ck", user_cxD, items_IxD[ids_cxK])

    logits_CxcxK = jax.lax.map(block, (user_CxcxD, ids_Cxcxk))
    return logits_CxcxK.reshape(-1, ids_NxK.shape[1])[: ids_NxK.shape[0]]


def _chunks(chunk: int, *arrays_NxF) -> tuple[jax.Array, ...]:
    """Each [N, F] array zero-padded to a multiple of `chunk` rows, as [C, chunk, F]."""
    pad = -arrays_NxF[0].shape[0] % chunk
    return tuple(
        jnp.pad(x_NxF, ((0, pad), (0, 0))).reshape(-1, chunk, x_NxF.shape[1])
        for x_NxF in arrays_NxF
    )


def _sampled_logits_fwd(user_NxD, items_IxD, ids_NxK, chunk):
    return sampled_logits(user_NxD, items_IxD, ids_NxK, chunk), (user_NxD, items_IxD, ids_NxK)


def _sampled_logits_bwd(chunk, residuals, grad_NxK):
    """Per chunk: d_user[n] = sum_k grad[n, k] items[ids[n, k]] from the chunk's gathered
    embeddings, and grad[n, k] user[n] scatter-added into the table's gradient (a chunk's
    K x chunk rows at a time: about half the time of the dense [chunk, I] block's matmul;
    serial, so deterministic, on CPU; on GPU its float sums may differ in order run to run)."""
    user_NxD, items_IxD, ids_NxK = residuals
    chunks = _chunks(chunk, user_NxD, ids_NxK, grad_NxK)

    def step(d_items_IxD, args):
        user_cxD, ids_cxK, grad_cxK = args
        d_user_cxD = jnp.einsum("ck,ckd->cd", grad_cxK, items_IxD[ids_cxK])
        rows_cKxD = (grad_cxK[:, :, None] * user_cxD[:, None, :]).reshape(-1, user_cxD.shape[1])
        return d_items_IxD.at[ids_cxK.reshape(-1)].add(rows_cKxD), d_user_cxD

    init = jnp.zeros_like(items_IxD)
    d_items_IxD, d_user_CxcxD = jax.lax.scan(step, init, chunks)
    d_user_NxD = d_user_CxcxD.reshape(-1, user_NxD.shape[1])[: user_NxD.shape[0]]
    return d_user_NxD, d_items_IxD, None


sampled_logits.defvjp(_sampled_logits_fwd, _sampled_logits_bwd)


def _pack_positions(user_BxLxD, target_BxL, capacity: int):
    """The supervised positions gathered into [1, capacity] (empty slots get target 0)."""
    target_N = target_BxL.reshape(-1)
    (index_C,) = jnp.nonzero(target_N > 0, size=capacity, fill_value=0)
    filled_C = jnp.arange(capacity) < jnp.sum(target_N > 0)
    user_CxD = user_BxLxD.reshape(-1, user_BxLxD.shape[-1])[index_C]
    return user_CxD[None], jnp.where(filled_C, target_N[index_C], 0)[None]


def position_capacity(num_positions: int, batch_positions: int, buckets: int = 8) -> int:
    """`num_positions` rounded up to a multiple of batch_positions / buckets (few compiles)."""
    return sequences.bucketed_capacity(num_positions, batch_positions, buckets)


# -- catalog scoring --------------------------------------------------------------------------
def catalog_scores(user_BxD, items_IxD) -> jax.Array:
    """Cosine of each user with every item, [B, I]; the padding column 0 is -inf."""
    scores_BxI = user_BxD @ items_IxD.T
    return scores_BxI.at[:, 0].set(-jnp.inf)


# -- optimizer and train step -----------------------------------------------------------------
def make_optimizer(
    learning_rate: float = 1e-3, b2: float = 0.98, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """torch.optim.AdamW(lr, betas=(0.9, b2), eps=1e-8, weight_decay) as the reference uses."""
    return optax.adamw(learning_rate, b1=0.9, b2=b2, eps=1e-8, weight_decay=weight_decay)


def extra_inputs(batch) -> dict:
    """Keyword inputs beyond the window's items, for models that read them: the input events'
    action ids (ranking rows), the segments of packed rows (`sequences.pack_rows`), the events
    before the window (`prefix`), or the summaries of every snapshot read from a cache, as
    stored (`summary_values` [, `summary_scale`]: `retrieval_cache.attach`), dequantized
    here, inside the jitted step, on device."""
    names = {
        "prefix": "prefix_BxP",
        "action": "action_BxL",
        "prefix_action": "prefix_action_BxP",
        "segment": "segment_BxL",
    }
    inputs = {kw: batch[name] for name, kw in names.items() if name in batch}
    if "summary_values" in batch:
        inputs["summary_BxJxKxD"] = decode(batch["summary_values"], batch.get("summary_scale"))
    return inputs


def batch_inputs(batch) -> tuple:
    """(item, valid, time, next_time) from a batch of `vista_jax.data.sequences`."""
    return batch["item"], batch["item"] > 0, batch["time"], batch["next_time"]


def fast_key(key: jax.Array) -> jax.Array:
    """An "rbg" key derived from `key`: XLA's RngBitGenerator makes the step's ~10M random
    numbers (negatives, dropout masks) about 1.5x faster on CPU than threefry."""
    return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    num_negatives: int = 128,
    temperature: float = 0.05,
    sampling: str = "per_position",
    max_positions: int | None = None,
) -> Callable:
    """train_step(state, batch, key) -> (state, metrics): pure; jit it with donated state.

    `max_positions`: see `sampled_softmax_loss` (one jitted step per capacity).
    """

    def loss_of(params, batch, key):
        model: SequentialEncoder = nnx.merge(graphdef, params)
        dropout_key, negatives_key = jax.random.split(fast_key(key))
        user_BxLxD, _ = model(*batch_inputs(batch), dropout_key=dropout_key, **extra_inputs(batch))
        return sampled_softmax_loss(
            user_BxLxD,
            batch["target"],
            model.normalized_items(),
            negatives_key,
            num_negatives,
            temperature,
            sampling,
            max_positions,
        )

    return keyed_train_step(tx, loss_of)


class CapacitySteps:
    """steps(batch) -> the jitted, state-donating `make_train_step` for the batch's count of
    supervised positions rounded by `position_capacity`, compiled once per capacity
    (`compiled` maps each capacity to its step)."""

    def __init__(self, graphdef, tx, batch_positions: int, **loss_kwargs):
        self._make = functools.partial(make_train_step, graphdef, tx, **loss_kwargs)
        self.batch_positions = batch_positions
        self.compiled: dict[int, Callable] = {}

    def capacity(self, batch) -> int:
        """The packed capacity the batch's step is compiled for."""
        return position_capacity(int(np.sum(batch["target"] > 0)), self.batch_positions)

    def __call__(self, batch) -> Callable:
        capacity = self.capacity(batch)
        if capacity not in self.compiled:
            step = self._make(max_positions=capacity)
            self.compiled[capacity] = jax.jit(step, donate_argnums=0)
        return self.compiled[capacity]


def keyed_train_step(tx: optax.GradientTransformation, loss_of: Callable) -> Callable:
    """train_step(state, batch, key) -> (state, metrics) minimizing `loss_of(params, batch,
    key) -> (loss, metrics)`, the key folded with the step (dropout, negatives)."""

    def train_step(state: TrainState, batch, key):
        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, batch, jax.random.fold_in(key, state.step))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def make_score_fn(graphdef) -> Callable:
    """score(params, batch) -> catalog scores [B, I] at each row's last valid position."""

    def score(params, batch):
        model: SequentialEncoder = nnx.merge(graphdef, params)
        user_BxD = model.encode_last(*batch_inputs(batch), **extra_inputs(batch))
        return catalog_scores(user_BxD, model.normalized_items())

    return score

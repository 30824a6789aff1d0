"""The source model (summarizer + stage-2 head + reconstruction decoder) and the losses.

The source model is trained end to end on the main task plus the reconstruction loss. Its
three modules are separate checkpoint items, so a later stage restores the summarizer alone
(to build the cache) and downstream rankers never load it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vista_jax.config import RankerConfig, SummarizerConfig
from vista_jax.models.ranker import Ranker
from vista_jax.models.summarizer import ReconstructionDecoder, Summarizer, reconstruction_loss

SOURCE_ITEMS = ("summarizer", "decoder", "ranker")


class SourceModel(nnx.Module):
    """Summarizer + stage-2 head + reconstruction decoder, trained end to end."""

    def __init__(self, summarizer: Summarizer, decoder: ReconstructionDecoder, ranker: Ranker):
        self.summarizer = summarizer
        self.decoder = decoder
        self.ranker = ranker

    @classmethod
    def create(cls, scfg: SummarizerConfig, rcfg: RankerConfig, seed: int) -> SourceModel:
        rngs = nnx.Rngs(seed)  # One stream, in this order: the init is part of the recipe.
        return cls(Summarizer(scfg, rngs), ReconstructionDecoder(scfg, rngs), Ranker(rcfg, rngs))

    def modules(self) -> dict[str, nnx.Module]:
        """The checkpoint items, by name."""
        return {name: getattr(self, name) for name in SOURCE_ITEMS}

    def __call__(self, batch, remat: bool = True):
        valid = jnp.arange(batch["hist_item"].shape[1])[None] < batch["hist_len"][:, None]
        summary, _ = self.summarizer(
            batch["hist_item"],
            batch["hist_action"],
            batch["hist_gap"],
            valid,
            remat=remat,
            category=batch.get("hist_category"),
        )
        batch = batch | {"summary": summary, "summary_mask": jnp.ones(valid.shape[:1], bool)}
        logits, aux = self.ranker(batch)
        rec = reconstruction_loss(self.summarizer, self.decoder, summary, batch["hist_item"], valid)
        return logits, aux | {"summary": summary, "recon_loss": rec}


def as_model(modules: Mapping[str, nnx.Module] | nnx.Module) -> nnx.Module:
    """The callable model behind a set of checkpoint items (source model or bare ranker)."""
    if not isinstance(modules, Mapping):
        return modules
    if set(modules) == set(SOURCE_ITEMS):
        return SourceModel(**modules)
    (module,) = modules.values()
    return module


def task_loss(task: str, logits, batch) -> jax.Array:
    """Ranking: masked sigmoid BCE. Retrieval: softmax CE with the target at candidate 0."""
    mask = batch["cand_mask"].astype(jnp.float32)
    if task == "ranking":
        bce = optax.sigmoid_binary_cross_entropy(logits, batch["cand_label"])
        return jnp.sum(bce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    logits = jnp.where(batch["cand_mask"], logits, -1e30)
    return jnp.mean(-jax.nn.log_softmax(logits, axis=-1)[:, 0])


def make_loss_fn(task: str, recon_weight: float = 0.0) -> Callable:
    """loss(modules, batch) -> (loss, metrics), for the source items or a bare ranker."""

    def loss_fn(modules, batch):
        logits, aux = as_model(modules)(batch)
        main = task_loss(task, logits, batch)
        metrics = {"task_loss": main}
        loss = main
        if "recon_loss" in aux:
            loss = loss + recon_weight * aux["recon_loss"]
            metrics["recon_loss"] = aux["recon_loss"]
        return loss, metrics | {"loss": loss}

    return loss_fn

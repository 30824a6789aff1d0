"""Snapshot summaries of a VISTA retriever in the summary store, for downstream retrievers.

A source `VistaRetriever` (live summaries) writes, for every row of the leave-one-out splits
(train rows, then valid requests, then test requests), the summary tokens of all J snapshots
of that row's window (and lifelong prefix) to one `SummaryStore` version: store row r holds
[J*K, D], int8 with one scale per token. A downstream retriever (`summary_source="cached"`)
reads them back (`attach`) as each split's `summary` field [U, J, K, D], so it trains and
evaluates without the summarizer and without any event before its window.

The version's config hash is the fingerprint of what a reader must match: the rows (their
windows' items and prefix), J, K, D. Reading splits built differently (another window, prefix,
`train_on_valid`, data) is refused with the mismatch named; the source run that made the
summaries is the version's lineage (`coverage_info`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator

import numpy as np
from flax import nnx

from vista_jax import fingerprints
from vista_jax.data import sequences
from vista_jax.errors import DataError
from vista_jax.store import SummaryStore
from vista_jax.store_write import RowBlock

SPLITS = ("train", "valid", "test")


def fingerprint(splits: sequences.SequenceSplits, num_snapshots: int, k: int, d: int) -> dict:
    """What a cached reader must match: the rows' inputs, split sizes and summary shape."""
    digest = hashlib.sha256()
    for name in SPLITS:
        split = getattr(splits, name)
        for field in ("item", "prefix", "action", "prefix_action"):  # What summaries read.
            if field in split:
                digest.update(np.ascontiguousarray(split[field], np.int32).tobytes())
    return {
        "rows": {name: len(getattr(splits, name)["item"]) for name in SPLITS},
        "window": splits.window,
        "prefix_len": int(splits.train["prefix"].shape[1]) if "prefix" in splits.train else 0,
        "num_snapshots": num_snapshots,
        "num_seeds": k,
        "d_model": d,
        "inputs_sha256": digest.hexdigest()[:16],
    }


def _row_blocks(model, splits, batch_size: int) -> Iterator[RowBlock]:
    summarize = nnx.jit(lambda m, *inputs: m.summaries(*inputs))
    offset = 0
    for name in SPLITS:
        split = getattr(splits, name)
        for batch, n in sequences.eval_batches(split, batch_size):
            inputs = [batch.get(k) for k in ("item", "prefix", "action", "prefix_action")]
            summary_BxJxKxD = np.asarray(summarize(model, *inputs))
            b, j, k, d = summary_BxJxKxD.shape
            coverage = np.sum(batch["item"][:n] > 0, axis=1)
            if "prefix" in batch:
                coverage += np.sum(batch["prefix"][:n] > 0, axis=1)
            rows = np.arange(offset, offset + n)
            yield RowBlock(rows, summary_BxJxKxD[:n].reshape(n, j * k, d), coverage)
            offset += n


def export(
    model,
    splits: sequences.SequenceSplits,
    root,
    *,
    version: str,
    step: int,
    source: dict,
    batch_size: int = 256,
    quantization: str = "int8",
) -> dict:
    """Writes every split row's snapshot summaries as one store version; returns its manifest.

    `source` (e.g. the source run's model, flags and commit) is stored as lineage;
    `quantization` is the store's ("int8", "bf16" or "none": float32 as computed).
    """
    fp = fingerprint(splits, *summary_shape(model.cfg))
    num_rows = sum(fp["rows"].values())
    return SummaryStore.write_version(
        root,
        version=version,
        summaries=_row_blocks(model, splits, batch_size),
        num_rows=num_rows,
        config_hash=fingerprints.config_hash(fp),
        summarizer_step=step,
        coverage_info={"fingerprint": fp, "source": source},
        quantization=quantization,
    )


def attach(
    splits: sequences.SequenceSplits,
    root,
    num_snapshots: int,
    k: int,
    d: int,
    version=None,
    only: tuple[str, ...] = SPLITS,
) -> sequences.SequenceSplits:
    """`splits` with each split's summaries of every snapshot as stored: `summary_values`
    [U, J, K, D] (int8, bf16 or f32) and, for int8, `summary_scale` [U, J, K]; the model's
    step dequantizes them on device (`retrieval.extra_inputs`), so the host holds and
    transfers a quarter of the float32 bytes. Only the splits named in `only` are read (the
    others are returned without summaries).

    Refuses a version made from other rows or shapes, and any row the version lacks.
    """
    fp = fingerprint(splits, num_snapshots, k, d)
    store = SummaryStore.open(root, version=version)  # Its errors name the root and a fix.
    stored = store.manifest.get("coverage_info", {}).get("fingerprint", {})
    if store.manifest["config_hash"] != fingerprints.config_hash(fp):
        diff = {key: (stored.get(key), v) for key, v in fp.items() if stored.get(key) != v}
        raise DataError(
            f"summary cache {store.version!r} at {root} was made for other rows or shapes; "
            f"differences (cache, these splits): {diff}. Fix: export the cache from a source "
            "run with the same data, --window, --prefix_len, --train_on_valid, "
            "--snapshot_every and --num_seeds, or run with those"
        )
    out, offset = {}, 0
    for name in SPLITS:
        split = getattr(splits, name)
        n = len(split["item"])
        if name not in only:
            offset += n
            continue
        read = store.read_quantized(np.arange(offset, offset + n))
        if not read.present.all():
            missing = offset + np.flatnonzero(~read.present)[:5]
            raise DataError(
                f"summary cache {store.version!r} at {root} lacks {int((~read.present).sum())} "
                f"{name} rows (store rows {missing.tolist()}...). Fix: re-export the cache"
            )
        out[name] = split | {"summary_values": read.values.reshape(n, num_snapshots, k, d)}
        if read.scale is not None:
            out[name]["summary_scale"] = read.scale.reshape(n, num_snapshots, k)
        offset += n
    return dataclasses.replace(splits, **out)


def without_prefix(splits: sequences.SequenceSplits) -> sequences.SequenceSplits:
    """`splits` without the events before each window: a cache reader never reads them."""
    return dataclasses.replace(splits, **{
        name: {k: v for k, v in getattr(splits, name).items() if not k.startswith("prefix")}
        for name in SPLITS
    })  # fmt: skip


def quantization(root, version=None) -> str:
    """How a cache version stores its summaries ("int8", "bf16" or "none")."""
    return SummaryStore.open(root, version=version).manifest["quantization"]


def summary_shape(cfg) -> tuple[int, int, int]:
    """(J, K, D) of a retriever config's summaries."""
    return cfg.max_len // cfg.snapshot_every + 1, cfg.num_seeds, cfg.d_model

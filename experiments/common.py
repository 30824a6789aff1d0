"""Defaults shared by every experiment config (one place for the shared knobs)."""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """`variant` or `key=value,key2=value2` after the ':' of --config=path:arg."""
    out = ml_collections.ConfigDict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        if not value:
            out[key] = True
        else:
            out[key] = type(defaults[key])(value) if key in defaults else value
    return out


def training(batch_size, num_steps, learning_rate, warmup_steps=None):
    return ml_collections.ConfigDict(
        dict(
            batch_size=batch_size,
            num_steps=num_steps,
            learning_rate=learning_rate,
            warmup_steps=warmup_steps if warmup_steps is not None else max(1, num_steps // 10),
            weight_decay=1e-4,
            grad_clip=1.0,
            checkpoint_every=max(1, num_steps // 2),
        )
    )


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.summarizer = ml_collections.ConfigDict(
        dict(
            d_model=32,
            num_heads=2,
            num_layers=2,
            num_seeds=16,
            sglu_hidden=64,
            attention="qla",
            chunk_size=256,
            recon_window=64,
            recon_weight=1.0,
        )
    )
    c.ranker = ml_collections.ConfigDict(
        dict(
            d_model=32,
            num_heads=2,
            num_layers=1,
            mlp_hidden=64,
        )
    )
    c.cache = ml_collections.ConfigDict(dict(quantization="int8", chunk_rows=64, batch_size=64))
    # Logical axis -> mesh axis. Item tables shard rows over `model`; batches over `data`.
    c.mesh = ml_collections.ConfigDict(
        dict(
            shape=(1, 1),
            axes=("data", "model"),
            rules=(
                ("batch", "data"),
                ("vocab", "model"),
                ("embed", None),
                ("heads", None),
                ("mlp", None),
                ("seeds", None),
            ),
        )
    )
    c.eval_batch_size = 64
    return c

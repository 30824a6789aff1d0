"""Defaults shared by every experiment config: the one place experiment-level knobs live.

Model architecture defaults are the field defaults of `vista_jax.config.SummarizerConfig` and
`RankerConfig` (read here, not repeated); training, cache, mesh and evaluation defaults are
below. Values derived from others (warmup, checkpoint cadence) are left unset here and
computed by `vista_jax.config.from_config_dict` after flag overrides.
"""

import dataclasses
import difflib

import ml_collections
from ml_collections import config_dict

from vista_jax.config import DERIVED_FIELDS, RankerConfig, SummarizerConfig
from vista_jax.errors import ConfigError

_TRUE, _FALSE = ("", "1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse_value(key: str, value: str, default, flag: str):
    if isinstance(default, bool):
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ConfigError(
            f"{flag} variant '{key}={value}': expected true or false. Fix: ':{key}=false'"
        )
    try:
        return type(default)(value)
    except ValueError:
        raise ConfigError(
            f"{flag} variant '{key}={value}': expected a {type(default).__name__}. "
            f"Fix: ':{key}=<{type(default).__name__}>'"
        ) from None


def parse_arg(arg: str | None, _flag: str = "config", **defaults) -> ml_collections.ConfigDict:
    """The variant after ':' of --config=path:arg: `tiny`, `tiny=false`, `key=value,...`.

    An unknown variant is refused with the valid ones (a typo must not silently run the full
    experiment). `_flag` names the flag in messages (`--sweep=NAME:arg` parses the same way).
    """
    out = dict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        if key not in defaults:
            near = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise ConfigError(
                f"unknown {_flag} variant '{key}' in ':{arg}'; {hint}valid variants: "
                + ", ".join(sorted(defaults))
                + f". Fix: use one of them after the ':' of --{_flag}"
            )
        out[key] = _parse_value(key, value, defaults[key], _flag)
    return ml_collections.ConfigDict(out)


def training(batch_size, num_steps, learning_rate, warmup_steps=None):
    """A training stage; warmup (10%) and checkpoint cadence (half-way) derive from num_steps."""
    return ml_collections.ConfigDict(
        dict(
            batch_size=batch_size,
            num_steps=num_steps,
            learning_rate=learning_rate,
            warmup_steps=config_dict.placeholder(int) if warmup_steps is None else warmup_steps,
            weight_decay=1e-4,
            grad_clip=1.0,
            checkpoint_every=config_dict.placeholder(int),
            keep_checkpoints=2,
        )
    )


def model_defaults(cls) -> ml_collections.ConfigDict:
    """The configurable fields of a model config dataclass, at their defaults."""
    return ml_collections.ConfigDict(
        {
            f.name: f.default
            for f in dataclasses.fields(cls)
            if f.name not in DERIVED_FIELDS and f.default is not dataclasses.MISSING
        }
    )


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.summarizer = model_defaults(SummarizerConfig)
    c.ranker = model_defaults(RankerConfig)
    c.ranker.num_layers = 1  # Stage 2 over a few dozen tokens: one block is enough here.
    # chunk_rows: rows per shard file of the store's "rows" layout (~9 MB at K=128, D=64, int8).
    # root: "" is <workdir>/cache; or a path, URL or kvstore spec JSON (docs/ARCHITECTURE.md).
    c.cache = ml_collections.ConfigDict(
        dict(quantization="int8", chunk_rows=1024, batch_size=64, root="")
    )
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
    c.eval = ml_collections.ConfigDict(dict(batch_size=64, split="test", bootstrap_samples=1000))
    # Off here; the ranking configs turn it on with one rule for every model.
    c.early_stopping = ml_collections.ConfigDict(
        dict(eval_every=0, patience=3, metric="auc", max_requests=0, min_delta=0.0)
    )
    # Raw-history ranking baselines (comma-separated names; "" = none).
    c.baselines = ml_collections.ConfigDict(dict(models="", top_k=64, chunk_size=1024))
    return c


def event_ranking(c: ml_collections.ConfigDict, tiny: bool) -> ml_collections.ConfigDict:
    """Turns an event-log config into the ranking task (docs/PROTOCOLS.md §2): every event is
    a request for its own item, labelled by `label` or rating >= positive_rating, split by a
    global time cutoff; every model trained with the same early stopping."""
    c.data.update(
        task="ranking",
        positive_rating=4.0,  # label = rating >= 4 when the log has no `label` column.
        split="global_time",  # Or per_user: each user's last events.
        valid_fraction=0.1,
        test_fraction=0.1,  # The latest 10% of events; validation the 10% before them.
        # The raw history a request reads (and a summary covers): ML-1M users have up to
        # 2,314 ratings; 1024 covers all but the longest histories.
        history_window=1024,
        num_recent=32,
        snapshot_every=32,  # A cache row every 32 events; the 32 recent events cover the gap.
        max_eval_users=0,
    )
    del c.data["num_negatives"]  # Retrieval only.
    c.summarizer.update(d_model=48, num_heads=2, num_layers=2, num_seeds=32, chunk_size=128)
    # One cross-attention block, as the one-layer raw-history baselines have.
    c.ranker.update(d_model=48, num_heads=2, num_layers=1, mlp_hidden=96)
    # num_steps is a cap: early stopping ends each model when validation AUC stops rising.
    c.source = training(batch_size=256, num_steps=20000, learning_rate=1e-3)
    c.downstream = training(batch_size=256, num_steps=20000, learning_rate=1e-3)
    c.early_stopping.update(eval_every=500, patience=3, metric="auc", max_requests=20000)
    c.baselines.update(models="full_attention,sim_hard,twin", top_k=64, chunk_size=256)
    c.eval.update(split="test", batch_size=256)
    if tiny:  # Smoke run: a few minutes on 2 CPU cores for a 100k-event log.
        c.data.update(history_window=64, num_recent=16, snapshot_every=16, max_eval_users=50)
        c.summarizer.update(d_model=16, num_seeds=4, chunk_size=32)
        c.ranker.update(d_model=16, mlp_hidden=32)
        c.source = training(batch_size=64, num_steps=120, learning_rate=3e-3)
        c.downstream = training(batch_size=64, num_steps=120, learning_rate=3e-3)
        c.early_stopping.update(eval_every=30, patience=2, max_requests=500)
        c.baselines.update(top_k=16, chunk_size=32)
        c.eval.batch_size = 128
        c.cache.batch_size = 256
    return c


# -- sweeps (run by `python -m experiments.sweep`) ---------------------------------------------
def sweep_points(x_key: str, values, seeds=(0,), derive=None) -> list[dict]:
    """A one-axis grid: one override dict per (value, seed), values in the given order.

    The first key of every point is the swept value (the x axis of the sweep's plot) and
    `seed` the model seed (error bars are over seeds). `derive(value)` adds the keys that
    follow from the value (e.g. the summary window from the history length), and the keys
    every point shares.
    """
    return [
        {x_key: value, "seed": seed, **(derive(value) if derive else {})}
        for value in values
        for seed in seeds
    ]


def pick_sweep(arg: str, sweeps: dict, **variant_defaults):
    """`NAME[:variant]` -> sweeps[NAME](parsed variant); an unknown NAME lists the valid ones."""
    name, _, variant = (arg or "").partition(":")
    if name not in sweeps:
        near = difflib.get_close_matches(name, list(sweeps), n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ConfigError(
            f"unknown sweep '{name}'; {hint}valid sweeps: {', '.join(sorted(sweeps))}. "
            "Fix: pass --sweep=<one of them>"
        )
    return sweeps[name](parse_arg(variant, _flag="sweep", **variant_defaults))

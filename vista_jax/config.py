"""Typed, frozen configuration: the one boundary where a ConfigDict becomes dataclasses.

`from_config_dict(config_dict)` turns an experiment's `ml_collections.ConfigDict` (defaults in
`experiments/common.py`, flag overrides applied) into an `ExperimentConfig`. Unknown keys and
bad values raise `ConfigError` naming the key and the nearest valid one; values derived from
others (warmup, checkpoint cadence) are computed here, *after* every override. Library code
takes these dataclasses, never the ConfigDict.

Dimension letters used across the code base:
  B batch, L history, R recent events, C candidates, K seeds, D model width,
  H heads, E head width (D // H), T chunk length.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from vista_jax.data import datasets
from vista_jax.data.eventlog import EventLogOptions
from vista_jax.data.features import NUM_ACTIONS, NUM_GAP_BUCKETS
from vista_jax.data.synthetic import SyntheticConfig
from vista_jax.errors import ConfigError, UserError
from vista_jax.fingerprints import config_hash  # noqa: F401  (re-exported for callers)

ATTENTIONS = ("qla", "softmax")
QUANTIZATIONS = ("int8", "bf16", "none")
EVAL_SPLITS = ("valid", "test")


def _positive(section: str, **values):
    for name, value in values.items():
        if value < 1:
            raise ConfigError(
                f"config key '{section}.{name}' must be >= 1, got {value}. "
                f"Fix: pass --config.{section}.{name}=N with N >= 1"
            )


def _divisible(section: str, d_model: int, num_heads: int):
    if d_model % num_heads:
        raise ConfigError(
            f"config key '{section}.d_model' ({d_model}) must be divisible by "
            f"'{section}.num_heads' ({num_heads}). Fix: change either key"
        )


@dataclasses.dataclass(frozen=True)
class SummarizerConfig:
    """Stage 1: learned seeds summarize the whole history."""

    num_items: int  # Dense item ids are 1..num_items; 0 is padding.
    num_actions: int = NUM_ACTIONS
    num_gap_buckets: int = NUM_GAP_BUCKETS
    num_categories: int = 0  # Dense category ids 1..num_categories; 0 = unknown.
    d_model: int = 32
    num_heads: int = 2
    num_layers: int = 2
    num_seeds: int = 16
    sglu_hidden: int = 64
    attention: str = "qla"  # "qla" (linear, chunked/recurrent capable) or "softmax" (baseline).
    chunk_size: int = 256  # Events per scan step of the chunked form.
    recon_window: int = 64  # Events the reconstruction decoder reads (bounded at any length).
    recon_weight: float = 1.0

    def __post_init__(self):
        _positive(
            "summarizer",
            d_model=self.d_model,
            num_heads=self.num_heads,
            num_layers=self.num_layers,
            num_seeds=self.num_seeds,
            sglu_hidden=self.sglu_hidden,
            chunk_size=self.chunk_size,
            recon_window=self.recon_window,
        )
        _divisible("summarizer", self.d_model, self.num_heads)
        if self.attention not in ATTENTIONS:
            raise ConfigError(_choice("summarizer.attention", self.attention, ATTENTIONS))


@dataclasses.dataclass(frozen=True)
class RankerConfig:
    """Stage 2: candidates attend to [summary tokens; last R events]."""

    num_items: int
    num_actions: int = NUM_ACTIONS
    num_gap_buckets: int = NUM_GAP_BUCKETS
    num_categories: int = 0  # Dense category ids 1..num_categories; 0 = unknown.
    d_model: int = 32
    num_heads: int = 2
    num_layers: int = 2
    mlp_hidden: int = 64
    num_recent: int = 32
    summary_dim: int = 32  # Width of the summary tokens it reads; 0 = no summaries (recent only).

    def __post_init__(self):
        _positive("ranker", d_model=self.d_model, num_heads=self.num_heads)
        _positive("ranker", num_layers=self.num_layers, mlp_hidden=self.mlp_hidden)
        _divisible("ranker", self.d_model, self.num_heads)

    @property
    def use_summaries(self) -> bool:
        return self.summary_dim > 0


# Filled from the data (or the summarizer), never from the config file.
VOCAB_FIELDS = ("num_items", "num_actions", "num_gap_buckets", "num_categories")
DERIVED_FIELDS = VOCAB_FIELDS + ("num_recent", "summary_dim")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training stage (`source` or `downstream`)."""

    batch_size: int
    num_steps: int
    learning_rate: float
    warmup_steps: int  # Derived: num_steps // 10 unless set.
    weight_decay: float
    grad_clip: float
    checkpoint_every: int  # Derived: num_steps // 2 unless set.
    keep_checkpoints: int  # Latest steps kept; an older good one survives a corrupt latest.


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    quantization: str  # int8 | bf16 | none
    chunk_rows: int  # Rows per shard (store layout "rows"; per chunk in the others).
    batch_size: int  # Rows summarized per device call.
    # Store root of the summary cache: "" is <workdir>/cache; else a path, a URL
    # ("s3://bucket/cache/") or a TensorStore kvstore spec as JSON text (e.g. an S3 endpoint).
    root: str = ""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    rules: tuple[tuple[str, Any], ...]  # Logical axis -> mesh axis (or None).


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    batch_size: int
    split: str  # valid | test
    # Ranking: resamples (of users) in the paired AUC test of each model against VISTA.
    bootstrap_samples: int = 1000


EARLY_STOPPING_METRICS = {"auc": 1.0, "logloss": -1.0}  # Metric -> sign (higher is better).


@dataclasses.dataclass(frozen=True)
class EarlyStoppingConfig:
    """One rule for every trained model, so a gap between models is information, not budget.

    Every `eval_every` steps the model is scored on (up to `max_requests` of) the validation
    requests; the best step is kept, and training stops after `patience` passes without
    improvement (or at `num_steps`, the cap). `eval_every = 0` turns it off: the last step is
    the model.
    """

    eval_every: int = 0
    patience: int = 3
    metric: str = "auc"  # One of EARLY_STOPPING_METRICS.
    max_requests: int = 0  # Validation requests per pass, evenly spaced (0 = all).
    min_delta: float = 0.0  # An improvement smaller than this does not count.

    def __post_init__(self):
        if self.metric not in EARLY_STOPPING_METRICS:
            raise ConfigError(
                _choice("early_stopping.metric", self.metric, tuple(EARLY_STOPPING_METRICS))
            )
        if self.eval_every < 0 or self.max_requests < 0 or self.min_delta < 0:
            raise ConfigError(
                "config keys 'early_stopping.eval_every', 'max_requests' and 'min_delta' must "
                "be >= 0. Fix: pass --config.early_stopping.eval_every=N with N >= 0"
            )
        _positive("early_stopping", patience=self.patience)

    @property
    def enabled(self) -> bool:
        return self.eval_every > 0


BASELINES = ("full_attention", "sim_hard", "twin")


@dataclasses.dataclass(frozen=True)
class BaselinesConfig:
    """Raw-history ranking baselines trained in the same harness (`pipeline.train_baselines`).

    Their width, heads and MLP come from `ranker`; they read the W events before the request.
    """

    models: tuple[str, ...] = BASELINES  # Any of BASELINES, trained in this order.
    top_k: int = 64  # SIM-hard and TWIN: history events kept by the search stage.
    chunk_size: int = 1024  # Events per scan step (full attention, SIM/TWIN search).

    def __post_init__(self):
        for name in self.models:
            if name not in BASELINES:
                raise ConfigError(_choice("baselines.models", name, BASELINES))
        _positive("baselines", top_k=self.top_k, chunk_size=self.chunk_size)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one run needs, typed and validated."""

    seed: int
    data: datasets.DataConfig
    summarizer: SummarizerConfig  # Vocabulary fields are 0 until `summarizer_for(data)`.
    ranker: RankerConfig
    source: TrainConfig
    downstream: TrainConfig
    cache: CacheConfig
    mesh: MeshConfig
    eval: EvalConfig
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    baselines: BaselinesConfig = BaselinesConfig(models=())

    def summarizer_for(self, data: datasets.SequenceData) -> SummarizerConfig:
        return dataclasses.replace(
            self.summarizer, num_items=data.num_items, num_categories=data.num_categories
        )

    def ranker_for(self, data: datasets.SequenceData, summary_dim: int) -> RankerConfig:
        return dataclasses.replace(
            self.ranker,
            num_items=data.num_items,
            num_categories=data.num_categories,
            num_recent=self.data.num_recent,
            summary_dim=summary_dim,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- the boundary ----------------------------------------------------------------------------
def _choice(key: str, value, valid) -> str:
    near = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return (
        f"config key '{key}' must be one of {tuple(valid)}, got {value!r}{hint} "
        f"Fix: pass --config.{key}=<one of them>"
    )


def _unknown(key: str, valid) -> ConfigError:
    prefix, _, name = key.rpartition(".")
    near = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    full = f"{prefix + '.' if prefix else ''}{near[0]}" if near else ""
    hint = f"did you mean '{full}'?" if near else "valid keys: " + ", ".join(sorted(valid))
    fix = f"Fix: use --config.{full}" if near else "Fix: use one of the valid keys"
    return ConfigError(f"unknown config key '{key}'; {hint} {fix}")


def _check_keys(section: str, given: Mapping, valid, required=()) -> None:
    for key in given:
        if key not in valid:
            raise _unknown(f"{section}.{key}" if section else key, valid)
    for key in required:
        if key not in given:
            raise ConfigError(
                f"config key '{section}.{key}' is missing. Fix: set it in the config file "
                "(experiments/common.py holds the shared defaults)"
            )


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _section(cls, section: str, given: Mapping, **fixed):
    """`cls(**given, **fixed)` with unknown keys named; missing keys take the field default.

    Derived fields (vocabulary sizes, widths read from other stages) are never config keys.
    """
    fields = {n: f for n, f in _fields(cls).items() if n not in DERIVED_FIELDS}
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
    _check_keys(section, given, fields, required)
    try:
        return cls(**dict(given), **fixed)
    except TypeError as e:
        raise ConfigError(f"config section '{section}': {e}. Fix: check its keys") from None


def _train(section: str, given: Mapping) -> TrainConfig:
    given = dict(given)
    _check_keys(section, given, _fields(TrainConfig), ("batch_size", "num_steps", "learning_rate"))
    _positive(section, batch_size=given["batch_size"], num_steps=given["num_steps"])
    n = given["num_steps"]
    derived = dict(warmup_steps=max(1, n // 10), checkpoint_every=max(1, n // 2))
    for key, value in derived.items():
        if given.get(key) is None:
            given[key] = value
    given.setdefault("keep_checkpoints", 2)
    given.setdefault("weight_decay", 1e-4)
    given.setdefault("grad_clip", 1.0)
    if given["learning_rate"] <= 0:
        raise ConfigError(
            f"config key '{section}.learning_rate' must be > 0. "
            f"Fix: pass --config.{section}.learning_rate=1e-3 or similar"
        )
    _positive(section, checkpoint_every=given["checkpoint_every"])
    _positive(section, keep_checkpoints=given["keep_checkpoints"])
    return TrainConfig(**given)


_DATA_COMMON = ("kind", "history_window", "num_recent", "data_dir", "task", "summary_lag")
_DATA_RANKING = ("train_candidates", "eval_every")
_DATA_RETRIEVAL = ("path", "delta_path", "snapshot_every", "num_negatives", "max_eval_users")
_DATA_EVENT_RANKING = ("positive_rating", "split", "valid_fraction", "test_fraction")


def _data(given: Mapping) -> datasets.DataConfig:
    given = dict(given)
    kind = given.get("kind")
    if kind not in datasets.KINDS:
        raise ConfigError(_choice("data.kind", kind, datasets.KINDS))
    if given.get("summary_lag", 0) < 0:
        raise ConfigError(
            f"config key 'data.summary_lag' must be >= 0 (events), got {given['summary_lag']}. "
            "Fix: pass --config.data.summary_lag=N with N >= 0 (0 = the freshest summary)"
        )
    if given.get("task", "") not in ("", *datasets.TASKS):
        raise ConfigError(_choice("data.task", given["task"], datasets.TASKS))
    if kind == "synthetic":
        if given.get("task", "ranking") != "ranking":
            raise ConfigError(
                "config key 'data.task' must be 'ranking' for synthetic data (its requests "
                "carry labelled candidates). Fix: drop --config.data.task"
            )
        generator = [n for n in _fields(SyntheticConfig) if n != "num_recent"]
        _check_keys("data", given, _DATA_COMMON + _DATA_RANKING + tuple(generator))
        syn = {k: given.pop(k) for k in generator if k in given}
        synthetic = SyntheticConfig(num_recent=given["num_recent"], **syn)
        return datasets.DataConfig(synthetic=synthetic, **given)
    options = tuple(_fields(EventLogOptions))
    _check_keys("data", given, _DATA_COMMON + _DATA_RETRIEVAL + _DATA_EVENT_RANKING + options)
    opts = {k: given.pop(k) for k in options if k in given}
    if "rating_scale" in opts:
        opts["rating_scale"] = tuple(opts["rating_scale"])
    data = datasets.DataConfig(log_options=EventLogOptions(**opts), **given)
    if data.task == "ranking":
        _check_event_ranking(data)
    return data


def _check_event_ranking(data: datasets.DataConfig) -> None:
    """The split and the label threshold of event-log ranking make sense."""
    if data.split not in datasets.SPLITS:
        raise ConfigError(_choice("data.split", data.split, datasets.SPLITS))
    low, high = data.log_options.rating_scale
    if not low < data.positive_rating <= high:
        raise ConfigError(
            f"config key 'data.positive_rating' ({data.positive_rating:g}) is outside the "
            f"rating scale ({low:g}, {high:g}]: every rating would be labelled the same. "
            f"Fix: pass --config.data.positive_rating=R with {low:g} < R <= {high:g}, or set "
            "--config.data.rating_scale to the log's scale"
        )
    fractions = (data.valid_fraction, data.test_fraction)
    if min(fractions) <= 0 or sum(fractions) >= 1:
        raise ConfigError(
            f"config keys 'data.valid_fraction' ({data.valid_fraction}) and "
            f"'data.test_fraction' ({data.test_fraction}) must each be > 0 and sum to < 1 "
            "(the rest is training). Fix: e.g. --config.data.valid_fraction=0.1"
        )
    _positive("data", snapshot_every=data.snapshot_every)


_TOP = ("seed", "data", "summarizer", "ranker", "source", "downstream", "cache", "mesh", "eval")
_TOP_OPTIONAL = ("early_stopping", "baselines")  # Off / none when absent.


def _baselines(given: Mapping) -> BaselinesConfig:
    given = dict(given)
    if "models" in given:
        models = given["models"]
        # A flag gives one string: "twin" or "sim_hard,twin".
        given["models"] = (
            tuple(filter(None, models.split(","))) if isinstance(models, str) else tuple(models)
        )
    return _section(BaselinesConfig, "baselines", given)


def from_config_dict(config) -> ExperimentConfig:
    """The boundary: a ConfigDict (or plain nested dict) -> a validated ExperimentConfig."""
    if isinstance(config, ExperimentConfig):
        return config
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    _check_keys("", raw, _TOP + _TOP_OPTIONAL, _TOP)
    zero_vocab = {"num_items": 0, "num_categories": 0}  # Filled in by summarizer_for/ranker_for.
    cfg = ExperimentConfig(
        seed=int(raw["seed"]),
        data=_data(raw["data"]),
        summarizer=_section(SummarizerConfig, "summarizer", raw["summarizer"], **zero_vocab),
        ranker=_section(
            RankerConfig, "ranker", raw["ranker"], num_recent=0, summary_dim=0, **zero_vocab
        ),
        source=_train("source", raw["source"]),
        downstream=_train("downstream", raw["downstream"]),
        cache=_section(CacheConfig, "cache", raw["cache"]),
        mesh=_section(MeshConfig, "mesh", raw["mesh"]),
        eval=_section(EvalConfig, "eval", raw["eval"]),
        early_stopping=_section(
            EarlyStoppingConfig, "early_stopping", raw.get("early_stopping", {})
        ),
        baselines=_baselines(raw.get("baselines", {"models": ()})),
    )
    if cfg.data.task == "retrieval" and (cfg.early_stopping.enabled or cfg.baselines.models):
        raise ConfigError(
            "config keys 'early_stopping.eval_every' and 'baselines.models' apply to the "
            "ranking task only (retrieval selects by epoch in experiments/ml1m/"
            "train_sequential.py). Fix: set --config.data.task=ranking, or "
            "--config.early_stopping.eval_every=0 and --config.baselines.models=''"
        )
    if cfg.data.kind == "synthetic" and cfg.early_stopping.enabled and cfg.data.eval_every < 3:
        raise ConfigError(
            f"config key 'data.eval_every' ({cfg.data.eval_every}) must be >= 3 with early "
            "stopping on synthetic data: users u % eval_every == 0 are test, == 1 validation, "
            "the rest train. Fix: --config.data.eval_every=5"
        )
    if cfg.cache.quantization not in QUANTIZATIONS:
        raise ConfigError(_choice("cache.quantization", cfg.cache.quantization, QUANTIZATIONS))
    if cfg.eval.split not in EVAL_SPLITS:
        raise ConfigError(_choice("eval.split", cfg.eval.split, EVAL_SPLITS))
    _positive("eval", batch_size=cfg.eval.batch_size, bootstrap_samples=cfg.eval.bootstrap_samples)
    _positive("cache", chunk_rows=cfg.cache.chunk_rows, batch_size=cfg.cache.batch_size)
    _check_store_root(cfg.cache.root)
    return cfg


def _check_store_root(root: str) -> None:
    """A cache root that TensorStore cannot parse is refused before any work runs."""
    if not root:
        return
    import tensorstore as ts  # Here only: the config boundary stays light.

    from vista_jax.store_layout import root_spec

    try:
        ts.KvStore.Spec(root_spec(root))
    except (UserError, ValueError, TypeError) as e:
        raise ConfigError(
            f"config key 'cache.root' ({root[:120]!r}) is not a store root: "
            f"{str(e).splitlines()[0].split(' Fix: ')[0]} Fix: pass a path, a URL such as "
            's3://my-bucket/cache/, or a kvstore spec as JSON, e.g. {"driver": "s3", '
            '"bucket": "my-bucket", "path": "cache/"}'
        ) from None

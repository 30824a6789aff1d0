r"""Serving latency: VISTA's `Scorer` against full target attention over the raw history.

  python -m experiments.bench.serving [--lengths=1000,100000,1000000] [--full_ta_length=100000]

One request is one user and `--candidates` (200) candidates, scored at batch 1. For each
history length a small synthetic dataset is built (`--users` users, `datasets.build`: the
tfds/array_record records the pipeline reads), and a workdir whose `source/` holds a
randomly initialised summarizer and `downstream/` a randomly initialised ranker. The cost
of a forward pass does not depend on the weights, so nothing is trained; the cache is built
by the pipeline's own `build_cache` from that summarizer (one int8 `SummaryStore` version),
and the scorer is loaded by `Scorer.load`, pinned to that version, as in production.

What each timed request includes:

  vista    `Scorer.score([u], candidates, recent)`: the store read of u's row of the pinned
           version and the ranker forward (`evaluation.jitted_forward`), logits back on the
           host. The request's recent events (the last R) come with it, built beforehand,
           as a client sends them; no event record is opened.
  full_ta  the pipeline's full-attention input path: the user's record read from the
           dataset (`data.source[u]`, array_record), the `live` example sliced and padded
           from it (`examples.ranking_example`: the W = history-length events before the
           request, as `inputs.eval_examples(..., live=True)` builds them), stacked to a batch
           of 1, and `FullTargetAttentionRanker`'s jitted forward (the config's
           `baselines.chunk_size`), logits back on the host. `read_p50_ms`, `input_p50_ms`
           and `forward_p50_ms` are the medians of those three parts.

Every function is called `--warmup` times first (compiles excluded). Then `--rounds` rounds
at batch 1: each round times one full_ta request and `--vista_per_round` VISTA requests at
each length (users in turn), with the order of the two kinds alternating between rounds, so
load that drifts during the run (this machine is shared) hits both alike. `p50_ms` and
`p99_ms` are percentiles of those per-request wall times (full_ta's p99 of 30 requests is
about their maximum); `qps_batch1` is 1 / their mean (requests served back to back, one at a
time).

`qps` is throughput as a server runs it: requests grouped in micro-batches of `--batch`
users (the same size for both kinds; users in turn, each with its own candidates and recent
events), one batch after another; qps = batch size / mean batch wall time, measured at
`--full_ta_length` over `--batch_rounds` alternating rounds (one full_ta batch and
`--vista_per_round` VISTA batches each). A VISTA batch is one `Scorer.score` call; a full_ta
batch reads and slices each user's record and runs one forward over the stacked batch.
At batch 1 VISTA's forward is mostly fixed per-call cost on a CPU (small matmuls, waking
the thread pool: ~1 ms for ~30 MFLOP), which a batch shares; full_ta is compute-bound at
either size. `batch_p50_ms` is the median wall time of one batch.
`qps_ratio_vista_over_full_ta` compares the two `qps` at `--full_ta_length`,
`qps_ratio_batch1` the `qps_batch1` (and `p50_ratio_full_ta_over_vista` the batch-1 medians,
which a loaded machine's tail moves less);
`vista_p50_ratio_1m_over_1k` is VISTA's p50 at the longest length over the shortest (1M over
1k at the defaults). `records_read` counts the event records each kind opened during the
timed requests (full_ta: one per request; vista: none). Prints progress to stderr and one JSON
object as the last stdout line; `experiments.bench.summary_store` embeds it as `serve`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx

from experiments.synthetic import config as synthetic_config
from vista_jax import cache, checkpoints, evaluation, pipeline
from vista_jax.config import ExperimentConfig, from_config_dict
from vista_jax.data import examples as ex
from vista_jax.data import inputs
from vista_jax.data.datasets import SequenceData
from vista_jax.fingerprints import git_commit
from vista_jax.models.summarizer import Summarizer
from vista_jax.serving import RECENT_KEYS, Scorer


@dataclasses.dataclass(frozen=True)
class ServeBenchConfig:
    """Sizes of the serving benchmark (the defaults are the issue's: 200 candidates, 100k
    events for the comparison, 1k / 100k / 1M for VISTA's flatness, k=128, d=64)."""

    lengths: tuple[int, ...] = (1_000, 100_000, 1_000_000)  # VISTA's history lengths.
    full_ta_length: int = 100_000  # Where full target attention is compared (in `lengths`).
    users: int = 4  # Users per dataset; requests take them in turn.
    candidates: int = 200
    k: int = 128  # Summary tokens.
    d: int = 64  # Width of summarizer, summaries and rankers (MLPs 2d).
    # Events per scan step of full target attention: the pipeline's `baselines.chunk_size`
    # default. On this CPU 512..2048 ran alike at 100k events and 8192 about 3x slower.
    ta_chunk_size: int = 1024
    rounds: int = 30
    vista_per_round: int = 10  # VISTA requests (or batches) per length per round.
    batch: int = 8  # Requests per micro-batch of the `qps` (throughput) figure.
    batch_rounds: int = 6  # Rounds of batches (one full_ta batch each).
    warmup: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.full_ta_length not in self.lengths:
            raise ValueError(f"full_ta_length {self.full_ta_length} not in lengths {self.lengths}")
        if min(self.users, self.rounds, self.vista_per_round, self.warmup, self.batch,
               self.batch_rounds) < 1:  # fmt: skip
            raise ValueError(
                "users, rounds, vista_per_round, warmup, batch and batch_rounds must be >= 1"
            )


def log(msg: str) -> None:
    print(f"[serving {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class ReadCount:
    records: int = 0
    events: int = 0


class CountingSource:
    """A dataset source that counts the records (and events) read through it in `count`."""

    def __init__(self, source, count: ReadCount):
        self._source, self.count = source, count

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, user: int) -> dict[str, np.ndarray]:
        record = self._source[user]
        self.count.records += 1
        self.count.events += len(record["item"])
        return record


def counted(fn: Callable, count: ReadCount) -> Callable:
    """`fn(request)`'s times, plus the records and events it read."""

    def run(request):
        records, events = count.records, count.events
        out = fn(request)
        return out | {"records": count.records - records, "events": count.events - events}

    return run


# -- setup (untimed) --------------------------------------------------------------------------
def experiment_config(cfg: ServeBenchConfig, length: int, data_dir) -> ExperimentConfig:
    """The synthetic experiment's config at k, d, with `cfg.users` users of `length` events
    whose summaries (and full target attention's window) cover the whole history."""
    c = synthetic_config.get_config()
    c.seed = cfg.seed
    c.data.update(num_users=cfg.users, history_len=length, history_window=length,
                  num_candidates=cfg.candidates, data_dir=str(data_dir), seed=cfg.seed)  # fmt: skip
    c.summarizer.update(d_model=cfg.d, num_seeds=cfg.k, sglu_hidden=2 * cfg.d,
                        chunk_size=min(2048, length))  # fmt: skip
    c.ranker.update(d_model=cfg.d, mlp_hidden=2 * cfg.d)
    c.cache.batch_size = cfg.users
    c.baselines.chunk_size = cfg.ta_chunk_size
    return from_config_dict(c)


def save_untrained(directory: pathlib.Path, name: str, module: nnx.Module, meta=None) -> None:
    """Step 0 of a stage directory holding `module`'s (random) parameters as item `name`."""
    with checkpoints.manager(directory, (name,)) as mngr:
        opt_state = {"step": np.zeros((), np.int32)}  # Never trained: no optimizer state.
        checkpoints.save(mngr, 0, {name: module}, opt_state, {}, meta)
        mngr.wait_until_finished()


def serving_workdir(config: ExperimentConfig, workdir: pathlib.Path, data: SequenceData) -> Scorer:
    """source/ (random summarizer) -> build_cache -> downstream/ (random ranker) -> Scorer."""
    summarizer = Summarizer(config.summarizer_for(data), nnx.Rngs(config.seed))
    save_untrained(workdir / "source", "summarizer", summarizer)
    pipeline.build_cache(config, workdir, data)
    store = cache.open_cache(workdir, config.summarizer_for(data), data)
    ranker = pipeline.build_ranker(config, data, store.d, config.seed)
    save_untrained(workdir / "downstream", "ranker", ranker, cache.trained_on(store))
    # Every user has a row: the fallback is never used, so no recent_only/ is needed.
    return Scorer.load(config, workdir, data, fallback="masked")


@dataclasses.dataclass(frozen=True)
class Request:
    """A batch of B user requests (B = 1 for the latency rounds)."""

    users: np.ndarray  # [B] int64
    candidates: np.ndarray  # [B, C] int32
    recent: dict[str, np.ndarray]  # The last R events, [B, R] (recent_len [B]).


def requests(data: SequenceData) -> list[Request]:
    """One request per user, after its history: the record's candidates and recent events."""
    out = []
    for u in range(data.num_users):
        record = data.source[u]
        recent = ex.recent_arrays(record, len(record["item"]), data.spec)
        out.append(Request(np.array([u]), np.asarray(record["cand_item"], np.int32)[None],
                           {k: np.asarray(recent[k])[None] for k in RECENT_KEYS}))  # fmt: skip
    return out


def batched(reqs: list[Request], size: int) -> list[Request]:
    """`len(reqs)` batches of `size` requests each, batch i taking users i, i+1, ... in turn."""
    out = []
    for i in range(len(reqs)):
        part = [reqs[(i + j) % len(reqs)] for j in range(size)]
        out.append(Request(
            np.concatenate([r.users for r in part]),
            np.concatenate([r.candidates for r in part]),
            {k: np.concatenate([r.recent[k] for r in part]) for k in RECENT_KEYS},
        ))  # fmt: skip
    return out


# -- the two request paths --------------------------------------------------------------------
def vista_request(scorer: Scorer, request: Request) -> dict[str, float]:
    t0 = time.perf_counter()
    scored = scorer.score(request.users, request.candidates, request.recent)
    seconds = time.perf_counter() - t0
    assert not scored.recent_only.any(), "every benchmark user has a summary"
    return {"total": seconds}


def full_ta_path(config: ExperimentConfig, data: SequenceData):
    """`request -> seconds` of full target attention from the stored record (see module doc)."""
    model = pipeline.build_baseline(config, data, "full_attention", config.seed)
    forward = evaluation.jitted_forward(model)
    live = dataclasses.replace(data.spec, live=True)  # As `inputs.eval_examples(live=True)`.

    def run(request: Request) -> dict[str, float]:
        t0 = time.perf_counter()
        records = [data.source[u] for u in request.users.tolist()]
        t1 = time.perf_counter()
        examples = [ex.ranking_example(record, live, u, data.item_category)
                    for u, record in zip(request.users.tolist(), records, strict=True)]  # fmt: skip
        batch = inputs.model_inputs(ex.stack(examples), drop_history=False)
        t2 = time.perf_counter()
        np.asarray(forward(batch))
        t3 = time.perf_counter()
        return {"total": t3 - t0, "read": t1 - t0, "input": t2 - t1, "forward": t3 - t2}

    return run


# -- timing -----------------------------------------------------------------------------------
def latency_summary(times: list[dict[str, float]]) -> dict:
    total_ms = 1e3 * np.array([t["total"] for t in times])
    out = {
        "p50_ms": float(np.percentile(total_ms, 50)),
        "p99_ms": float(np.percentile(total_ms, 99)),
        "mean_ms": float(total_ms.mean()),
        "qps_batch1": float(1e3 / total_ms.mean()),
        "requests": len(times),
    }
    for part in ("read", "input", "forward"):
        if part in times[0]:
            out[f"{part}_p50_ms"] = float(np.median([1e3 * t[part] for t in times]))
    out["records_read"] = int(sum(t["records"] for t in times))
    out["events_read"] = int(sum(t["events"] for t in times))
    return out


def throughput(times: list[dict[str, float]], batch: int) -> dict:
    """`qps` (requests per second of back-to-back batches) and the batch wall times."""
    total_ms = 1e3 * np.array([t["total"] for t in times])
    return {
        "qps": float(batch * 1e3 / total_ms.mean()),
        "batch": batch,
        "batch_p50_ms": float(np.percentile(total_ms, 50)),
        "batches": len(times),
    }


def time_rounds(
    full_ta: Callable, ta_requests: list, vista: dict, cfg: ServeBenchConfig, rounds: int
):
    """Per-request (or per-batch) times of full_ta and of each VISTA length, in alternating
    rounds."""
    ta_times, vista_times = [], {length: [] for length in vista}
    step = 0
    for r in range(rounds):
        kinds = ("full_ta", "vista") if r % 2 == 0 else ("vista", "full_ta")
        for kind in kinds:
            if kind == "full_ta":
                ta_times.append(full_ta(ta_requests[r % len(ta_requests)]))
                continue
            for _ in range(cfg.vista_per_round):
                for length, (fn, reqs) in vista.items():
                    vista_times[length].append(fn(reqs[step % len(reqs)]))
                step += 1
        if r % 5 == 4 or r == rounds - 1:
            log(f"round {r + 1}/{rounds}: full_ta {1e3 * ta_times[-1]['total']:.1f} ms")
    return ta_times, vista_times


def measure(cfg: ServeBenchConfig | None = None, data_dir=None) -> dict:
    """The `serve` record (see the module docstring) at `cfg` (default: the issue's sizes).
    Datasets are built under `data_dir` (reused when present: they are fingerprinted) or a
    temporary directory; the workdirs (checkpoints, cache) always go to a temporary one."""
    cfg = cfg or ServeBenchConfig()
    top = pathlib.Path(tempfile.mkdtemp(prefix="serving_bench_"))
    try:
        return _measure(cfg, pathlib.Path(data_dir) if data_dir else top / "data", top)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _measure(cfg: ServeBenchConfig, data_dir: pathlib.Path, top: pathlib.Path) -> dict:
    count = ReadCount()  # Every record any path reads, from every dataset.
    vista, setup_s = {}, {}
    for length in sorted(set(cfg.lengths)):
        t0 = time.perf_counter()
        config = experiment_config(cfg, length, data_dir)
        data = pipeline.load_data(config, top / f"L{length}")
        data = dataclasses.replace(data, source=CountingSource(data.source, count))
        scorer = serving_workdir(config, top / f"L{length}", data)
        reqs = requests(data)
        vista[length] = (counted(lambda r, s=scorer: vista_request(s, r), count), reqs)
        if length == cfg.full_ta_length:
            full_ta = counted(full_ta_path(config, data), count)
            ta_requests = reqs
        setup_s[str(length)] = time.perf_counter() - t0
        models = {"summarizer": dataclasses.asdict(config.summarizer_for(data)),
                  "ranker": dataclasses.asdict(scorer.ranker_config)}  # fmt: skip
        log(f"L={length}: dataset, cache and scorer ready in {setup_s[str(length)]:.1f}s")
    n = cfg.full_ta_length
    vista_batched = {n: (vista[n][0], batched(vista[n][1], cfg.batch))}
    ta_batched = batched(ta_requests, cfg.batch)
    for _ in range(cfg.warmup):  # Compiles (and first reads) excluded, at both batch sizes.
        full_ta(ta_requests[0])
        full_ta(ta_batched[0])
        for fn, reqs in [*vista.values(), *vista_batched.values()]:
            fn(reqs[0])
    ta_times, vista_times = time_rounds(full_ta, ta_requests, vista, cfg, cfg.rounds)
    log(f"batches of {cfg.batch} requests at {n} events")
    ta_batch_times, vista_batch_times = time_rounds(
        full_ta, ta_batched, vista_batched, cfg, cfg.batch_rounds
    )
    by_length = {str(n): latency_summary(t) for n, t in vista_times.items()}
    lo, hi = str(min(cfg.lengths)), str(max(cfg.lengths))
    result = {
        "vista": by_length[str(n)] | throughput(vista_batch_times[n], cfg.batch),
        "full_ta": latency_summary(ta_times) | throughput(ta_batch_times, cfg.batch),
        "vista_by_length": by_length,
    }
    result["qps_ratio_vista_over_full_ta"] = result["vista"]["qps"] / result["full_ta"]["qps"]
    result["qps_ratio_batch1"] = result["vista"]["qps_batch1"] / result["full_ta"]["qps_batch1"]
    result["p50_ratio_full_ta_over_vista"] = result["full_ta"]["p50_ms"] / result["vista"]["p50_ms"]
    result["vista_p50_ratio_1m_over_1k"] = by_length[hi]["p50_ms"] / by_length[lo]["p50_ms"]
    result["config"] = config_record(cfg, config, models, setup_s)
    return result


def config_record(cfg: ServeBenchConfig, config: ExperimentConfig, models: dict, setup_s) -> dict:
    """What ran: the sizes, the models (of the longest length; the summarizer's chunk_size is
    min(2048, length)), the machine and its load."""
    return {
        **dataclasses.asdict(cfg),
        "lengths": list(cfg.lengths),
        **models,
        "num_recent": config.data.num_recent,
        "weights": "random init (cost does not depend on them)",
        "cache": {"quantization": config.cache.quantization, "kvstore": "file"},
        "timing": "p50/p99: per-request wall ms at batch 1, compile excluded; qps_batch1 = 1 / "
        "their mean; qps = requests/s in back-to-back micro-batches of `batch` requests; "
        "rounds alternate full_ta and vista",
        "setup_s": setup_s, "backend": jax.default_backend(), "jax": jax.__version__,
        "cpu_count": os.cpu_count(), "load_avg": list(os.getloadavg()),
        "python": platform.python_version(), "git_commit": git_commit(),
    }  # fmt: skip


# -- command line -----------------------------------------------------------------------------
def define_flags() -> None:
    """The command line of this module alone (importers, e.g. summary_store, call `measure`)."""
    d = ServeBenchConfig()
    flags.DEFINE_list("lengths", [str(n) for n in d.lengths], "VISTA's history lengths.")
    flags.DEFINE_integer("full_ta_length", d.full_ta_length, "Length full TA is compared at.")
    flags.DEFINE_integer("users", d.users, "Users per dataset.")
    flags.DEFINE_integer("candidates", d.candidates, "Candidates per request.")
    flags.DEFINE_integer("k", d.k, "Summary tokens.")
    flags.DEFINE_integer("d", d.d, "Model width.")
    flags.DEFINE_integer("ta_chunk_size", d.ta_chunk_size, "Full TA events per scan step.")
    flags.DEFINE_integer("rounds", d.rounds, "Timed rounds (one full_ta request each).")
    flags.DEFINE_integer("vista_per_round", d.vista_per_round, "VISTA requests per length/round.")
    flags.DEFINE_integer("batch", d.batch, "Requests per micro-batch of the qps figure.")
    flags.DEFINE_integer("batch_rounds", d.batch_rounds, "Rounds of batches (one full_ta each).")
    flags.DEFINE_integer("warmup", d.warmup, "Untimed calls of each path first.")
    flags.DEFINE_string("data_dir", "", "Where datasets are built (default: a temp dir).")


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every checkpoint write.
    f = flags.FLAGS
    cfg = ServeBenchConfig(
        lengths=tuple(int(n) for n in f.lengths), full_ta_length=f.full_ta_length,
        users=f.users, candidates=f.candidates, k=f.k, d=f.d, ta_chunk_size=f.ta_chunk_size,
        rounds=f.rounds, vista_per_round=f.vista_per_round, warmup=f.warmup, batch=f.batch,
        batch_rounds=f.batch_rounds,
    )  # fmt: skip
    print(json.dumps(measure(cfg, f.data_dir or None)))


if __name__ == "__main__":
    define_flags()
    app.run(main)

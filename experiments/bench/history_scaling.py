r"""How VISTA's costs scale with history length, against full target attention and softmax.

  python -m experiments.bench.history_scaling [--max_len=1000000] [--sweep]

Prints progress to stderr and one JSON object as the last stdout line (docs/PROTOCOLS.md
§5). Runs on whatever backend JAX picks (CPU here, a GPU when present); nothing assumes a CPU.

What is measured, for one user, and how:
  * summarizer: the jitted chunked form (3 QLA layers, d=64, k=128 seeds) from event ids to
    the summary. Each length runs in a fresh subprocess: compile ahead of time (excluded),
    then the median of `--repeats` runs. Peak memory growth of that run: on CPU the RSS
    high-water mark (VmHWM, reset through /proc/self/clear_refs after compiling) minus the
    RSS before the run; on an accelerator the allocator's peak_bytes_in_use minus
    bytes_in_use before the run. Both count only what running the summarizer adds.
  * ranker: scoring 200 candidates (all lengths timed round-robin, median of rounds, so
    drifting load on a shared machine hits each length alike). VISTA reads k=128 summary
    tokens + the last 32 events (the tail slice of the history is inside the timed call);
    full target attention
    (`FullTargetAttentionRanker`, 1 layer like the VISTA ranker) reads the raw history.
  * incremental: 1k new events on a 1M history: `incremental.update` from the stored states
    (gap features computed against the last stored time, inside the timed call) against a
    from-scratch recompute over all 1M + 1k events; max abs difference of the summaries.
  * FLOP/s: `vista_jax.costs.summarizer_flops` counts only necessary multiply-adds (x2
    FLOPs); a plain f32 matmul of n x n (n=2048, 17 GFLOP, about the work of one 64k-event
    chunk scan step batch) measured in the same run gives the machine's rate.
  * softmax vs QLA: the same summarizer with attention="softmax" at 16k events.
"""

from __future__ import annotations

import os

# Children and parent share one accelerator: never grab most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import csv  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from vista_jax import cache  # noqa: E402
from vista_jax.config import RankerConfig, SummarizerConfig  # noqa: E402
from vista_jax.costs import summarizer_flops  # noqa: E402
from vista_jax.data.features import gap_buckets  # noqa: E402
from vista_jax.models import incremental  # noqa: E402
from vista_jax.models.ranker import Ranker  # noqa: E402
from vista_jax.models.summarizer import Summarizer  # noqa: E402
from vista_jax.models.target_attention import FullTargetAttentionRanker  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("max_len", 1_000_000, "Longest history measured.")
flags.DEFINE_bool("sweep", False, "Also sweep lengths x4 apart; write a CSV and a log-log PNG.")
flags.DEFINE_integer("d_model", 64, "Model width of summarizer and rankers.")
flags.DEFINE_integer("num_heads", 2, "Attention heads.")
flags.DEFINE_integer("num_layers", 3, "QLA layers of the summarizer.")
flags.DEFINE_integer("num_seeds", 128, "Summary tokens k.")
flags.DEFINE_integer("chunk_size", 2048, "Events per scan step of the chunked summarizer.")
flags.DEFINE_integer("ta_chunk_size", 8192, "Events per scan step of full target attention.")
flags.DEFINE_integer("num_items", 100_000, "Item vocabulary.")
flags.DEFINE_integer("candidates", 200, "Candidates scored per request.")
flags.DEFINE_integer("recent", 32, "Recent raw events the VISTA ranker reads.")
flags.DEFINE_integer("new_events", 1000, "Events folded in by the incremental update.")
flags.DEFINE_integer("softmax_len", 16384, "Length of the softmax-vs-QLA comparison.")
flags.DEFINE_integer("softmax_max_len", 16384, "Longest softmax summarizer in the sweep.")
flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (the median is reported).")
flags.DEFINE_string("out_dir", "experiments/bench/results", "Where --sweep writes.")
flags.DEFINE_string("child", None, "Internal: run one summarizer measurement and exit.")
flags.DEFINE_integer("length", 0, "Internal: history length of a --child run.")

BENCH_LENGTHS = (1_000, 10_000, 100_000, 1_000_000)


def log(msg: str) -> None:
    print(f"[history_scaling {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ configs


def summarizer_config(attention: str = "qla") -> SummarizerConfig:
    d = FLAGS.d_model
    return SummarizerConfig(
        num_items=FLAGS.num_items, d_model=d, num_heads=FLAGS.num_heads,
        num_layers=FLAGS.num_layers, num_seeds=FLAGS.num_seeds, sglu_hidden=2 * d,
        attention=attention, chunk_size=FLAGS.chunk_size,
    )  # fmt: skip


def ranker_config() -> RankerConfig:
    d = FLAGS.d_model
    return RankerConfig(
        num_items=FLAGS.num_items, d_model=d, num_heads=FLAGS.num_heads, num_layers=1,
        mlp_hidden=2 * d, num_recent=FLAGS.recent, summary_dim=d,
    )  # fmt: skip


# ------------------------------------------------------------------------------ helpers


def synthetic_history(length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One user's events [1, L]: random items/actions, times with gaps of seconds to days."""
    rng = np.random.default_rng(seed)
    time_ = np.cumsum(rng.integers(1, 100_000, length, dtype=np.int64))
    return {
        "item": rng.integers(1, FLAGS.num_items + 1, (1, length), dtype=np.int32),
        "action": rng.integers(1, 6, (1, length), dtype=np.int32),
        "gap": gap_buckets(time_, np.array([0, length]))[None],
        "valid": np.ones((1, length), bool),
        "time": time_[None],
    }


def median_seconds(fn, repeats: int, min_total: float = 0.3, max_repeats: int = 200) -> float:
    """Median wall time of `fn()` (which must block); short calls are repeated more."""
    times = []
    while len(times) < repeats or (sum(times) < min_total and len(times) < max_repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def jit_module(module: nnx.Module, method):
    """`method(model, *args)` jitted with the parameters as an argument (no constants)."""
    graphdef, params = nnx.split(module)
    fn = jax.jit(lambda p, *args: method(nnx.merge(graphdef, p), *args))
    return lambda *args: fn(params, *args)


def summarize_fn(model: Summarizer):
    return jit_module(model, lambda m, i, a, g, v: m(i, a, g, v, form="chunked")[0])


def block(x):
    return jax.block_until_ready(x)


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Plain f32 n x n matmul rate on the default device (2 n^3 FLOPs)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    block(mm(a, b))
    seconds = median_seconds(lambda: block(mm(a, b)), repeats)
    return 2.0 * n**3 / seconds / 1e9


# ------------------------------------------------------------------------------ memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


class PeakMemory:
    """Peak memory a block of code adds: device allocator stats, else the host RSS HWM."""

    def __init__(self):
        stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
        self.device = stats is not None and "peak_bytes_in_use" in stats

    def __enter__(self):
        if self.device:
            self.before = jax.devices()[0].memory_stats()["bytes_in_use"]
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            except OSError as e:  # then VmHWM may still hold the compile's peak: an overestimate
                log(f"cannot reset VmHWM ({e}); peak memory includes setup")
            self.before = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device:
            peak = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
        else:
            peak = _status_kb("VmHWM") * 1024
        self.mb = max(0, peak - self.before) / 2**20


# ------------------------------------------------------------------------------ summarizer


def child_summarizer(length: int) -> dict:
    """Runs in a fresh process: time and peak memory of one user's summary at `length`."""
    model = Summarizer(summarizer_config(), nnx.Rngs(0))
    hist = synthetic_history(length)
    args = [jnp.asarray(hist[k]) for k in ("item", "action", "gap", "valid")]
    graphdef, params = nnx.split(model)

    def run(p, *a):
        return nnx.merge(graphdef, p)(*a, form="chunked")[0]

    compiled = jax.jit(run).lower(params, *args).compile()
    block(args)
    with PeakMemory() as mem:
        seconds = median_seconds(lambda: block(compiled(params, *args)), FLAGS.repeats)
    return {"length": length, "seconds": seconds, "peak_mb": mem.mb}


def summarizer_in_subprocess(length: int) -> dict:
    argv = [sys.executable, "-m", "experiments.bench.history_scaling", "--child=summarizer"]
    argv += [f"--length={length}"] + [f"--{n}={getattr(FLAGS, n)}" for n in _CHILD_FLAGS]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"summarizer child at L={length} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


_CHILD_FLAGS = ("d_model", "num_heads", "num_layers", "num_seeds", "chunk_size", "num_items",
                "repeats")  # fmt: skip


# ------------------------------------------------------------------------------ rankers


def vista_scorer(summary_1xKxD: jax.Array):
    """Scores candidates from a cached summary + the last R events of a (long) history."""
    ranker = Ranker(ranker_config(), nnx.Rngs(1))
    forward = jit_module(ranker, lambda m, batch: m(batch)[0])
    r = FLAGS.recent

    def score(hist, cand_item):
        recent = {f"recent_{k}": hist[k][:, -r:] for k in ("item", "action", "gap")}
        batch = {**recent, "recent_len": np.array([min(r, hist["item"].shape[1])]),
                 "summary": summary_1xKxD, "summary_mask": np.ones(1, bool),
                 "cand_item": cand_item}  # fmt: skip
        return block(forward(batch))

    return score


def full_ta_scorer():
    model = FullTargetAttentionRanker(ranker_config(), nnx.Rngs(1), FLAGS.ta_chunk_size)
    forward = jit_module(model, lambda m, batch: m(batch)[0])

    def score(hist_dev, cand_item):
        return block(forward({**hist_dev, "cand_item": cand_item}))

    return score


def interleaved_medians(fns: dict, rounds: int) -> dict:
    """Median seconds of each fn, measured round-robin so load drift hits every one alike."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(median_seconds(fn, 1, min_total=0.05))
    return {name: float(np.median(t)) for name, t in times.items()}


def ranker_seconds(lengths, summary) -> dict:
    """Seconds to score `candidates` for one user, VISTA vs full target attention."""
    rng = np.random.default_rng(3)
    cand = jnp.asarray(rng.integers(1, FLAGS.num_items + 1, (1, FLAGS.candidates), np.int32))
    vista, full_ta = vista_scorer(summary), full_ta_scorer()
    fns = {}
    for length in lengths:
        hist = synthetic_history(length, seed=length)
        hist_dev = {f"hist_{k}": jnp.asarray(hist[k]) for k in ("item", "action", "gap")}
        hist_dev["hist_len"] = jnp.array([length])
        fns["vista", str(length)] = functools.partial(vista, hist, cand)
        fns["full_ta", str(length)] = functools.partial(full_ta, hist_dev, cand)
    for fn in fns.values():
        fn()  # compile
    medians = interleaved_medians(fns, rounds=max(3, FLAGS.repeats))
    out = {"vista": {}, "full_ta": {}}
    for (kind, length), seconds in medians.items():
        out[kind][length] = seconds
    for length in map(str, lengths):
        log(f"ranker L={length}: vista {out['vista'][length]:.5f}s, "
            f"full TA {out['full_ta'][length]:.4f}s")  # fmt: skip
    return out


# ------------------------------------------------------------------------------ incremental


def incremental_benchmark(history: int) -> dict:
    """Update 1k new events from stored states vs recompute history + new from scratch."""
    model = Summarizer(summarizer_config(), nnx.Rngs(0))
    n_new = FLAGS.new_events
    full = synthetic_history(history + n_new, seed=7)
    old = {k: v[:, :history] for k, v in full.items()}
    states_fn = jit_module(model, lambda m, i, a, g, v: m.history_states(i, a, g, v))
    states = block(states_fn(*(jnp.asarray(old[k]) for k in ("item", "action", "gap", "valid"))))
    stored = cache.states_to_arrays(states)  # what the store holds, on the host
    last_time = old["time"][:, -1]
    update_fn = jit_module(model, incremental.update)

    def update():
        new_time = full["time"][:, history:]
        valid = np.ones_like(new_time, bool)
        gap = incremental.incremental_gaps(last_time, stored["state_l0_count"] > 0, new_time, valid)
        s = cache.arrays_to_states(stored, model.cfg.num_layers)
        new = (full["item"][:, history:], full["action"][:, history:], gap, valid)
        return block(update_fn(s, *new)[1])

    recompute_fn = summarize_fn(model)
    args = [jnp.asarray(full[k]) for k in ("item", "action", "gap", "valid")]
    summary, reference = update(), block(recompute_fn(*args))
    out = {"history": history, "new_events": n_new,
           "update_seconds": median_seconds(update, FLAGS.repeats),
           "recompute_seconds": median_seconds(lambda: block(recompute_fn(*args)), 1, 0.0),
           "max_abs_diff": float(jnp.max(jnp.abs(summary - reference)))}  # fmt: skip
    log(f"incremental: {out}")
    return out


# ------------------------------------------------------------------------------ softmax


def summarizer_seconds_in_process(length: int, attention: str) -> float:
    model = Summarizer(summarizer_config(attention), nnx.Rngs(0))
    hist = synthetic_history(length)
    fn = summarize_fn(model)
    args = [jnp.asarray(hist[k]) for k in ("item", "action", "gap", "valid")]
    block(fn(*args))
    return median_seconds(lambda: block(fn(*args)), FLAGS.repeats, 0.0)


def softmax_vs_qla(length: int) -> dict:
    out = {"length": length, "qla_seconds": summarizer_seconds_in_process(length, "qla"),
           "softmax_seconds": summarizer_seconds_in_process(length, "softmax")}  # fmt: skip
    log(f"softmax vs QLA: {out}")
    return out


# ------------------------------------------------------------------------------ sweep


def sweep(max_len: int, summary) -> list[dict]:
    """Cost per length, x4 apart from 1k: VISTA summarizer + ranker, full TA, softmax."""
    lengths = sorted({n for n in (1000 * 4**i for i in range(12)) if n < max_len} | {max_len})
    rows = []
    ranker = ranker_seconds(lengths, summary)
    for n in lengths:
        child = summarizer_in_subprocess(n)
        soft = summarizer_seconds_in_process(n, "softmax") if n <= FLAGS.softmax_max_len else None
        rows.append({"length": n, "vista_summarizer_s": child["seconds"],
                     "vista_summarizer_peak_mb": child["peak_mb"],
                     "vista_ranker_s": ranker["vista"][str(n)],
                     "full_ta_s": ranker["full_ta"][str(n)],
                     "softmax_summarizer_s": soft})  # fmt: skip
        log(f"sweep {rows[-1]}")
    return rows


def write_sweep(rows: list[dict], out_dir: str) -> dict:
    import matplotlib  # noqa: PLC0415 - only the sweep needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    os.makedirs(out_dir, exist_ok=True)
    csv_path, png_path = (os.path.join(out_dir, f"history_scaling.{x}") for x in ("csv", "png"))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    series = {"VISTA summarizer (offline, per user)": "vista_summarizer_s",
              "VISTA ranker (per request)": "vista_ranker_s",
              "full target attention (per request)": "full_ta_s",
              "softmax summarizer (offline)": "softmax_summarizer_s"}  # fmt: skip
    for label, key in series.items():
        pts = [(r["length"], r[key]) for r in rows if r[key] is not None]
        ax.loglog(*zip(*pts, strict=True), marker="o", label=label)
    ax.set(xlabel="history length (events)", ylabel="seconds", title=f"{jax.default_backend()}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    return {"csv": csv_path, "png": png_path}


# ------------------------------------------------------------------------------ main


def run_benchmark() -> dict:
    lengths = [n for n in BENCH_LENGTHS if n <= FLAGS.max_len]
    log(f"backend {jax.default_backend()}, devices {jax.devices()}")
    summ = {n: summarizer_in_subprocess(n) for n in lengths}
    for n, r in summ.items():
        log(f"summarizer L={n}: {r['seconds']:.3f}s, peak +{r['peak_mb']:.1f} MB")
    gflops_mm = matmul_gflops()
    longest = lengths[-1]
    gflops_summ = summarizer_flops(longest, summarizer_config()) / summ[longest]["seconds"] / 1e9
    log(f"matmul {gflops_mm:.1f} GFLOP/s, summarizer {gflops_summ:.1f} GFLOP/s at L={longest}")
    hist = synthetic_history(1000)
    model = Summarizer(summarizer_config(), nnx.Rngs(0))
    summary = summarize_fn(model)(*(hist[k] for k in ("item", "action", "gap", "valid")))
    result = {
        "lengths": lengths,
        "summarizer_seconds": {str(n): r["seconds"] for n, r in summ.items()},
        "summarizer_peak_mb": {str(n): r["peak_mb"] for n, r in summ.items()},
        "ranker_seconds": ranker_seconds(lengths, summary),
        "incremental": incremental_benchmark(longest),
        "matmul_gflops": gflops_mm,
        "summarizer_gflops": gflops_summ,
        "summarizer_flops_at_max_len": summarizer_flops(longest, summarizer_config()),
        "softmax_vs_qla_16k": softmax_vs_qla(FLAGS.softmax_len),
    }
    if FLAGS.sweep:
        rows = sweep(FLAGS.max_len, summary)
        result["sweep"] = {"rows": rows, **write_sweep(rows, FLAGS.out_dir)}
    result["ratios"] = ratios(result, lengths)
    result["config"] = config_record()
    return result


def ratios(r: dict, lengths: list[int]) -> dict:
    """The issue's targets as ratios of this run's figures (longest / reference lengths)."""
    lo, hi = str(lengths[0]), str(lengths[-1])
    prev = str(lengths[-2]) if len(lengths) > 1 else lo
    inc, soft = r["incremental"], r["softmax_vs_qla_16k"]
    summ_s, summ_mb = r["summarizer_seconds"], r["summarizer_peak_mb"]
    vista, full_ta = r["ranker_seconds"]["vista"], r["ranker_seconds"]["full_ta"]
    return {
        "summarizer_time_max_over_prev": summ_s[hi] / summ_s[prev],
        "summarizer_peak_mb_max_over_prev": summ_mb[hi] / max(summ_mb[prev], 1e-9),
        "summarizer_over_matmul_flops": r["summarizer_gflops"] / r["matmul_gflops"],
        "vista_ranker_max_over_min": vista[hi] / vista[lo],
        "full_ta_max_over_min": full_ta[hi] / full_ta[lo],
        "incremental_speedup": inc["recompute_seconds"] / inc["update_seconds"],
        "softmax_over_qla": soft["softmax_seconds"] / soft["qla_seconds"],
    }  # fmt: skip


def config_record() -> dict:
    return {
        "summarizer": dataclasses.asdict(summarizer_config()),
        "ranker": dataclasses.asdict(ranker_config()),
        "candidates": FLAGS.candidates, "new_events": FLAGS.new_events,
        "ta_chunk_size": FLAGS.ta_chunk_size, "repeats": FLAGS.repeats,
        "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__, "cpu_count": os.cpu_count(),
        "timing": "median wall seconds, compile excluded",
        "memory": "peak growth during the run: host VmHWM (CPU) or device peak_bytes_in_use",
    }  # fmt: skip


def main(argv):
    del argv
    if FLAGS.child == "summarizer":
        print(json.dumps(child_summarizer(FLAGS.length)))
        return
    print(json.dumps(run_benchmark()))


if __name__ == "__main__":
    app.run(main)

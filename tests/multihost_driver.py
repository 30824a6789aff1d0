"""One process of the multi-process test (tests/multihost_test.py): run.py's flags, then
`train_source` and `build_cache`, recording every training step's metrics.

    python tests/multihost_driver.py --devices=2 --out=DIR \
        --config=experiments/synthetic/config.py:tiny --workdir=W [--config.x=...] \
        [--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=I]

The multi-process flags are run.py's own (`run.distributed_options`); `--devices` sets the
host platform's device count before JAX starts. Writes `DIR/metrics_<process>.json`: the
metrics of every step, in order.
"""

import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _pop_flag(argv: list[str], name: str) -> str | None:
    for a in list(argv):
        if a.startswith(f"--{name}="):
            argv.remove(a)
            return a.split("=", 1)[1]
    return None


def main(argv: list[str]) -> None:
    devices = _pop_flag(argv, "devices") or "1"
    out = pathlib.Path(_pop_flag(argv, "out"))
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"

    import run  # noqa: E402  (after XLA_FLAGS: its imports must not start a backend first)
    from vista_jax import distributed, pipeline, train

    run.define_flags()
    run.parse_flags(argv)
    distributed.initialize(run.distributed_options())
    steps = []

    class Recorder(train.Progress):
        def update(self, step, metrics, force=False):
            steps.append({"stage": self.stage, "step": step, **metrics})

    train.Progress = Recorder
    config, workdir = run.FLAGS.config, pathlib.Path(run.FLAGS.workdir)
    for mode in ("train_source", "build_cache"):
        pipeline.train_and_evaluate(config, workdir, mode)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"metrics_{distributed.process_index()}.json").write_text(json.dumps(steps))


if __name__ == "__main__":
    main(sys.argv)

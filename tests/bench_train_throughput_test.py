"""The training-throughput benchmark at a tiny size (full synthetic windows, no data): its
record, and the sampled softmax's share of the step. No wall-clock asserts."""

import json
import subprocess
import sys

from subprocesses import TIMEOUT_S


def test_record_has_the_timed_model_and_its_loss_breakdown():
    flags = ["--models=hstu", "--steps=1", "--batch=4", "--window=20", "--d_model=8",
             "--num_negatives=16", "--data_dir="]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench.train_throughput", *flags],
        capture_output=True, text=True, check=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["config"]["batches"] == "full" and out["config"]["window"] == 20
    assert set(out["sequences_per_second"]) == set(out["sampled_softmax"]) == {"hstu"}
    detail = out["details"]["full/per_position"]["hstu"]
    assert detail["sampled_softmax_ms"] > 0
    assert out["sampled_softmax"]["hstu"]["share_of_step"] == round(
        detail["sampled_softmax_ms"] / detail["step_ms"], 3
    )

"""The training-throughput benchmark at a tiny size (full synthetic windows, no data): its
record, and the sampled softmax's cost model. No wall-clock asserts."""

import json
import subprocess
import sys


def test_record_has_every_model_and_the_loss_breakdown():
    flags = ["--models=hstu", "--steps=1", "--batch=4", "--window=20", "--d_model=8",
             "--num_negatives=16", "--data_dir="]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench.train_throughput", *flags],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["config"]["batches"] == "full" and out["config"]["window"] == 20
    assert set(out["sequences_per_second"]) == set(out["sampled_softmax"]) == {"hstu"}
    detail = out["details"]["full/per_position"]["hstu"]
    # Every position of the 4 x 20 synthetic rows is supervised: the packed capacity rounds
    # 80 up to 4 * 20 / 8 = 10 per bucket, so 80; three [80, 3707] x 8 products.
    assert detail["sampled_softmax_gflop"] * 1e9 == 6 * 80 * 3707 * 8
    for model in out["sampled_softmax"].values():
        assert model["ms"] > 0 and model["share_of_step"] > 0 and model["matmul_bound_ms"] > 0

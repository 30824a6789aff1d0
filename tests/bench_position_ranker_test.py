"""The position-ranker benchmark at a tiny size: its record, and its two forms agree. No
wall-clock asserts."""

import json
import subprocess
import sys

from subprocesses import TIMEOUT_S


def test_record_has_both_forms_and_they_give_the_same_logits():
    flags = ["--steps=1", "--batch=4", "--window=20", "--snapshot_every=6", "--num_seeds=3",
             "--num_recent=5", "--d_model=8", "--num_items=50"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench.position_ranker", *flags],
        capture_output=True, text=True, check=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    forms = {"per_snapshot", "per_position_copies"}
    assert set(out["seconds"]) == set(out["positions_per_second"]) == forms
    assert all(set(s) == {"train_step", "score"} for s in out["seconds"].values())
    assert set(out["speedup"]) == {"train_step", "score"}
    assert out["max_abs_logit_diff"] < 1e-5
    assert out["config"]["window"] == 20 and out["config"]["snapshot_every"] == 6

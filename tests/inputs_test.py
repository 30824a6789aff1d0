"""Input wiring on a built dataset: who is in which split, and a quiet stdout."""

import numpy as np
import pytest
from subprocesses import TIMEOUT_S

from experiments.eventlog import config as eventlog_config
from vista_jax import pipeline
from vista_jax.config import from_config_dict
from vista_jax.data import inputs


def _log_with_lengths(path, lengths):
    rows = ["user,item,timestamp"]
    for user, n in enumerate(lengths):
        rows += [f"u{user},{1 + (user + t) % 7},{100 * t}" for t in range(n)]
    path.write_text("\n".join(rows) + "\n")


def test_short_users_are_left_out_of_validation_and_test(tmp_path, capsys):
    _log_with_lengths(tmp_path / "e.csv", [5, 2, 6])
    config = eventlog_config.get_config("tiny")
    config.data.path = str(tmp_path / "e.csv")
    config.data.max_eval_users = 0
    data = pipeline.load_data(from_config_dict(config), tmp_path / "work")
    assert capsys.readouterr().out == ""  # tfds' messages go to stderr, not stdout.
    for split, offset in (("valid", 2), ("test", 1)):
        requests = inputs.eval_examples(data, split)
        assert [int(r["user"]) for r in requests] == [0, 2]
        targets = [int(r["target_item"]) for r in requests]
        records = [data.source[u] for u in (0, 2)]
        assert targets == [int(rec["item"][len(rec["item"]) - offset]) for rec in records]
    stream = inputs.train_examples(data, 0)
    train_users = {int(stream[i]["user"]) for i in range(50)}
    assert train_users == {0, 2}
    assert np.all(data.lengths == [5, 2, 6])
    # Raw-history (live) streams exist to carry the window; a cache-fed one never slices it.
    assert not any(k.startswith("hist_") for k in inputs.train_examples(data, 0, False)[0])
    with pytest.raises(ValueError, match="live"):
        inputs.train_examples(data, 0, with_history=False, live=True)


def test_data_build_entry_point(tmp_path):
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    run = subprocess.run(
        [sys.executable, "-m", "data.build", "--config=experiments/synthetic/config.py:tiny",
         f"--data_dir={tmp_path}"],
        cwd=root, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "60 users" in run.stdout and "(ranking)" in run.stdout

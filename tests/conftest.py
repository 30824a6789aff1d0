"""Tests run on 8 fake CPU devices (the flag must be set before JAX starts); `tiny_run` is the
one tiny pipeline run that test modules share."""

import os
import shutil

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Every stage of the tiny synthetic config, once per session: (config, workdir, results).

    Stage isolation: the downstream ranker trains from the cache with the source model gone.
    Tests must not change the workdir (copy it first).
    """
    from experiments.synthetic import config as synthetic_config
    from vista_jax import pipeline

    workdir = tmp_path_factory.mktemp("vista")
    config = synthetic_config.get_config("tiny")
    config.data.data_dir = str(tmp_path_factory.mktemp("data"))
    for mode in ("train_source", "build_cache"):
        pipeline.train_and_evaluate(config, workdir, mode)
    shutil.move(workdir / "source", workdir / "source.hidden")
    pipeline.train_and_evaluate(config, workdir, "train_ranker")
    shutil.move(workdir / "source.hidden", workdir / "source")
    results = pipeline.train_and_evaluate(config, workdir, "evaluate")
    return config, workdir, results

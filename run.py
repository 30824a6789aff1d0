"""Entry point: parse flags and a config file, then run the pipeline (vista_jax.pipeline).

python run.py --config=experiments/synthetic/config.py --workdir=/tmp/vista --mode=all

Launched as N processes (one per host or GPU), each joins the run with --distributed
(cluster auto-detection: SLURM, Open MPI, Cloud TPU, Kubernetes) or with
--coordinator_address, --num_processes and --process_id (docs/MULTIHOST.md).

Mistakes a user can fix (bad data, flags, config, cache, checkpoint) print as one line on
stderr and exit with status 2; `--verbose` shows their traceback too.
"""

import difflib
import importlib.util
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vista_jax import distributed, pipeline
from vista_jax.errors import UserError

FLAGS = flags.FLAGS
USER_ERROR_EXIT = 2


def define_flags() -> None:
    """The command line, defined only when run as a program (or by a caller that parses it,
    e.g. the multi-process test driver): importing this module defines no flag."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    flags.DEFINE_string("workdir", None, "Where every stage reads and writes.")
    flags.DEFINE_enum("mode", "all", pipeline.MODES, "Which stage(s) to run.")
    flags.DEFINE_bool("verbose", False, "Show tracebacks of user errors too.")
    flags.DEFINE_bool(
        "distributed",
        False,
        "Join a multi-process run via jax.distributed.initialize(), which detects the cluster "
        "(SLURM, Open MPI, Cloud TPU, Kubernetes) and reads JAX_COORDINATOR_ADDRESS. Implied "
        "by any of the flags below.",
    )
    flags.DEFINE_string(
        "coordinator_address", None, "Multi-process run: host:port of process 0's coordinator."
    )
    flags.DEFINE_integer("num_processes", None, "Multi-process run: process count.")
    flags.DEFINE_integer("process_id", None, "Multi-process run: this process, 0..N-1.")
    flags.DEFINE_list(
        "local_device_ids", None, "Multi-process run: the local devices (GPU ids) of this process."
    )
    flags.mark_flags_as_required(["config", "workdir"])


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_EXIT)


def _config_keys(config, prefix=""):
    for key, value in config.items():
        name = f"{prefix}{key}"
        yield name
        if hasattr(value, "items"):
            yield from _config_keys(value, name + ".")


def _load_config(argv):
    """The config file named by --config (without overrides), or None if it does not load."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None:
        return None
    path, _, arg = path.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("_config_for_errors", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(arg or None)
    except Exception:  # The real error is reported instead.
        return None


def _flag_error(error: Exception, argv) -> str:
    """One line for a flag error; an unknown --config.x.y names the nearest valid key."""
    text = " ".join(str(error).split())
    raised = re.search(r"vista_jax\.errors\.\w+: (.*)$", text)  # Raised by a config file.
    if raised:
        return raised.group(1)
    bad = re.findall(r"--config\.([\w.]+)", " ".join(argv))
    config = _load_config(argv) if bad else None
    if config is not None:
        keys = list(_config_keys(config))
        for key in bad:
            if key not in keys:
                near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
                hint = f"; did you mean --config.{near[0]}?" if near else ""
                fix = f"Fix: use --config.{near[0]}" if near else "Fix: check the config file"
                return f"unknown config key --config.{key}{hint} {fix}"
    return text if "Fix: " in text else f"{text}. Fix: correct the flag (--helpfull lists all)"


def parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError) as e:  # ml_collections: unknown keys.
        _fail(_flag_error(e, argv))
    except UserError as e:  # Raised while loading the config file (e.g. a variant typo).
        _fail(str(e))


def distributed_options() -> distributed.DistributedOptions:
    """The multi-process flags; none given: a single process (no jax.distributed)."""
    local = FLAGS.local_device_ids
    return distributed.DistributedOptions(
        enabled=FLAGS.distributed,
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
        local_device_ids=tuple(int(i) for i in local) if local else None,
    )


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
    try:
        distributed.initialize(distributed_options())  # Before anything touches JAX.
        pipeline.train_and_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.mode)
    except UserError as e:
        if FLAGS.verbose:
            raise
        _fail(str(e))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)

"""Entry point: parse flags and a config file, then run the pipeline (vista_jax.pipeline).

python run.py --config=experiments/synthetic/config.py --workdir=/tmp/vista --mode=all
"""

from absl import app, flags, logging
from ml_collections import config_flags

from vista_jax import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where every stage reads and writes.")
_MODE = flags.DEFINE_enum("mode", "all", pipeline.MODES, "Which stage(s) to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
    pipeline.train_and_evaluate(_CONFIG.value, _WORKDIR.value, _MODE.value)


if __name__ == "__main__":
    app.run(main)

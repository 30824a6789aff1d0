r"""Build (or reuse) the tfds sequence dataset an experiment config names, and describe it.

python -m data.build --config=experiments/ml1m/config.py --data_dir=/tmp/vista_data
"""

from absl import app, flags
from ml_collections import config_flags

from vista_jax.config import from_config_dict
from vista_jax.data import datasets

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where built datasets live.")
flags.mark_flags_as_required(["config", "data_dir"])


def main(argv):
    del argv
    data = datasets.build(from_config_dict(_CONFIG.value).data, _DATA_DIR.value)
    print(
        f"{data.num_users} users, {data.num_items} items, {data.num_categories} categories, "
        f"{int(data.lengths.sum())} events, {data.num_rows} cache rows ({data.spec.task})"
    )


if __name__ == "__main__":
    app.run(main)

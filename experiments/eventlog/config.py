r"""VISTA on any event log: CSV or Parquet with `user,item,timestamp[,rating|label][,category]`.

  python run.py --config=experiments/eventlog/config.py --workdir=/tmp/vista_log \
      --config.data.path=/path/to/events.csv

Runs the retrieval protocol (leave-one-out, catalog-wide ranking) of experiments/ml1m with
the same model; users with fewer than 3 events are left out of validation and test.
"""

from experiments import common
from experiments.ml1m import config as ml1m


def get_config(arg: str | None = None):
    arg = common.parse_arg(arg, tiny=False)
    c = ml1m.get_config("tiny" if arg.tiny else None)
    c.data.kind = "table"
    c.data.path = ""  # Required: --config.data.path=...
    return c

r"""VISTA on any event log: CSV or Parquet with `user,item,timestamp[,rating|label][,category]`.

  python run.py --config=experiments/eventlog/config.py --workdir=/tmp/vista_log \
      --config.data.path=/path/to/events.csv
  python run.py --config=experiments/eventlog/config.py:ranking --workdir=/tmp/vista_rank \
      --config.data.path=/path/to/events.csv
  python run.py --config=experiments/eventlog/config.py:ranking,tiny ...   # smoke run

Default: the retrieval protocol (leave-one-out, catalog-wide ranking) of experiments/ml1m
with the same model; users with fewer than 3 events are left out of validation and test.

`:ranking`: every event is a request for its own item, labelled by the `label` column or
`rating >= data.positive_rating` (4); its history is the user's earlier events; the latest
10% of events (by a global time cutoff) are test and the 10% before them validation
(`--config.data.split=per_user` splits each user's own events instead). VISTA (source,
downstream on the int8 cache), recent-only, full target attention, SIM-hard and TWIN are
trained until validation AUC stops improving (the same patience for all) and scored by AUC,
log loss and NE (docs/PROTOCOLS.md §2).
"""

from experiments import common
from experiments.ml1m import config as ml1m


def get_config(arg: str | None = None):
    arg = common.parse_arg(arg, tiny=False, ranking=False)
    c = ml1m.get_config("tiny" if arg.tiny and not arg.ranking else None)
    c.data.kind = "table"
    c.data.path = ""  # Required: --config.data.path=...
    if arg.ranking:
        common.event_ranking(c, arg.tiny)
    return c

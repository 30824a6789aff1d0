r"""VISTA on MovieLens-1M under the HSTU retrieval protocol (docs/PROTOCOLS.md).

  python run.py --config=experiments/ml1m/config.py --workdir=/tmp/vista_ml1m \
      --config.data.path=/path/to/ml-1m
  python run.py --config=experiments/ml1m/config.py:tiny --workdir=/tmp/vista_ml1m_tiny

`:tiny` is a smoke run on ML-100K (RecBole atomic files under $VISTA_DATA_DIR/ml-100k).
`:ranking` is the event-log ranking task on ML-1M (label = rating >= 4, time split; every
model early-stopped on validation AUC; docs/PROTOCOLS.md §2), `:ranking,tiny` on ML-100K:

  python run.py --config=experiments/ml1m/config.py:ranking --workdir=/tmp/vista_ml1m_rank

Leave-one-out per user (last event test, second-to-last validation), the most recent 200
events as the history window, every item in the catalog scored with the history excluded;
HR@{10,50,200}, NDCG@{10,50,200}, MRR. Training uses sampled softmax over 128 uniform
negatives, as the published SASRec/HSTU runs do. The data lives outside the repo (GroupLens
terms): point `--config.data.path` at a GroupLens ml-1m directory, or set $VISTA_DATA_DIR to
the directory holding `ml-1m/` (and `ml-100k/` for `:tiny`).
"""

import os

from experiments import common


def default_path(name: str) -> str:
    """`$VISTA_DATA_DIR/<name>`, or "" (then --config.data.path is required) when unset."""
    root = os.environ.get("VISTA_DATA_DIR", "")
    return os.path.join(root, name) if root else ""


def get_config(arg: str | None = None):
    arg = common.parse_arg(arg, tiny=False, ranking=False)
    c = common.base_config()
    c.data = dict(
        kind="movielens_1m",
        path=default_path("ml-1m"),
        delta_path="",  # New events appended to the log (--mode=refresh_cache folds them in).
        history_window=200,  # HSTU protocol: the most recent 200 events.
        num_recent=32,
        data_dir="",  # Where built datasets go ("" = <workdir>/data).
        # A cache row every 32 events: a request joins the newest snapshot before it, and the
        # 32 recent raw events cover everything since (point-in-time, no label leakage).
        snapshot_every=32,
        summary_lag=0,  # Staleness ablation: a request reads a summary >= N events old.
        num_negatives=128,
        max_eval_users=0,  # 0 = all users.
        # How the event log is read (vista_jax.data.eventlog.EventLogOptions):
        time_unit="s",  # s | ms | us | ns: the unit of the timestamp column.
        rating_scale=(1.0, 5.0),  # Ratings outside are refused, not clipped.
        duplicates="drop",  # drop (reported) | keep | error: exact duplicate rows.
        allow_mixed_ids=False,  # Allow ids like `item_242` beside `242` in one column.
    )
    c.summarizer.update(d_model=48, num_heads=2, num_layers=2, num_seeds=32, chunk_size=64)
    c.ranker.update(d_model=48, num_heads=2, num_layers=2, mlp_hidden=96)
    c.source = common.training(batch_size=128, num_steps=3000, learning_rate=1e-3)
    c.downstream = common.training(batch_size=128, num_steps=3000, learning_rate=1e-3)
    c.eval.update(split="test", batch_size=32)
    if arg.ranking:
        common.event_ranking(c, arg.tiny)
        if arg.tiny:
            c.data.kind, c.data.path = "recbole_atomic", default_path("ml-100k")
        return c
    if arg.tiny:  # Smoke run on ML-100K (same file family, 10x smaller).
        c.data.kind, c.data.path = "recbole_atomic", default_path("ml-100k")
        c.data.snapshot_every = 64
        c.data.max_eval_users = 100
        c.data.num_negatives = 16
        c.summarizer.update(d_model=16, num_seeds=4)
        c.ranker.update(d_model=16, mlp_hidden=32, num_layers=1)
        c.source = common.training(batch_size=16, num_steps=4, learning_rate=1e-3)
        c.downstream = common.training(batch_size=16, num_steps=4, learning_rate=1e-3)
        c.cache.batch_size = 128
    return c

"""The catalogue of bad inputs: every one fails with a `UserError` that says where and how to fix.

Each table below is a list of cases run by one parametrized test. A case builds its input in
`tmp_path`, runs the code that must refuse it, and `check_message` asserts that the error

  * is an instance of the case's error class (a subclass of `vista_jax.errors.UserError`;
    `DataError` for data),
  * names the place: the file (as its full path), and the line, row or column where there is
    one (the case's `names`, with `{tmp}` standing for `tmp_path`),
  * says how to fix it: it holds `HINT` ("Fix: ") followed by the remedy, on one line (run.py
    prints a UserError as one line).

Tables so far: `EVENT_LOG_FILES` (event-log files through `vista_jax.data.loaders`, plus the
leave-one-out protocol on a log whose users are all too short). Further tables (config flags,
checkpoints, ...) are appended at the end of this module as their own case lists and
parametrized tests, reusing `check_message`. Keep every case fast and deterministic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx
from subprocesses import TIMEOUT_S

from experiments import common
from experiments.eventlog import config as eventlog_config
from experiments.synthetic import config as synthetic_config
from vista_jax import checkpoints, pipeline
from vista_jax.checkpoints import restore_module
from vista_jax.config import from_config_dict
from vista_jax.data import examples, loaders
from vista_jax.data.eventlog import EventLogError, EventLogOptions
from vista_jax.errors import CheckpointError, ConfigError, DataError, UserError, WorkdirError
from vista_jax.models.summarizer import Summarizer
from vista_jax.store import SummaryStoreError

ROOT = pathlib.Path(__file__).resolve().parent.parent

HINT = "Fix: "


def check_message(error: BaseException, expected: type[UserError], names: list[str]) -> None:
    """The error is of the expected class, names every place in `names`, and gives a fix."""
    assert isinstance(error, expected), f"{type(error).__name__} is not a {expected.__name__}"
    assert isinstance(error, UserError)
    message = str(error)
    assert "\n" not in message, f"not one line: {message!r}"
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    hint = message.find(HINT)
    assert hint >= 0 and message[hint + len(HINT) :].strip(), f"no fix in {message!r}"


# ---------------------------------------------------------------------------------------------
# Event-log files
# ---------------------------------------------------------------------------------------------

Content = str | bytes | pa.Table


@dataclasses.dataclass(frozen=True)
class FileCase:
    """Files written under tmp_path, then `load_event_log(kind, path, options)` must refuse."""

    id: str
    kind: str  # A key of loaders.LOADERS.
    files: dict[str, Content]  # File name -> text, bytes or a Parquet table.
    names: tuple[str, ...]  # Substrings the message must hold; "{tmp}" is tmp_path.
    path: str | None = None  # Relative to tmp_path; None = the first file; "" = no path.
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    then: Callable[[Any], Any] | None = None  # Run on the loaded log (protocol cases).
    error: type[UserError] = EventLogError


def _lengths(log) -> np.ndarray:
    return np.diff(log.user_offsets)


CSV_HEADER = "user,item,timestamp"
RECBOLE_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"

EVENT_LOG_FILES = [
    # --- timestamps
    FileCase(
        "csv_timestamps_in_milliseconds",
        "table",
        {"e.csv": f"{CSV_HEADER}\n1,1,1600000000000\n1,2,1600000001000\n"},
        ("{tmp}/e.csv", "line 2", "looks like milliseconds", "--config.data.time_unit=ms"),
    ),
    FileCase(
        "csv_non_numeric_timestamp",
        "table",
        {"e.csv": f"{CSV_HEADER}\n1,2,3\n1,2,noon\n"},
        ("{tmp}/e.csv line 3: timestamp 'noon' is not a number",),
    ),
    FileCase(
        "csv_negative_timestamp",
        "table",
        {"e.csv": f"{CSV_HEADER}\n1,2,-5\n"},
        ("{tmp}/e.csv line 2: timestamp -5 is negative",),
    ),
    FileCase(
        "recbole_fractional_timestamp",
        "recbole_atomic",
        {"toy.inter": RECBOLE_HEADER + "u1\t9\t5\t881250950\nu3\t1\t2\t1.5\n"},
        ("{tmp}/toy.inter line 3: timestamp 1.5 is not a whole number",),
    ),
    FileCase(
        "parquet_non_numeric_string_timestamp",
        "table",
        {"e.parquet": pa.table({"user": [1, 1], "item": [1, 2], "timestamp": ["5", "yesterday"]})},
        (
            "{tmp}/e.parquet",
            "column 'timestamp' has type string",
            "row 2",
            "'yesterday'",
            "expected integer seconds",
        ),
    ),  # fmt: skip
    # --- ratings and labels
    FileCase(
        "csv_rating_outside_scale",
        "table",
        {"e.csv": f"{CSV_HEADER},rating\n1,1,1,4\n1,2,2,7\n"},
        ("{tmp}/e.csv line 3: rating 7 is outside the rating scale 1..5", "rating_scale"),
    ),
    FileCase(
        "csv_nan_rating",
        "table",
        {"e.csv": f"{CSV_HEADER},rating\n1,1,1,4\n1,2,2,nan\n"},
        ("{tmp}/e.csv line 3: rating nan is not finite",),
    ),
    FileCase(
        "csv_boolean_rating",
        "table",
        {"e.csv": f"{CSV_HEADER},rating\n1,1,1,true\n1,2,2,false\n"},
        ("{tmp}/e.csv line 2: rating 'true' is a boolean", "`label` column"),
    ),
    FileCase(
        "parquet_boolean_rating",
        "table",
        {"e.parquet": pa.table({"user": [1], "item": [1], "timestamp": [1], "rating": [True]})},
        ("{tmp}/e.parquet", "column 'rating' has type bool", "`label` column"),
    ),
    FileCase(
        "csv_label_not_binary",
        "table",
        {"e.csv": f"{CSV_HEADER},label\n1,2,3,1\n\n1,2,4,7\n"},
        ("{tmp}/e.csv line 4: label 7.0 is not 0 or 1",),
    ),
    # --- ids, duplicates, categories
    FileCase(
        "csv_item_ids_mix_numbers_and_names",
        "table",
        {"e.csv": f"{CSV_HEADER}\n1,item_242,1\n1,242,2\n"},
        ("{tmp}/e.csv", "'item_242' (line 2) and '242' (line 3)", "allow_mixed_ids"),
    ),
    FileCase(
        "csv_exact_duplicate_rows",
        "table",
        {"e.csv": f"{CSV_HEADER},rating\n1,1,1,4\n1,2,2,3\n1,1,1,4\n"},
        ("{tmp}/e.csv", "1 exact duplicate event(s)", "line 4, a copy of line 2", "duplicates"),
        options={"duplicates": "error"},
    ),
    FileCase(
        "csv_empty_item_field",
        "table",
        {"e.csv": f"{CSV_HEADER}\n1,,3\n"},
        ("{tmp}/e.csv line 2: empty item field",),
    ),
    FileCase(
        "csv_item_with_two_categories",
        "table",
        {"e.csv": f"{CSV_HEADER},category\n1,7,1,Drama\n2,7,2,Comedy\n"},
        ("{tmp}/e.csv line 3: item 7 has category 'Comedy'",),
    ),
    FileCase(
        "parquet_list_typed_user",
        "table",
        {"e.parquet": pa.table({"user": [[1, 2]], "item": [1], "timestamp": [1]})},
        (
            "{tmp}/e.parquet",
            "column 'user' has type list<",
            "expected integer or string ids",
            "explode",
        ),
    ),  # fmt: skip
    # --- layout: delimiters, columns, malformed lines
    FileCase(
        "csv_semicolon_separated",
        "table",
        {"e.csv": "user;item;timestamp\n1;2;3\n"},
        ("{tmp}/e.csv line 1", "looks ';'-separated", "must be ','-separated"),
    ),
    FileCase(
        "csv_tab_separated",
        "table",
        {"e.csv": "user\titem\ttimestamp\n1\t2\t3\n"},
        ("{tmp}/e.csv line 1", "looks tab-separated", "must be ','-separated"),
    ),
    FileCase(
        "recbole_comma_separated",
        "recbole_atomic",
        {"toy.inter": "user_id:token,item_id:token,timestamp:float\n1,2,3\n"},
        ("{tmp}/toy.inter line 1", "looks ','-separated", "must be tab-separated"),
    ),
    FileCase(
        "csv_missing_timestamp_column",
        "table",
        {"e.csv": "user,time,item\n1,2,3\n"},
        ("{tmp}/e.csv line 1: missing column(s) ['timestamp']",),
    ),
    FileCase(
        "recbole_missing_timestamp_column",
        "recbole_atomic",
        {"toy.inter": "user_id:token\titem_id:token\n1\t2\n"},
        ("{tmp}/toy.inter line 1: missing column(s) ['timestamp']",),
    ),
    FileCase(
        "csv_short_line",
        "table",
        {"e.csv": f"{CSV_HEADER}\n1,2,3\n1,2\n"},
        ("{tmp}/e.csv line 3: expected 3 fields",),
    ),
    FileCase(
        "ml1m_short_line",
        "movielens_1m",
        {"ratings.dat": "1::10::3::200\n1::11::3\n"},
        ("{tmp}/ratings.dat line 2: expected 4 fields",),
        path=".",
    ),
    # --- empty files
    FileCase("csv_empty", "table", {"e.csv": ""}, ("{tmp}/e.csv is empty",)),
    FileCase(
        "csv_header_only",
        "table",
        {"e.csv": f"{CSV_HEADER}\n"},
        ("{tmp}/e.csv has a header but no events",),
    ),
    FileCase(
        "parquet_no_rows",
        "table",
        {"e.parquet": pa.table({"user": pa.array([], pa.int64()), "item": [], "timestamp": []})},
        ("{tmp}/e.parquet has a header but no events",),
    ),
    FileCase("parquet_zero_bytes", "table", {"e.parquet": b""}, ("{tmp}/e.parquet is empty",)),
    FileCase(
        "ml1m_empty_ratings",
        "movielens_1m",
        {"ratings.dat": ""},
        ("{tmp}/ratings.dat is empty",),
        path=".",
    ),
    # --- paths and file types
    FileCase(
        "csv_named_parquet",
        "table",
        {"e.parquet": f"{CSV_HEADER}\n1,2,3\n"},
        ("{tmp}/e.parquet is not a readable Parquet file", "name it .csv"),
    ),
    FileCase(
        "table_unknown_suffix",
        "table",
        {"e.json": "{}"},
        ("{tmp}/e.json: unknown table suffix '.json'",),
    ),
    FileCase(
        "table_given_a_directory",
        "table",
        {"e.csv": f"{CSV_HEADER}\n1,2,3\n"},
        ("{tmp} is a directory", ".csv or .parquet file"),
        path=".",
    ),
    FileCase(
        "ml1m_given_a_file",
        "movielens_1m",
        {"ratings.dat": "1::10::3::200\n"},
        ("{tmp}/ratings.dat is a file", "reads a directory", "--config.data.path"),
    ),
    FileCase(
        "ml1m_directory_without_ratings",
        "movielens_1m",
        {"movies.dat": "10::A (2001)::Comedy\n"},
        ("{tmp}/ratings.dat not found",),
        path=".",
    ),
    FileCase(
        "recbole_given_a_non_inter_file",
        "recbole_atomic",
        {"toy.csv": f"{CSV_HEADER}\n1,2,3\n"},
        ("{tmp}/toy.csv is a file but not a RecBole .inter file",),
    ),
    FileCase(
        "path_missing",
        "table",
        {},
        ("no data path given", "--config.data.path is required"),
        path="",
    ),
    FileCase(
        "path_does_not_exist",
        "recbole_atomic",
        {},
        ("{tmp}/nowhere does not exist", "--config.data.path"),
        path="nowhere",
    ),
    # --- the retrieval protocol on a loaded log
    FileCase(
        "no_user_long_enough_for_leave_one_out",
        "table",
        {"e.csv": f"{CSV_HEADER}\n1,1,1\n1,2,2\n2,1,1\n"},
        ("2 user(s) but none with at least 3 events", "leave-one-out needs >= 3 events"),
        then=lambda log: examples.retrieval_requests(_lengths(log), "train"),
        error=DataError,
    ),
]


def _write(path: pathlib.Path, content: Content) -> None:
    if isinstance(content, pa.Table):
        pq.write_table(content, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


@pytest.mark.parametrize("case", EVENT_LOG_FILES, ids=lambda case: case.id)
def test_bad_event_log_files(tmp_path, case: FileCase):
    for name, content in case.files.items():
        _write(tmp_path / name, content)
    relative = next(iter(case.files)) if case.path is None else case.path
    path = "" if relative == "" else tmp_path / relative
    with pytest.raises(UserError) as error:
        log = loaders.load_event_log(case.kind, path, EventLogOptions(**case.options))
        if case.then is not None:
            case.then(log)
    names = [name.replace("{tmp}", str(tmp_path)) for name in case.names]
    check_message(error.value, case.error, names)
    assert isinstance(error.value, DataError)


def test_event_log_catalogue_covers_every_loader():
    assert {case.kind for case in EVENT_LOG_FILES} == set(loaders.LOADERS)
    assert len({case.id for case in EVENT_LOG_FILES}) == len(EVENT_LOG_FILES)


# ---------------------------------------------------------------------------------------------
# Config variants, keys and values (the typed boundary, `vista_jax.config.from_config_dict`)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConfigCase:
    """`get_config(variant)`, then `overrides` on the ConfigDict, must be refused."""

    id: str
    names: tuple[str, ...]
    variant: str | None = "tiny"
    overrides: tuple[tuple[str, Any], ...] = ()
    experiment: str = "synthetic"


CONFIG_CASES = [
    ConfigCase("variant_typo", ("'tiyn'", "'tiny'"), variant="tiyn"),
    ConfigCase("variant_not_a_bool", ("tiny=maybe", "true or false"), variant="tiny=maybe"),
    ConfigCase("key_typo", ("'summarizer.d_modle'", "summarizer.d_model"),
               overrides=(("summarizer.d_modle", 8),)),
    ConfigCase("section_typo", ("'sumarizer'", "summarizer"), overrides=(("sumarizer", {}),)),
    ConfigCase("bad_attention", ("summarizer.attention", "'qla'"),
               overrides=(("summarizer.attention", "qlaa"),)),
    ConfigCase("heads_do_not_divide", ("summarizer.d_model", "summarizer.num_heads"),
               overrides=(("summarizer.num_heads", 3),)),
    ConfigCase("zero_steps", ("source.num_steps", ">= 1"), overrides=(("source.num_steps", 0),)),
    ConfigCase("negative_lr", ("downstream.learning_rate",),
               overrides=(("downstream.learning_rate", -1.0),)),
    ConfigCase("data_kind_typo", ("data.kind", "'movielens_1m'"),
               overrides=(("data.kind", "movielens_1"),)),
    ConfigCase("quantization", ("cache.quantization", "'int8'"),
               overrides=(("cache.quantization", "int4"),)),
    ConfigCase("eval_split", ("eval.split", "'valid'"), overrides=(("eval.split", "vali"),)),
    ConfigCase("synthetic_key_on_event_log", ("'data.num_users'",), experiment="ml1m",
               overrides=(("data.num_users", 5),)),
    ConfigCase("time_unit", ("data.time_unit",), experiment="ml1m",
               overrides=(("data.time_unit", "minutes"),)),
    ConfigCase("positive_rating_above_scale", ("data.positive_rating", "(1, 5]"),
               variant="ranking", experiment="eventlog",
               overrides=(("data.positive_rating", 6.0),)),
    ConfigCase("positive_rating_at_scale_bottom", ("data.positive_rating",),
               variant="ranking", experiment="eventlog",
               overrides=(("data.positive_rating", 1.0),)),
    ConfigCase("split_typo", ("data.split", "'per_user'"), variant="ranking",
               experiment="eventlog", overrides=(("data.split", "peruser"),)),
    ConfigCase("fractions_leave_no_training", ("data.valid_fraction", "data.test_fraction"),
               variant="ranking", experiment="eventlog",
               overrides=(("data.valid_fraction", 0.5), ("data.test_fraction", 0.5))),
    ConfigCase("task_typo", ("data.task", "'ranking'"), variant="ranking",
               experiment="eventlog", overrides=(("data.task", "rank"),)),
    ConfigCase("early_stopping_metric", ("early_stopping.metric", "'auc'"), variant="ranking",
               experiment="eventlog", overrides=(("early_stopping.metric", "acu"),)),
    ConfigCase("baseline_typo", ("baselines.models", "'twin'"), variant="ranking",
               experiment="eventlog", overrides=(("baselines.models", "twn"),)),
    ConfigCase("early_stopping_on_retrieval", ("early_stopping.eval_every", "ranking"),
               variant=None, experiment="ml1m", overrides=(("early_stopping.eval_every", 5),)),
]  # fmt: skip


def _experiment_config(case: ConfigCase):
    import importlib

    module = importlib.import_module(f"experiments.{case.experiment}.config")
    config = module.get_config(case.variant)
    for key, value in case.overrides:
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        with node.unlocked() if hasattr(node, "unlocked") else _nothing():
            node[leaf] = value
    return from_config_dict(config)


@contextlib.contextmanager
def _nothing():
    yield


@pytest.mark.parametrize("case", CONFIG_CASES, ids=lambda case: case.id)
def test_bad_config(case: ConfigCase):
    with pytest.raises(UserError) as error:
        _experiment_config(case)
    check_message(error.value, ConfigError, list(case.names))


BOOLS = [("", True), ("1", True), ("true", True), ("0", False), ("false", False), ("no", False)]


@pytest.mark.parametrize("value,want", BOOLS)
def test_bool_variants_parse(value, want):
    arg = "tiny" + (f"={value}" if value else "")
    assert common.parse_arg(arg, tiny=False).tiny is want


def test_derived_values_follow_overrides():
    config = synthetic_config.get_config("tiny")
    config.source.num_steps = 200
    typed = from_config_dict(config)
    assert typed.source.checkpoint_every == 100 and typed.source.warmup_steps == 20


# ---------------------------------------------------------------------------------------------
# Event-log ranking data: a label per event, three non-empty time splits
# ---------------------------------------------------------------------------------------------

RANKING_DATA_CASES = [  # (id, CSV text, overrides, what the message names)
    ("no_label_no_rating", "user,item,timestamp\n" + "".join(
        f"{u},{i},{10 * i + u}\n" for u in range(3) for i in range(1, 11)), (),
     ("`label` column", "`rating` column", "data.task=retrieval")),
    # The last 2 events of every user share one timestamp: 20% of the log, tied, so the test
    # cutoff takes them all and the validation cutoff lands on the same time.
    ("empty_validation_split", "user,item,timestamp,rating\n" + "".join(
        f"{u},{i},{i if i <= 8 else 100},4\n" for u in range(3) for i in range(1, 11)), (),
     ("valid", "empty", "split=per_user")),
]  # fmt: skip


@pytest.mark.parametrize("case", RANKING_DATA_CASES, ids=lambda case: case[0])
def test_bad_event_ranking_data(tmp_path, case):
    _, text, overrides, names = case
    path = tmp_path / "events.csv"
    path.write_text(text)
    config = eventlog_config.get_config("ranking,tiny")
    config.data.path = str(path)
    for key, value in overrides:
        config.data[key] = value
    with pytest.raises(UserError) as error:
        pipeline.train_and_evaluate(config, tmp_path / "work", "train_source")
    check_message(error.value, DataError, [str(path), *names])


# ---------------------------------------------------------------------------------------------
# The command line: one line on stderr, exit status 2
# ---------------------------------------------------------------------------------------------

CLI_CASES = [
    ("flag_key_typo", ["--config=experiments/synthetic/config.py:tiny",
                       "--config.sumarizer.d_model=8"], ("--config.summarizer.d_model",)),
    ("variant_typo", ["--config=experiments/synthetic/config.py:tiyn"], ("'tiny'",)),
    ("missing_data_path", ["--config=experiments/eventlog/config.py:tiny"],
     ("--config.data.path",)),
    ("bad_value", ["--config=experiments/synthetic/config.py:tiny",
                   "--config.cache.quantization=int4"], ("cache.quantization",)),
    ("bad_cache_root", ["--config=experiments/synthetic/config.py:tiny",
                        '--config.cache.root={"bucket": "my-bucket"}'], ("cache.root", "driver")),
]  # fmt: skip


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda case: case[0])
def test_command_line_user_errors(tmp_path, case):
    _, args, names = case
    workdir = tmp_path / "work"
    run = subprocess.run(
        [sys.executable, "run.py", f"--workdir={workdir}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    for name in names:
        assert name in lines[0], lines[0]
    assert HINT in lines[0]
    assert not workdir.exists(), "a refused run must create nothing"


# ---------------------------------------------------------------------------------------------
# Workdirs, checkpoints and caches
# ---------------------------------------------------------------------------------------------


def _tiny_config(data_dir):
    config = synthetic_config.get_config("tiny")
    config.data.data_dir = str(data_dir)
    config.source.num_steps = 4
    config.source.checkpoint_every = 2
    config.downstream.num_steps = 2
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir after every stage of a tiny run (copied by each test that breaks it)."""
    root = tmp_path_factory.mktemp("trained")
    config = _tiny_config(root / "data")
    pipeline.train_and_evaluate(config, root / "work", "all")
    return config, root / "work"


def _copy(trained, tmp_path):
    config, workdir = trained
    shutil.copytree(workdir, tmp_path / "work")
    return config.copy_and_resolve_references(), tmp_path / "work"


def test_read_only_workdir_is_refused_before_training(tmp_path, trained):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(WorkdirError) as error:
            pipeline.train_and_evaluate(trained[0], parent / "work", "all")
        check_message(error.value, WorkdirError, [str(parent / "work")])
    finally:
        parent.chmod(0o700)


def test_bad_data_creates_no_workdir(tmp_path):
    config = eventlog_config.get_config("tiny")
    (tmp_path / "e.csv").write_text("user,item\n1,2\n")
    config.data.path = str(tmp_path / "e.csv")
    with pytest.raises(DataError):
        pipeline.train_and_evaluate(config, tmp_path / "work", "all")
    assert not (tmp_path / "work").exists()


def test_fewer_steps_than_the_checkpoint_is_refused(tmp_path, trained):
    config, workdir = _copy(trained, tmp_path)
    config.source.num_steps = 2
    with pytest.raises(CheckpointError) as error:
        pipeline.train_and_evaluate(config, workdir, "train_source")
    check_message(error.value, CheckpointError, ["step 4", "num_steps=2", str(workdir)])


def test_checkpoint_of_another_shape_names_the_field(tmp_path, trained):
    config, workdir = _copy(trained, tmp_path)
    config.summarizer.num_seeds = 3
    with pytest.raises(CheckpointError) as error:
        pipeline.train_and_evaluate(config, workdir, "build_cache")
    check_message(error.value, CheckpointError, ["summarizer/seeds", "(16, 32)", "(3, 32)"])


def _corrupt(step_dir: pathlib.Path) -> None:
    for path in step_dir.rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "summarizer" in str(path):
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path, trained, capfd):
    config, workdir = _copy(trained, tmp_path)
    _corrupt(workdir / "source" / "4")
    step = restore_module(workdir / "source", "summarizer", _summarizer(config, workdir))
    assert step == 2
    assert "checkpoint step 4" in capfd.readouterr().err


def test_every_checkpoint_corrupt_is_one_clear_error(tmp_path, trained):
    config, workdir = _copy(trained, tmp_path)
    for step in (2, 4):
        _corrupt(workdir / "source" / str(step))
    with pytest.raises(CheckpointError) as error:
        restore_module(workdir / "source", "summarizer", _summarizer(config, workdir))
    check_message(error.value, CheckpointError, [str(workdir / "source")])


def _summarizer(config, workdir):
    typed = from_config_dict(config)
    return Summarizer(typed.summarizer_for(pipeline.load_data(typed, workdir)), nnx.Rngs(0))


def test_stage_before_its_inputs_is_one_clear_error(tmp_path, trained):
    with pytest.raises(CheckpointError) as error:
        pipeline.train_and_evaluate(trained[0], tmp_path / "fresh", "build_cache")
    check_message(error.value, CheckpointError, [str(tmp_path / "fresh" / "source")])


def test_ranker_is_not_evaluated_on_another_cache_version(tmp_path, trained):
    config, workdir = _copy(trained, tmp_path)
    before = json.loads((workdir / "results.json").read_text())["cache"]["version"]
    time.sleep(1.1)  # Version ids carry the second they were built in.
    pipeline.train_and_evaluate(config, workdir, "build_cache")
    with pytest.raises(UserError) as error:
        pipeline.train_and_evaluate(config, workdir, "evaluate")
    check_message(error.value, SummaryStoreError, [before, "vista_downstream"])
    with pytest.raises(UserError):  # Resuming training on the new cache is refused too.
        pipeline.train_and_evaluate(config, workdir, "train_ranker")


def test_results_carry_provenance(trained):
    _, workdir = trained
    results = json.loads((workdir / "results.json").read_text())
    prov = results["provenance"]
    assert prov["seed"] == 0 and prov["max_steps"] == {"source": 4, "downstream": 2}
    assert prov["command"] and prov["wall_s"] >= 0
    assert prov["config"]["summarizer"]["num_seeds"] == 16
    assert set(prov["stages"]) == set(pipeline.STAGES)
    assert all(s["wall_s"] >= 0 for s in prov["stages"].values())
    assert prov["git_commit"]
    assert results["cache"]["version"].startswith("v00000004-")


def test_workdir_that_is_a_file_is_refused_before_training(tmp_path, trained):
    (tmp_path / "work").write_text("not a directory")
    with pytest.raises(WorkdirError) as error:
        pipeline.train_and_evaluate(trained[0], tmp_path / "work" / "sub", "all")
    check_message(error.value, WorkdirError, [str(tmp_path / "work")])


class _Proj(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, *, norm: bool):
        self.proj = nnx.Linear(4, 4, rngs=rngs)
        self.norm = nnx.RMSNorm(4, rngs=rngs) if norm else None


def _write_module(directory: pathlib.Path, module: nnx.Module) -> None:
    """Step 1 of a training checkpoint of `module` as "summarizer", as the trainer writes it."""
    with checkpoints.manager(directory, ("summarizer",)) as mngr:
        opt_state = {"count": np.zeros((), np.int32)}
        checkpoints.save(mngr, 1, {"summarizer": module}, opt_state, {}, {"step": 1})
        mngr.wait_until_finished()


@pytest.mark.parametrize("written_with_norm", [False, True])
def test_checkpoint_of_another_model_version_names_the_arrays(tmp_path, written_with_norm):
    """A checkpoint written by a model with other arrays (e.g. before a layer was added) is
    one clear error naming them, not a fall-back through every step as if all were corrupt."""
    _write_module(tmp_path / "source", _Proj(nnx.Rngs(0), norm=written_with_norm))
    with pytest.raises(CheckpointError) as error:
        restore_module(
            tmp_path / "source", "summarizer", _Proj(nnx.Rngs(1), norm=not written_with_norm)
        )
    where = "model" if written_with_norm else "checkpoint"
    check_message(
        error.value,
        CheckpointError,
        [str(tmp_path / "source"), "step 1", "norm/scale", f"not in the {where}"],
    )

"""Per-user sequence datasets on disk: tfds builders writing array_record, read without TF.

One record per user in the per-user record format of docs/ARCHITECTURE.md. Datasets live at
`<data_dir>/<name>/<fingerprint>/<version>/`: the fingerprint identifies the data and the
settings that produced it, so different data never share a directory and rebuilding the same
data reuses what is there. tfds writes into a temporary `incomplete.*` directory and renames
it when done, so an interrupted build never reads as complete.

    path = build_sequence_dataset(
        "ml1m_sequences", lambda: event_log_records(log), data_dir,
        fingerprint=event_log_fingerprint(log), metadata={"num_items": log.num_items})
    source = read_sequence_dataset(path)   # len(source), source[u] -> dict of numpy
    source.metadata["num_items"]
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import tempfile
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vista_jax.data.eventlog import EventLog
from vista_jax.errors import DataError

SPLIT = "train"  # One split holding every user; train/eval splits are made per event later.
DEFAULT_VERSION = "1.0.0"
EVENT_FIELDS = {"item": np.int32, "action": np.int32, "time": np.int64, "category": np.int32}
CANDIDATE_FIELDS = {"cand_item": np.int32, "cand_label": np.float32, "cand_prob": np.float32}
LABEL_FIELDS = {"label": np.float32}  # Event-log ranking: the binary label of every event.

Record = Mapping[str, Any]
RecordsFactory = Callable[[], Iterable[Record]]

_DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_FINGERPRINT = re.compile(r"^[\w+\-.]+$")


class SequenceDatasetError(DataError):
    """A bad record or dataset request: says what was wrong, where, and how to fix it."""


def _field_groups(with_candidates: bool, with_labels: bool = False) -> list[dict]:
    """Groups of per-event arrays of one record; arrays in a group share one length."""
    events = EVENT_FIELDS | (LABEL_FIELDS if with_labels else {})
    return [events, CANDIDATE_FIELDS] if with_candidates else [events]


def sequence_features(with_candidates: bool, with_labels: bool = False):
    """The tfds features of one per-user record (synthetic data adds candidates; event-log
    ranking adds a label per event)."""
    columns = {
        k: v for group in _field_groups(with_candidates, with_labels) for k, v in group.items()
    }
    features = {"user": tfds.features.Tensor(shape=(), dtype=np.int64)}
    for key, dtype in columns.items():
        features[key] = tfds.features.Tensor(shape=(None,), dtype=dtype)
    return tfds.features.FeaturesDict(features)


def event_log_records(
    log: EventLog, labels: np.ndarray | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Yields one record per dense user, in user order, so record `u` is user `u`.

    `labels` ([N], in the log's event order) adds a `label` array to every record.
    """
    offsets = log.user_offsets
    for user in range(log.num_users):
        events = slice(int(offsets[user]), int(offsets[user + 1]))
        record = {
            "user": np.int64(user),
            "item": log.item[events],
            "action": log.action[events],
            "time": log.time[events],
            "category": log.category[events],
        }
        if labels is not None:
            record["label"] = labels[events]
        yield record


def event_log_fingerprint(log: EventLog, **settings: Any) -> str:
    """A short hash of the log's contents and the (JSON-able) settings that shaped it."""
    digest = hashlib.blake2b(digest_size=8)
    columns = [log.user, log.item, log.time, log.action, log.category]
    columns += [c for c in (log.label, log.rating) if c is not None]
    for column in columns:
        digest.update(np.ascontiguousarray(column).tobytes())
    ids = [log.raw_user_ids.tolist(), log.raw_item_ids.tolist(), list(log.category_names)]
    digest.update(json.dumps([ids, settings], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _checked_record(
    index: int, record: Record, with_candidates: bool, with_labels: bool = False
) -> dict[str, Any]:
    """Casts a record to the feature dtypes and checks its keys and lengths."""
    groups = _field_groups(with_candidates, with_labels)
    expected = {"user"} | {k for group in groups for k in group}
    if set(record) != expected:
        raise SequenceDatasetError(
            f"record {index}: keys {sorted(record)} differ from {sorted(expected)}; "
            "yield exactly the per-user record fields (docs/ARCHITECTURE.md), with candidates "
            "only when with_candidates=True and labels only when with_labels=True."
        )
    checked = {"user": np.int64(record["user"])}
    for group in groups:
        arrays = {key: np.asarray(record[key], dtype) for key, dtype in group.items()}
        lengths = {key: a.shape for key, a in arrays.items()}
        if len(set(lengths.values())) != 1 or any(len(s) != 1 for s in lengths.values()):
            raise SequenceDatasetError(
                f"record {index} (user {checked['user']}): fields must be 1-D and of one length, "
                f"got shapes {lengths}."
            )
        checked.update(arrays)
    return checked


class _SequenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes the records of a factory; subclassed per dataset by `_builder_class`."""

    VERSION = tfds.core.Version(DEFAULT_VERSION)

    def __init__(
        self, *, records_factory, with_candidates, with_labels, metadata, description, **kwargs
    ):
        self._records_factory = records_factory
        self._with_candidates = with_candidates
        self._with_labels = with_labels
        self._metadata = dict(metadata)
        self._description = description
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._description,
            features=sequence_features(self._with_candidates, self._with_labels),
            metadata=tfds.core.MetadataDict(self._metadata),
            disable_shuffling=True,  # Record u must stay user u.
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Records come from memory, nothing is downloaded.
        return {SPLIT: self._generate_examples()}

    def _generate_examples(self):
        for index, record in enumerate(self._records_factory()):
            yield index, _checked_record(index, record, self._with_candidates, self._with_labels)


def _builder_class(name: str, fingerprint: str, version: str) -> type[_SequenceBuilder]:
    config = tfds.core.BuilderConfig(name=fingerprint, version=version)
    namespace = {"name": name, "VERSION": tfds.core.Version(version), "BUILDER_CONFIGS": [config]}
    return types.new_class(
        f"_SequenceBuilder_{name}",
        (_SequenceBuilder,),
        {"skip_registration": True},
        lambda ns: ns.update(namespace),
    )


def build_sequence_dataset(
    name: str,
    records_factory: RecordsFactory,
    data_dir: str | pathlib.Path,
    *,
    fingerprint: str,
    version: str = DEFAULT_VERSION,
    metadata: Mapping[str, Any] | None = None,
    with_candidates: bool = False,
    with_labels: bool = False,
    description: str = "",
) -> pathlib.Path:
    """Writes one array_record record per user unless the same dataset exists; returns its dir.

    Args:
      name: dataset name, snake_case (e.g. "ml1m_sequences").
      records_factory: called once, only when the dataset is missing; returns the records.
      data_dir: root directory of datasets.
      fingerprint: identifies the data and settings (see `event_log_fingerprint`); part of the
        path, so a different fingerprint never reuses or overwrites another dataset.
      version: dataset format version, "X.Y.Z".
      metadata: JSON-able facts to keep with the data (e.g. num_items); see
        `read_sequence_metadata`. Ignored when an existing dataset is reused.
      with_candidates: records also carry `cand_item`, `cand_label` and `cand_prob`.
      with_labels: records also carry `label`, one per event (event-log ranking).
      description: free text stored in the dataset info.
    """
    if not _DATASET_NAME.match(name):
        raise SequenceDatasetError(f"dataset name {name!r} must be snake_case, e.g. ml1m_seq.")
    if not _FINGERPRINT.match(fingerprint):
        raise SequenceDatasetError(
            f"fingerprint {fingerprint!r} may only hold letters, digits, '_', '-', '+', '.'."
        )
    builder = _builder_class(name, fingerprint, version)(
        records_factory=records_factory,
        with_candidates=with_candidates,
        with_labels=with_labels,
        metadata=metadata or {},
        description=description,
        config=fingerprint,
        data_dir=str(data_dir),
    )
    with tempfile.TemporaryDirectory() as download_dir:  # Nothing is downloaded; keep no trace.
        builder.download_and_prepare(file_format="array_record", download_dir=download_dir)
    return pathlib.Path(builder.data_dir)


class SequenceSource:
    """Random access to per-user records: `len(source)`, `source[i]` -> dict of numpy arrays.

    Wraps the tfds array_record source so that the scalar `user` decodes to `np.int64` like
    the rest of the record (tfds gives a Python int). grain can read it directly.
    """

    def __init__(self, data_source, metadata: Mapping[str, Any]):
        self._data_source = data_source
        self.metadata = dict(metadata)

    def __len__(self) -> int:
        return len(self._data_source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return _as_numpy(self._data_source[index])

    def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
        return [_as_numpy(record) for record in self._data_source.__getitems__(indices)]


def _as_numpy(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {**record, "user": np.int64(record["user"])}


def read_sequence_dataset(path: str | pathlib.Path) -> SequenceSource:
    """Opens a dataset written by `build_sequence_dataset`; no builder code or TF needed."""
    builder = _read_only_builder(path)
    return SequenceSource(builder.as_data_source(split=SPLIT), builder.info.metadata or {})


def read_sequence_metadata(path: str | pathlib.Path) -> dict[str, Any]:
    """The `metadata` dict stored by `build_sequence_dataset`."""
    return dict(_read_only_builder(path).info.metadata or {})


def _read_only_builder(path: str | pathlib.Path):
    path = pathlib.Path(path)
    if not (path / "dataset_info.json").is_file():
        raise SequenceDatasetError(
            f"{path} holds no complete sequence dataset (no dataset_info.json); build it with "
            "build_sequence_dataset, and pass the directory that function returned."
        )
    return tfds.builder_from_directory(str(path))

"""Key layout and publication protocol of a summary store.

A store root is any TensorStore kvstore: a local path (the default), a URL such as
``"memory://"``, ``"gs://bucket/cache/"``, ``"s3://bucket/cache/"``, or a kvstore spec dict
such as ``{"driver": "memory"}`` (or its JSON text, as a config value gives it). Every key
below is joined onto the root's ``path``, so the same code serves every backend::

  CURRENT                                 text: id of the current version (moved by CAS)
  versions/<v>/manifest.json              created once, never rewritten: publishes <v>
  versions/<v>/attempts/<attempt>/        one write attempt's arrays (zarr3)
      summary    [R, K, D]  int8 | bfloat16 | float32   (quantization "int8" | "bf16" | "none")
      scale      [R, K]     float32   int8 only: one symmetric scale per summary token
      present    [R]        uint8     1 = row written; other rows read as absent (zeros)
      coverage   [R]        int64     how many of the row's user's time-sorted events it covers
      event_time [R]        int64     time of the last event it covers (format 4)
      <extra>    [R, ...]   any       named per-row arrays (e.g. recurrent QLA states)

Layouts: "rows" (the default, format 4) packs the core values of each row into one record of
the array ``row [R, row_bytes] uint8``, in shards of ``chunk_rows`` rows with one inner chunk
per row, for random reads (`vista_jax.store_rows`); "ocdbt" keeps one array per value in one
OCDBT database, "plain" in plain zarr3 directories. Extras are arrays of their own in every
layout. Format 4 adds the lineage keys (``LINEAGE_KEYS``); formats 2 and 3 are still read.
``<attempt>`` is ``<UTC start time>-<random hex>`` (``20250101T120000.123456Z-9f3a0c1b2d4e``),
unique to one write attempt; the manifest names the attempt it publishes (``attempt``,
``data``). Format-2 manifests (before attempts) keep their arrays at ``versions/<v>/data/``
and are still read.

Publication protocol. Every step is one kvstore operation; the conditional ones pass
TensorStore's ``if_equal`` storage generation, atomic on the file, memory, GCS and S3 drivers.

1. Start: read CURRENT and its generation G. The build's ``build_clock`` is
   ``max(wall clock ns, build_clock of CURRENT's version + 1)``, a hybrid logical clock: a
   build that starts after version X was current orders after X whatever the clocks say.
2. Write the arrays under a fresh attempt prefix that no other writer or reader touches. A
   write that raises deletes its own attempt; a killed one leaves it to garbage collection.
3. Publish: create the manifest only if it is absent. If it exists with the same
   ``content_hash`` (an identical rerun, e.g. after a kill), the rerun adopts the published
   manifest and deletes its own attempt; with other content it is refused: versions are
   immutable, nothing published is deleted or overwritten by a writer.
4. Move CURRENT by compare-and-swap from G. If CURRENT moved meanwhile to a newer version,
   leave it (the written version stays readable by its id; the write reports this), else
   retry the swap from CURRENT's new generation. A rerun after a kill between steps 3 and 4
   completes step 4.

"Newer": version A is newer than B iff ``(A.build_clock, A.attempt) > (B.build_clock,
B.attempt)``: builds are ordered by when they started (an older build read older data or an
older checkpoint), not by summarizer step, which a refresh keeps and a retrain restarts.

Only `SummaryStore.collect_garbage` deletes. It keeps CURRENT, every version newer than
CURRENT (publications in flight, or after a rollback), the newest ``keep_last`` and any
pinned; from each other published version it deletes the manifest first, then the arrays
unless a published refresh version reads them (``refresh.sources``,
`vista_jax.store_refresh`); it deletes attempts no published manifest reads that are older
than a grace period, which must exceed the longest build. A reader checks after every read
that the manifest it opened is still there, unchanged: rows read before a successful check
belong to the version (its data goes only after its manifest), and a read of a collected
version raises instead of returning zeros. Rolling back (`SummaryStore.set_current`) while
a build or a collection runs may be undone
by it: roll back when neither runs.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorstore as ts

from vista_jax.errors import UserError

FORMAT_VERSION = 4  # 4: + event_time, watermark, lineage, "rows"; 3: per-attempt data
READABLE_FORMATS = (2, 3, 4)  # 2: versions/<v>/data/, before attempts
LAYOUTS = ("rows", "ocdbt", "plain")  # the first is the default
CORE_ARRAYS = ("summary", "scale", "present", "coverage", "event_time")
NO_EVENTS = int(np.iinfo(np.int64).min)  # event_time of a row covering no event
UNKNOWN_TIME = int(np.iinfo(np.int64).max)  # event_time when the writer gave none
CURRENT_KEY = "CURRENT"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ATTEMPT_TIME = "%Y%m%dT%H%M%S.%fZ"
MANIFEST_KEYS_V2 = (
    "format_version",
    "version",
    "created_at",
    "summarizer_step",
    "config_hash",
    "num_rows",
    "k",
    "d",
    "quantization",
    "layout",
    "chunk_rows",
    "coverage",
    "arrays",
    "extra_arrays",
)
ATTEMPT_KEYS = ("attempt", "data", "build_clock", "content_hash")  # not part of the content
LINEAGE_KEYS = (  # format 4: what a downstream model needs to name what it was trained on
    "summarizer_checkpoint",
    "data_fingerprint",
    "present_rows",
    "bytes_per_row",
    "watermark",
    "row_record",
)
REQUIRED_KEYS = {
    2: MANIFEST_KEYS_V2,
    3: MANIFEST_KEYS_V2 + ATTEMPT_KEYS,
    4: MANIFEST_KEYS_V2 + ATTEMPT_KEYS + LINEAGE_KEYS,
}
MANIFEST_KEYS = REQUIRED_KEYS[FORMAT_VERSION]


class SummaryStoreError(UserError):
    """A store that cannot be used as asked: nothing published, corrupt, or mismatched."""


# --------------------------------------------------------------------------- specs and keys


def root_spec(root: Any) -> dict:
    """A store root (path, URL, spec dict, its JSON text, or KvStore.Spec) as a kvstore JSON
    spec whose path is a directory prefix ("" or ending in "/")."""
    if isinstance(root, ts.KvStore.Spec):
        spec = root.to_json()
    elif isinstance(root, Mapping):
        spec = dict(root)
    elif isinstance(root, str) and root.lstrip().startswith("{"):
        spec = _json_spec(root)
    elif isinstance(root, (str, os.PathLike)):
        path = os.fspath(root)
        if "://" in path:
            spec = ts.KvStore.Spec(path).to_json()
        else:
            spec = {"driver": "file", "path": os.path.abspath(path)}
    else:
        raise TypeError(f"store root must be a path, URL or kvstore spec, got {type(root)}")
    path = spec.get("path", "")
    spec["path"] = path if not path or path.endswith("/") else path + "/"
    return spec


def _json_spec(text: str) -> dict:
    """A kvstore spec given as JSON text (e.g. a config value naming an S3 endpoint)."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        spec = e
    if not isinstance(spec, dict) or not isinstance(spec.get("driver"), str):
        raise SummaryStoreError(
            f"store root {text[:120]!r} is neither a path, a URL nor a JSON kvstore spec with "
            f'a "driver" ({spec}). Fix: pass e.g. {{"driver": "s3", "bucket": "my-bucket", '
            '"path": "cache/"}'
        )
    return spec


def join(spec: dict, relative: str) -> dict:
    """The kvstore spec of `relative` under the directory prefix of `spec`."""
    return {**spec, "path": spec["path"] + relative}


def describe(spec: dict) -> str:
    """A root spec as text, for error messages."""
    return json.dumps(spec, sort_keys=True)


def check_name(kind: str, name: str) -> None:
    """Refuses a version id or array name that is not a safe single path part."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"{kind} {name!r} must match {NAME_RE.pattern} (it is a path part)")


def version_prefix(version: str) -> str:
    return f"versions/{version}/"


def manifest_key(version: str) -> str:
    return version_prefix(version) + "manifest.json"


def attempt_prefix(version: str, attempt: str) -> str:
    return version_prefix(version) + f"attempts/{attempt}/"


def data_prefix(manifest: dict) -> str:
    """Where a published version's arrays are (format 2: ``versions/<v>/data/``)."""
    return manifest.get("data") or version_prefix(manifest["version"]) + "data/"


def array_kvstore(root: dict, prefix: str, layout: str, name: str) -> dict:
    """The kvstore spec of array `name` of the arrays under `prefix` of root spec `root`."""
    data = join(root, prefix)
    if layout == "ocdbt":
        return {"driver": "ocdbt", "base": data, "path": f"{name}/"}
    return join(data, f"{name}/")


def open_base(root: dict, context: ts.Context) -> ts.KvStore:
    """The root kvstore, against which every key of this module is read and written."""
    return ts.KvStore.open(root, context=context).result()


def new_attempt_id(now_ns: int) -> str:
    """A fresh attempt id: its start time (UTC, for garbage collection) and 48 random bits."""
    started = datetime.datetime.fromtimestamp(now_ns / 1e9, datetime.UTC)
    return f"{started.strftime(ATTEMPT_TIME)}-{secrets.token_hex(6)}"


def attempt_started(attempt: str) -> float | None:
    """The start time (s since the epoch) in an attempt id; None for a foreign name."""
    try:
        started = datetime.datetime.strptime(attempt.split("-")[0], ATTEMPT_TIME)
    except ValueError:
        return None
    return started.replace(tzinfo=datetime.UTC).timestamp()


# --------------------------------------------------------------------------- single keys


def read_stamped(base: ts.KvStore, key: str) -> tuple[str | None, bytes]:
    """The value of `key` as text (None when missing) and its storage generation."""
    result = base.read(key).result()
    text = result.value.decode() if result.state == "value" else None
    return text, result.stamp.generation


def write_if(base: ts.KvStore, key: str, value: bytes | None, generation: bytes) -> bool:
    """Writes (None: deletes) `key` only if its generation is still `generation`; whether it
    did (a failed condition returns the empty, "unknown" generation)."""
    return bool(base.write(key, value, if_equal=generation).result().generation)


def delete_prefix(base: ts.KvStore, prefix: str) -> None:
    """Deletes every key under the directory prefix `prefix` (ending in "/")."""
    upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    base.delete_range(ts.KvStore.KeyRange(prefix, upper)).result()


def prune_empty_dirs(spec: dict, prefix: str) -> None:
    """Removes the empty directories a file kvstore leaves at and under a deleted `prefix`
    (``versions/...``), and its emptied parents below ``versions/``."""
    if spec.get("driver") != "file":
        return  # other kvstores have no directories
    top = os.path.join(spec["path"], prefix)
    directories = [d for d, _, _ in os.walk(top, topdown=False)]  # children first
    parts = prefix.rstrip("/").split("/")
    directories += [os.path.join(spec["path"], *parts[:n]) for n in range(len(parts) - 1, 1, -1)]
    for directory in directories:
        with contextlib.suppress(OSError):  # not empty (any more): keep it
            os.rmdir(directory)


def list_versions(base: ts.KvStore) -> dict[str, dict]:
    """{version: {"published": bool, "attempts": set of attempt ids}} from the keys."""
    versions: dict[str, dict] = {}
    for key in base.list(ts.KvStore.KeyRange("versions/", "versions0")).result():
        parts = key.decode().split("/")
        if len(parts) < 3 or not NAME_RE.match(parts[1]):
            continue
        entry = versions.setdefault(parts[1], {"published": False, "attempts": set()})
        if parts[2:] == ["manifest.json"]:
            entry["published"] = True
        elif parts[2] == "attempts" and len(parts) > 4 and NAME_RE.match(parts[3]):
            entry["attempts"].add(parts[3])
    return versions


# --------------------------------------------------------------------------- CURRENT


def parse_current(text: str, where: str) -> str:
    version = text.strip()
    if not NAME_RE.match(version):
        raise SummaryStoreError(
            f"CURRENT at {where} is corrupt: {text[:80]!r}. "
            "Fix: point it at a published version (SummaryStore.set_current) or rebuild"
        )
    return version


def read_current(base: ts.KvStore, where: str) -> str:
    """The version id CURRENT names; `where` describes the root for error messages."""
    current, _ = read_stamped(base, CURRENT_KEY)
    if current is None:
        raise SummaryStoreError(
            f"no summary version is published at {where} (CURRENT is missing). "
            "Fix: build a cache first (--mode=build_cache)"
        )
    return parse_current(current, where)


def read_current_stamped(base: ts.KvStore) -> tuple[str | None, bytes]:
    """(version CURRENT names, or None when missing or corrupt; CURRENT's generation)."""
    text, generation = read_stamped(base, CURRENT_KEY)
    version = text.strip() if text is not None else None
    return (version if version and NAME_RE.match(version) else None), generation


def write_current(base: ts.KvStore, version: str, if_equal: bytes | None = None) -> bool:
    """Points CURRENT at `version` in one kvstore write, only if CURRENT's generation is
    still `if_equal` (when given); whether it did. The caller checks it is published."""
    value = (version + "\n").encode()
    if if_equal is None:
        base.write(CURRENT_KEY, value).result()
        return True
    return write_if(base, CURRENT_KEY, value, if_equal)


# --------------------------------------------------------------------------- manifests


def parse_manifest(text: str, version: str, where: str) -> dict:
    """A manifest's JSON, refusing a corrupt one or one of a format this reader cannot read."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError:
        manifest = None
    manifest = manifest if isinstance(manifest, dict) else {}
    found = manifest.get("format_version")
    required = REQUIRED_KEYS.get(found, MANIFEST_KEYS_V2) if isinstance(found, int) else ()
    missing = [key for key in required if key not in manifest]
    if missing or found not in READABLE_FORMATS:
        raise SummaryStoreError(
            f"manifest of version {version!r} at {where} is corrupt or of another format "
            f"(missing keys {missing}, format_version {found!r}, this reader reads "
            f"{', '.join(map(str, READABLE_FORMATS))}). Fix: rebuild the version under a "
            "new id (--mode=build_cache)"
        )
    return manifest


def read_manifest(base: ts.KvStore, version: str, where: str) -> tuple[dict, bytes]:
    """The manifest of a published version and its generation; refuses a missing one."""
    text, generation = read_stamped(base, manifest_key(version))
    if text is None:
        raise SummaryStoreError(
            f"version {version!r} at {where} is not published (no {manifest_key(version)}): "
            "its build did not finish, or it was garbage-collected. "
            "Fix: rebuild it or open another version"
        )
    return parse_manifest(text, version, where), generation


def order_key(manifest: dict) -> tuple[int, str]:
    """Sorts versions oldest first (format 2, without a build clock, before all others)."""
    return int(manifest.get("build_clock", 0)), str(manifest.get("attempt", ""))


def _conflict(version: str, where: str, detail: str) -> SummaryStoreError:
    return SummaryStoreError(
        f"version {version!r} is already published at {where} with other content ({detail}); "
        "published versions are immutable. Fix: write a new version id, or rerun the "
        "identical build to finish publishing it"
    )


def refuse_conflicting(base: ts.KvStore, version: str, where: str, **fields) -> None:
    """Fails fast, before any array is written, when `version` is published with other
    metadata (`fields`: manifest key -> value of this build)."""
    text, _ = read_stamped(base, manifest_key(version))
    if text is not None:
        existing = parse_manifest(text, version, where)
        differ = [key for key, value in fields.items() if existing.get(key) != value]
        if differ:
            raise _conflict(version, where, f"{', '.join(differ)} differ")


def create_manifest(base: ts.KvStore, manifest: dict, where: str) -> tuple[dict, bool]:
    """Creates a version's manifest only if it is absent, which publishes the version.

    Returns (the published manifest, whether an identical earlier build had published it:
    then its manifest is returned). Another content under the same id is refused.
    """
    version, key = manifest["version"], manifest_key(manifest["version"])
    for _ in range(3):  # a failed create means another writer just created it
        text, generation = read_stamped(base, key)
        if text is None:
            if write_if(base, key, json.dumps(manifest, indent=1).encode(), generation):
                return manifest, False
            continue
        existing = parse_manifest(text, version, where)
        if existing.get("content_hash") == manifest["content_hash"]:
            return existing, True
        raise _conflict(version, where, "another content hash")
    raise SummaryStoreError(
        f"the manifest of version {version!r} at {where} keeps appearing and vanishing. "
        "Fix: stop concurrent writers and garbage collections of this id, then rerun"
    )


def build_manifest(
    version, schema, *, config_hash, summarizer_step, quantization, layout, chunk_rows,
    coverage_info, attempt, build_clock, data_digest, lineage, refresh=None,
) -> dict:  # fmt: skip
    """The manifest JSON of a version from its array schema {name: (shape, dtype)}, the
    digest of its array writes and its `lineage` (a value for each of ``LINEAGE_KEYS``);
    a refresh version adds ``refresh`` (parent, delta, sources, row map:
    `vista_jax.store_refresh`). ``content_hash`` covers all but the attempt's keys."""

    def describe_arrays(names):
        return {
            n: {"shape": list(schema[n][0]), "dtype": np.dtype(schema[n][1]).name} for n in names
        }

    (num_rows, k, d), _ = schema["summary"]
    coverage = coverage_info or {
        "kind": "event_position",
        "per_row": "array 'coverage': number of its user's time-sorted events covered",
    }
    content = {
        "format_version": FORMAT_VERSION,
        "version": version,
        "summarizer_step": int(summarizer_step),
        "config_hash": str(config_hash),
        "num_rows": int(num_rows),
        "k": int(k),
        "d": int(d),
        "quantization": quantization,
        "layout": layout,
        "chunk_rows": int(chunk_rows),
        "coverage": dict(coverage),
        "arrays": describe_arrays([n for n in CORE_ARRAYS if n in schema]),
        "extra_arrays": describe_arrays([n for n in schema if n not in CORE_ARRAYS]),
        **{key: lineage[key] for key in LINEAGE_KEYS},
    }
    if refresh is not None:
        content["refresh"] = refresh
    content_hash = hashlib.sha256(json.dumps(content, sort_keys=True).encode())
    content_hash.update(data_digest.encode())
    return {
        **content,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
        "attempt": attempt,
        "data": attempt_prefix(version, attempt),
        "build_clock": int(build_clock),
        "content_hash": "sha256:" + content_hash.hexdigest(),
    }


# --------------------------------------------------------------------------- collection


def retained(published: dict, current: str | None, keep_last: int, pinned: set) -> list[str]:
    """Versions to keep, newest first: CURRENT, newer ones, the newest `keep_last`, pins."""
    newest = sorted(published, key=lambda v: order_key(published[v][0]), reverse=True)
    kept = set(newest[:keep_last]) | (pinned & set(published))
    if current in published:
        floor = order_key(published[current][0])
        kept |= {v for v in published if order_key(published[v][0]) >= floor}
    return [v for v in newest if v in kept]


def collect_version(base: ts.KvStore, manifest: dict, generation: bytes, in_use=None) -> bool:
    """Unpublishes a version (its manifest, if unchanged and not CURRENT), then deletes its
    arrays unless `in_use(prefix)` (asked after the manifest is gone) says a published
    refresh version still reads them; whether it unpublished it."""
    version = manifest["version"]
    if read_current_stamped(base)[0] == version:  # rolled back to it meanwhile
        return False
    if not write_if(base, manifest_key(version), None, generation):
        return False
    if in_use is None or not in_use(data_prefix(manifest)):
        delete_prefix(base, data_prefix(manifest))
    return True

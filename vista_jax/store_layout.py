"""Key layout of a summary store: kvstore specs, version naming, manifest and CURRENT.

A store root is any TensorStore kvstore: a local path (the default), a URL such as
``"memory://"``, ``"gs://bucket/cache/"``, ``"s3://bucket/cache/"``, or a kvstore spec dict
such as ``{"driver": "memory"}``. Every key below is joined onto the root's ``path``, so the
same code serves every backend::

  CURRENT                              text: id of the published version
  versions/<version>/manifest.json     written last; its presence publishes the version
  versions/<version>/data/             one OCDBT database (few files) of zarr3 arrays:
      summary    [R, K, D]  int8 | bfloat16 | float32   (quantization "int8" | "bf16" | "none")
      scale      [R, K]     float32   int8 only: one symmetric scale per summary token
      present    [R]        uint8     1 = row written; other rows read as absent (zeros)
      coverage   [R]        int64     how many of the row's user's time-sorted events it covers
      <extra>    [R, ...]   any       named per-row arrays (e.g. recurrent QLA states)

With layout "plain" the arrays of ``data/`` are plain zarr3 directories instead of one OCDBT
database. This module names those keys and reads and writes the small ones (manifest,
CURRENT), each in a single kvstore operation; `vista_jax.store` orders them into an atomic
publication and `vista_jax.store_write` writes the arrays.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorstore as ts

from vista_jax.errors import UserError

FORMAT_VERSION = 2  # 2: row-based keys num_rows, chunk_rows (1 had num_users, chunk_users)
LAYOUTS = ("ocdbt", "plain")
CORE_ARRAYS = ("summary", "scale", "present", "coverage")
CURRENT_KEY = "CURRENT"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MANIFEST_KEYS = (
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


class SummaryStoreError(UserError):
    """A store that cannot be used as asked: nothing published, corrupt, or mismatched."""


# --------------------------------------------------------------------------- specs and keys


def root_spec(root: Any) -> dict:
    """A store root (path, URL, spec dict or KvStore.Spec) as a kvstore JSON spec whose path
    is a directory prefix ("" or ending in "/")."""
    if isinstance(root, ts.KvStore.Spec):
        spec = root.to_json()
    elif isinstance(root, Mapping):
        spec = dict(root)
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


def array_kvstore(root: dict, version: str, layout: str, name: str) -> dict:
    """The kvstore spec of array `name` of a version, under root spec `root`."""
    data = join(root, version_prefix(version) + "data/")
    if layout == "ocdbt":
        return {"driver": "ocdbt", "base": data, "path": f"{name}/"}
    return join(data, f"{name}/")


def open_base(root: dict, context: ts.Context) -> ts.KvStore:
    """The root kvstore, against which every key of this module is read and written."""
    return ts.KvStore.open(root, context=context).result()


# --------------------------------------------------------------------------- CURRENT


def read_text(base: ts.KvStore, key: str) -> str | None:
    """The value of `key` as text, or None when it is missing."""
    result = base.read(key).result()
    return result.value.decode() if result.state == "value" else None


def read_current(base: ts.KvStore, where: str) -> str:
    """The version id CURRENT names; `where` describes the root for error messages."""
    current = read_text(base, CURRENT_KEY)
    if current is None:
        raise SummaryStoreError(
            f"no summary version is published at {where} (CURRENT is missing); "
            "build a cache first (pipeline build_cache)."
        )
    version = current.strip()
    if not NAME_RE.match(version):
        raise SummaryStoreError(f"CURRENT at {where} is corrupt: {current[:80]!r}")
    return version


def write_current(base: ts.KvStore, version: str) -> None:
    """Points CURRENT at `version` in one kvstore write; the caller checks it is published."""
    base.write(CURRENT_KEY, (version + "\n").encode()).result()


# --------------------------------------------------------------------------- versions


def is_published(base: ts.KvStore, version: str) -> bool:
    """Whether `version` has a manifest (is published), valid or not."""
    return read_text(base, manifest_key(version)) is not None


def read_manifest(base: ts.KvStore, version: str, where: str) -> dict:
    """The manifest of a published version; refuses a missing, corrupt or foreign one."""
    text = read_text(base, manifest_key(version))
    if text is None:
        raise SummaryStoreError(
            f"version {version!r} at {where} is not published (no {manifest_key(version)}); "
            "its build did not finish. Rebuild it or open another version."
        )
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError:
        manifest = None
    manifest = manifest if isinstance(manifest, dict) else {}
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing or manifest["format_version"] != FORMAT_VERSION:
        raise SummaryStoreError(
            f"manifest of version {version!r} at {where} is corrupt or of another format "
            f"(missing keys {missing}, format_version {manifest.get('format_version')!r}, "
            f"this reader reads {FORMAT_VERSION}); rebuild the version."
        )
    return manifest


def write_manifest(base: ts.KvStore, manifest: dict) -> None:
    """Writes a version's manifest in one kvstore write: this publishes the version."""
    key = manifest_key(manifest["version"])
    base.write(key, json.dumps(manifest, indent=1).encode()).result()


def delete_version(base: ts.KvStore, version: str) -> None:
    """Deletes every key under ``versions/<version>/`` (data and manifest)."""
    prefix = version_prefix(version)
    upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    base.delete_range(ts.KvStore.KeyRange(prefix, upper)).result()


def build_manifest(
    version, schema, config_hash, summarizer_step, quantization, layout, chunk_rows, coverage_info
) -> dict:
    """The manifest JSON of a version from its array schema {name: (shape, dtype)}."""

    def describe_arrays(names):
        return {
            n: {"shape": list(schema[n][0]), "dtype": np.dtype(schema[n][1]).name} for n in names
        }

    (num_rows, k, d), _ = schema["summary"]
    core = [n for n in CORE_ARRAYS if n in schema]
    return {
        "format_version": FORMAT_VERSION,
        "version": version,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
        "summarizer_step": int(summarizer_step),
        "config_hash": str(config_hash),
        "num_rows": int(num_rows),
        "k": int(k),
        "d": int(d),
        "quantization": quantization,
        "layout": layout,
        "chunk_rows": int(chunk_rows),
        "coverage": dict(
            coverage_info
            or {
                "kind": "event_position",
                "per_row": "array 'coverage': number of its user's time-sorted events covered",
            }
        ),
        "arrays": describe_arrays(core),
        "extra_arrays": describe_arrays([n for n in schema if n not in CORE_ARRAYS]),
    }

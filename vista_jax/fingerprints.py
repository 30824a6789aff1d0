"""Stable names for what produced a result: config hashes and the code's git commit."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
import subprocess
from typing import Any


def config_hash(obj: Any) -> str:
    """Stable short hash of a (nested) dataclass or dict; names a summarizer in a cache.

    Every dataclass, at any depth, is hashed by all of its fields (never by its repr, which
    may leave fields out)."""
    blob = json.dumps(_plain(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


@functools.cache
def git_commit() -> str:
    """The checkout's commit (with `+dirty` if it has uncommitted changes), or "unknown"."""
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        commit = run("rev-parse", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")

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
    """Stable short hash of a (nested) dataclass or dict; names a summarizer in a cache."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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

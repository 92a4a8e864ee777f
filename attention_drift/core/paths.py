"""Where the toolkit keeps what it computes once: the one cache root.

``$ATTENTION_DRIFT_CACHE`` if set, else ``~/.cache/attention_drift``; every cached thing lives
in its own sub-folder (``models``, ``stats``, ``templates``, ``data``, ``edits``), whether or
not the variable is set.
"""

import os
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """The cache root (``$ATTENTION_DRIFT_CACHE`` or ``~/.cache/attention_drift``)."""
    return Path(os.environ.get("ATTENTION_DRIFT_CACHE") or Path.home() / ".cache" / "attention_drift")


def cache_dir(name: str) -> Path:
    """The cache sub-folder ``name`` (not created)."""
    return cache_root() / name


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Make ``path`` by ``write(tmp)`` on a temporary file beside it, then one rename, so that a
    reader, or a process killed mid-write, never meets half a file; creates the folder. Returns
    ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

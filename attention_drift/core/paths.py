"""Where the toolkit keeps what it computes once: the one cache root.

``$ATTENTION_DRIFT_CACHE`` if set, else ``~/.cache/attention_drift``; every cached thing lives
in its own sub-folder (``models``, ``stats``, ``templates``, ``data``, ``edits``), whether or
not the variable is set.
"""

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache root (``$ATTENTION_DRIFT_CACHE`` or ``~/.cache/attention_drift``)."""
    return Path(os.environ.get("ATTENTION_DRIFT_CACHE") or Path.home() / ".cache" / "attention_drift")


def cache_dir(name: str) -> Path:
    """The cache sub-folder ``name`` (not created)."""
    return cache_root() / name

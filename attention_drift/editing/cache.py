"""Edits kept on disk and replayed bitwise: :class:`EditCache`.

    cache = EditCache(model, "edits/")
    for record in records:
        with cache.edit(record, "rome", sadr=SADRConfig()) as result:
            ...  # edited: computed the first time, replayed from the folder afterwards

Files: ``folder/<edit key>/<requests key>.pt`` (:meth:`EditResult.save`; keys shortened to
20 hex digits, the full ones are checked on reading) and ``folder/<edit key>/edit.json``,
the description the edit key hashes, for people. The edit key
(:func:`~attention_drift.editing.identity.edit_key`) covers the model and the fully
resolved configuration (presets, protocol defaults, statistics, templates), so a changed
preset or default never reuses a stale edit. A replayed edit adds the stored updates in the
stored order to the same original weights, so the edited weights are bitwise those of the
edit that was stored.
"""

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from attention_drift.core.data import Record, Rewrite
from attention_drift.editing.api import EditResult, apply_edit
from attention_drift.editing.config import RequestError
from attention_drift.editing.identity import describe_resolved, digest, requests_key
from attention_drift.editing.registry import EditorConfig, resolve_edit
from attention_drift.editing.sadr import SADRConfig

KEY_CHARS = 20


class EditCache:
    """Edits of one model stored in ``folder``, by resolved configuration and requests.

    Args:
        model: the model to edit (its identity is part of every key).
        folder: where the edits are stored (created when needed).
        progress: progress bars while statistics are computed.

    ``hits`` / ``misses`` count the edits replayed from the folder / computed.
    """

    def __init__(self, model, folder: str | os.PathLike, *, progress: bool = False):
        self.model = model
        self.folder = Path(folder)
        self.progress = progress
        self.hits = 0
        self.misses = 0

    def path(
        self,
        requests: Record | Rewrite | Sequence,
        method: str = "rome",
        config: EditorConfig | None = None,
        sadr: SADRConfig | None = None,
    ) -> Path:
        """Where the edit of ``requests`` with this configuration is (or would be) stored."""
        reqs = _requests(requests)
        key = self._key(method, config, sadr)[0]
        return self.folder / key[:KEY_CHARS] / f"{requests_key(reqs)[:KEY_CHARS]}.pt"

    def result(
        self,
        requests: Record | Rewrite | Sequence,
        method: str = "rome",
        config: EditorConfig | None = None,
        sadr: SADRConfig | None = None,
    ) -> EditResult:
        """The :class:`EditResult` of ``requests``, restored (``with result:`` applies it):
        read from the folder, or computed now and stored.

        ``requests``: a :class:`~attention_drift.core.data.Record`, a
        :class:`~attention_drift.core.data.Rewrite`, or a sequence of either (one batch edit).
        ``config`` and ``sadr`` as in :func:`~attention_drift.editing.edit`.
        """
        reqs = _requests(requests)
        key, description = self._key(method, config, sadr)
        folder = self.folder / key[:KEY_CHARS]
        path = folder / f"{requests_key(reqs)[:KEY_CHARS]}.pt"
        if path.is_file():
            result = EditResult.load(path, self.model)
            if result.key == key and result.requests == reqs:
                self.hits += 1
                return result
        result = apply_edit(self.model, reqs, method, config, sadr=sadr, progress=self.progress)
        try:
            result.save(path)
            info = folder / "edit.json"
            if not info.is_file():
                info.write_text(json.dumps({"key": key, **description}, indent=1) + "\n")
        finally:
            result.restore()
        self.misses += 1
        return result

    @contextlib.contextmanager
    def edit(
        self,
        requests: Record | Rewrite | Sequence,
        method: str = "rome",
        config: EditorConfig | None = None,
        sadr: SADRConfig | None = None,
    ) -> Iterator[EditResult]:
        """``with cache.edit(record, "rome") as result:`` the model holds the edit inside the
        block (replayed, or computed and stored) and its original weights after it."""
        result = self.result(requests, method, config, sadr)
        with result:
            yield result

    def _key(self, method: str, config, sadr) -> tuple[str, dict]:
        editor, config, sadr = resolve_edit(self.model, method, config, sadr)
        description = describe_resolved(self.model, editor.name, config, sadr)
        return digest(description), description


def _requests(requests) -> tuple[Rewrite, ...]:
    items = [requests] if isinstance(requests, (Record, Rewrite)) else requests
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or not items:
        raise RequestError(
            f"requests must be a Record, a Rewrite or a non-empty sequence of them, got {type(requests).__name__}"
        )
    out = []
    for item in items:
        if not isinstance(item, (Record, Rewrite)):
            raise RequestError(f"every request must be a Record or a Rewrite, got {type(item).__name__}")
        out.append(item.rewrite if isinstance(item, Record) else item)
    return tuple(out)

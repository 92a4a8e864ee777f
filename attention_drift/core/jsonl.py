"""Resumable JSON-lines run files: one header line with the run's configuration, then one line
per evaluated record, each written and flushed as soon as it is done.

Header: ``{"meta": {...}}`` (e.g. model, method, data, fluency and edit settings). Appending to
an existing file is allowed only with an equal header, so one file never mixes two
configurations; records already in the file (same ``case_id`` and ``method``) are skipped. A
last line cut short by a crash is dropped when the file is reopened.
"""

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from attention_drift.core.errors import AttentionDriftError


class RunFileError(AttentionDriftError):
    """A run file that cannot be read or appended to; the message says why and what to do."""


@dataclass(frozen=True)
class Run:
    """A run file's content: the header's meta and the record lines, in file order.

    ``truncated``: the file ended in a line cut short (a crashed write), which was left out.
    """

    meta: dict
    records: list[dict]
    truncated: bool = False


def _key(line: dict) -> tuple[str, str]:
    return json.dumps(line.get("case_id")), str(line.get("method"))


def _header_diff(a: dict, b: dict, ignore: tuple[str, ...] = ("created",)) -> list[str]:
    """Keys (but ``ignore``) on which two run headers differ, sorted."""
    return sorted(k for k in (set(a) | set(b)) - set(ignore) if a.get(k) != b.get(k))


def _parse(path: Path) -> tuple[dict | None, list[dict], int, bool]:
    """(meta, record lines, byte length of the well-formed prefix, whether a cut-short last line
    was left out) of ``path``.

    Only an unterminated last line may be malformed (a write cut short); it is left out.
    """
    data = path.read_bytes()
    pieces = data.split(b"\n")
    meta, records, good = None, [], 0
    for number, raw in enumerate(pieces, start=1):
        last = number == len(pieces)
        if raw.strip():
            try:
                obj = json.loads(raw)
            except ValueError as exc:
                if last:
                    break
                raise RunFileError(f"{path}: line {number} is not valid JSON ({exc}); fix or delete the file") from None
            if not isinstance(obj, dict):
                raise RunFileError(f"{path}: line {number} is not a JSON object; is this an attention-drift run file?")
            if meta is None:
                if not isinstance(obj.get("meta"), dict):
                    raise RunFileError(f"{path}: the first line is not a run header ({{\"meta\": ...}}); "
                                       "is this an attention-drift run file?")
                meta = obj["meta"]
            else:
                records.append(obj)
        good += len(raw) + (0 if last else 1)
    return meta, records, good, bool(data[good:].strip())


def read_run(path: str | os.PathLike) -> Run:
    """Read a run file written by :class:`RunFile`."""
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"run file {str(path)!r} does not exist; write one with an evaluation run "
                           "(attention-drift evaluate)")
    meta, records, _, truncated = _parse(path)
    if meta is None:
        raise RunFileError(f"run file {path} is empty")
    return Run(meta, records, truncated=truncated)


class RunFile:
    """Append-only writer of one run's JSON lines, resuming where a previous run stopped.

    Opening reads the existing file (if any), checks its header against ``meta`` (all keys
    except ``ignore``) and refuses a mismatch. Nothing is written before the first
    :meth:`write`, so a run that fails before its first record leaves no file behind.
    """

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any], *, ignore: tuple[str, ...] = ("created",)):
        self.path = Path(path)
        self.meta = json.loads(json.dumps(meta))
        self._done: set[tuple[str, str]] = set()
        self._file = None
        self._good = 0
        self._has_header = False
        if self.path.is_dir():
            raise RunFileError(f"out {str(self.path)!r} is a folder; give a .jsonl file path", fields=("out",))
        if self.path.exists():
            old, records, self._good, _ = _parse(self.path)
            if old is not None:
                self._check(old, ignore)
                self._done = {_key(r) for r in records}
                self._has_header = True

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and (not self._has_header or self._good < self.path.stat().st_size):
            os.truncate(self.path, self._good if self._has_header else 0)
        self._file = self.path.open("a", encoding="utf-8")
        if not self._has_header:
            self._write({"meta": self.meta})
            self._has_header = True
        elif self.path.read_bytes()[-1:] != b"\n":
            self._file.write("\n")

    def _check(self, old: dict, ignore: tuple[str, ...]) -> None:
        diff = _header_diff(old, self.meta, ignore)
        if diff:
            was = ", ".join(f"{k}={old.get(k)!r}" for k in diff)
            now = ", ".join(f"{k}={self.meta.get(k)!r}" for k in diff)
            raise RunFileError(
                f"{self.path} was written by a run with {was}, but this run has {now}; "
                "use another --out file (or delete this one to start over)"
            )

    def done(self, case_id: int | str, method: str) -> bool:
        """Whether the record ``case_id`` evaluated with ``method`` is already in the file."""
        return (json.dumps(case_id), str(method)) in self._done

    @property
    def n_done(self) -> int:
        return len(self._done)

    def _write(self, obj: dict) -> None:
        self._file.write(json.dumps(obj) + "\n")
        self._file.flush()

    def write(self, line: dict) -> None:
        """Append one record line (needs ``case_id`` and ``method``) and flush it to disk."""
        if "case_id" not in line or "method" not in line:
            raise ValueError("a record line needs 'case_id' and 'method'")
        key = _key(line)
        if key in self._done:
            raise RunFileError(f"record case_id={line['case_id']!r} (method {line['method']!r}) is already in {self.path}")
        if self._file is None:
            self._open()
        self._write(line)
        self._done.add(key)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shard_of(case_id: int | str, n_shards: int) -> int:
    """The shard (``0..n_shards-1``) a record belongs to: stable across runs and machines."""
    return zlib.crc32(json.dumps(case_id).encode()) % n_shards


def merge_runs(out: str | os.PathLike, parts: list[str | os.PathLike]) -> int:
    """Write ``out`` as the union of the run files ``parts`` (``out`` itself may be one of
    them); all headers must agree (except ``created``), a record in several parts is kept once.
    Returns the number of records written."""
    runs = [read_run(p) for p in parts if Path(p).is_file()]
    if not runs:
        raise RunFileError(f"nothing to merge into {out}: none of {[str(p) for p in parts]} exists")
    meta = runs[0].meta
    seen: set[tuple[str, str]] = set()
    lines = [json.dumps({"meta": meta})]
    for run in runs:
        diff = _header_diff(meta, run.meta)
        if diff:
            key = diff[0]
            raise RunFileError(f"cannot merge run files with different {key!r}: "
                               f"{meta.get(key)!r} vs {run.meta.get(key)!r}")
        for record in run.records:
            if _key(record) not in seen:
                seen.add(_key(record))
                lines.append(json.dumps(record))
    tmp = Path(f"{out}.merging")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out)
    return len(lines) - 1


def split_run(path: str | os.PathLike, parts: list[str | os.PathLike]) -> None:
    """Distribute the records of ``path`` over ``parts`` by :func:`shard_of` (appending to
    parts that exist), so sharded runs resume without redoing them."""
    run = read_run(path)
    existing = [read_run(p) if Path(p).is_file() else Run(run.meta, []) for p in parts]
    buckets = [list(r.records) for r in existing]
    have = [{_key(line) for line in b} for b in buckets]
    for record in run.records:
        shard = shard_of(record["case_id"], len(parts))
        if _key(record) not in have[shard]:
            buckets[shard].append(record)
    for part, records in zip(parts, buckets):
        Path(part).write_text("\n".join(json.dumps(x) for x in [{"meta": run.meta}, *records]) + "\n",
                              encoding="utf-8")

"""Evaluation runs: records x one variant -> a resumable run file (what ``attention-drift evaluate``,
``figures`` and sweeps call).

Each record is scored before the edit and, for an editing variant, inside it (the weights are
restored after every record: the single-edit protocol), and one JSON line per record is
appended to the run file as soon as it is done. Re-running with the same file resumes.

Run file lines (see :mod:`attention_drift.core.jsonl`): a header ``{"meta": {"format", "model",
"method", "variant", "data", "fluency", "edit", "created"}}`` (``edit``: the variant's
:meth:`~attention_drift.runs.variants.Variant.meta`), then per record ``{"case_id", "kind",
"method", "model", "subject", "target_new", "target_true", "pre": SCORES, "post": SCORES
(editing variants only), "edit_key", "edit_seconds", "eval_seconds"}`` where SCORES is
``{"groups": {GROUP: {"scores": [[p_right, p_wrong, correct], ...], "skipped": k}}, "fluency":
{...}|null, "metrics": {METRIC: {"values": [v, ...]}}, "reference": {...}}`` (``metrics``: the
field's metrics, :data:`attention_drift.measure.field_metrics.METRICS`, one value per prompt;
``reference``, pre-edit only: the pre-edit argmax tokens the post-edit locality compares with,
:func:`attention_drift.measure.field_metrics.record_reference`; NKL's pre-edit distributions are
not written but kept in memory, or re-read before the edit where ``pre`` is reused;
both absent from older files, which still summarize) and ``edit_key`` the hash of the whole resolved edit configuration
(:func:`attention_drift.editing.edit_key`): a run file never mixes two resolved
configurations, so a changed preset cannot silently resume an old run.
"""

import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from attention_drift.core.errors import AttentionDriftError
from attention_drift.runs.variants import Variant

FORMAT = "attention_drift.evaluate/2"


class RunError(AttentionDriftError):
    """A run that cannot start or continue; the message says what to change."""


DEV_DATA = {"dev": None, "dev-tune": "tune", "dev-report": "report"}


@dataclass(frozen=True)
class RecordSelection:
    """Which records a run uses.

    Args:
        data: a CounterFact-style JSON file, URL or ``"counterfact"``; ``"dev"``: the development
            split shipped with the package (``"dev-tune"`` / ``"dev-report"``: its fixed tuning /
            report half, :data:`~attention_drift.core.data.DEV_HALVES`); None: the 8-record example shipped with the package.
        kinds: keep only these record kinds (``counterfact``, ``wikidata``).
        limit: the first N (selected) records.
        balanced: with ``limit``: N/2 records of each kind.
        shard: ``(i, k)``: only the records of shard i of k (by case_id).
        with_distract: keep only records that have distract prompts (neighbourhood or relation
            prompts), before ``limit``: the drift and patching analyses measure nothing else.
    """

    data: str | None = None
    kinds: tuple[str, ...] | None = None
    limit: int | None = None
    balanced: bool = False
    shard: tuple[int, int] | None = None
    with_distract: bool = False

    def __post_init__(self):
        from attention_drift.core.data import KINDS

        if self.kinds is not None and (not self.kinds or set(self.kinds) - set(KINDS)):
            raise RunError(f"kinds {','.join(self.kinds)!r}: choose from {', '.join(KINDS)}", fields=("kinds",))
        if self.limit is not None and self.limit < 0:
            raise RunError(f"limit must be >= 0, got {self.limit}", fields=("limit",))
        if self.balanced and self.limit is None:
            raise RunError("balanced needs limit N (it takes N/2 records of each kind)", fields=("balanced", "limit"))
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            raise RunError(f"shard must be I/K with 0 <= I < K (e.g. 0/4), got {self.shard[0]}/{self.shard[1]}",
                           fields=("shard",))

    @property
    def label(self) -> str:
        """How run headers name the data."""
        if self.data is None:
            return "example"
        if self.data == "counterfact" or self.data in DEV_DATA or re.match(r"https?://", self.data):
            return self.data
        return str(Path(self.data).expanduser().resolve())

    def load(self) -> list:
        """The selected :class:`~attention_drift.core.data.Record` list (case_ids checked unique)."""
        from attention_drift.core import data
        from attention_drift.core.jsonl import shard_of

        if self.data is None:
            records = [r for r in data.load_example() if self.kinds is None or r.kind in self.kinds]
        elif self.data in DEV_DATA:
            records = data.load_dev(kinds=self.kinds, half=DEV_DATA[self.data])
        else:
            records = data.load_counterfact(self.data, kinds=self.kinds)
        if self.with_distract:
            records = [r for r in records if r.neighborhood.prompts or r.relation.prompts]
        if self.balanced:
            records = data.balanced_subset(records, self.limit)
        elif self.limit is not None:
            records = records[: self.limit]
        seen: set[str] = set()
        for r in records:
            key = json.dumps(r.case_id)
            if key in seen:
                raise RunError(f"case_id {r.case_id!r} occurs twice in {self.data or 'the example data'}; "
                               "resuming needs unique case_ids")
            seen.add(key)
        if self.shard is not None:
            records = [r for r in records if shard_of(r.case_id, self.shard[1]) == self.shard[0]]
        return records


class ModelHandle:
    """The model of a :class:`~attention_drift.runs.placement.Placement` (name, device, dtype),
    loaded on first use, once (runs that find nothing to do never load it); ``model``: one
    already loaded."""

    def __init__(self, placement, *, model=None):
        self.placement = placement
        self._model = model

    @property
    def name(self) -> str:
        return self.placement.model

    def get(self):
        if self._model is None:
            from attention_drift.core.models import load_model

            p = self.placement
            self._model = load_model(p.model, device=p.device, dtype=p.dtype)
        return self._model


def default_out(model: str, label: str) -> Path:
    """``runs/<model>-<label>.jsonl`` with the model name made file-name safe."""
    name = Path(model).name if Path(model).expanduser().exists() else model
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"
    return Path("runs") / f"{safe}-{label}.jsonl"


def check_writable(path: Path, *, folder: bool = False) -> None:
    """Raise a :class:`RunError` now, before any model loads, when ``path`` (a file, or with
    ``folder`` a directory) cannot be written."""
    target = path if folder else path.parent
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not folder and path.is_dir():
        raise RunError(f"out {str(path)!r} is a folder; give a .jsonl file path", fields=("out",))
    if folder and path.exists() and not path.is_dir():
        raise RunError(f"out {str(path)!r} is a file; give a folder", fields=("out",))
    if not existing.is_dir():
        raise RunError(f"cannot write {str(path)!r}: {str(existing)!r} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".attention-drift-check-"):
            pass
    except OSError as err:
        raise RunError(f"cannot write {str(path)!r}: {err.strerror or err} in {str(existing)!r}; "
                       "choose another out path", fields=("out",)) from None
    if not folder and path.exists() and not os.access(path, os.W_OK):
        raise RunError(f"cannot write {str(path)!r}: the file is read-only; choose another out path", fields=("out",))


def run_meta(model: str, variant: Variant, selection: RecordSelection, fluency) -> dict:
    """The header of an evaluation run file."""
    return {"format": FORMAT, "model": model, "method": variant.method, "variant": variant.name,
            "data": selection.label, "fluency": None if fluency is None else fluency.to_json(),
            "edit": variant.meta() if variant.edits else None, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def reused_pre(path: str | os.PathLike | None, meta: dict) -> dict:
    """``{case_id json: pre scores}`` of a run file made with the same model, data and fluency."""
    if path is None:
        return {}
    from attention_drift.core.jsonl import read_run

    run = read_run(path)
    for key in ("model", "data", "fluency"):
        if run.meta.get(key) != meta[key]:
            raise RunError(f"reuse_pre {path} has {key}={run.meta.get(key)!r}, this run {meta[key]!r}; "
                           "pre-edit scores can only be reused from the same model, data and fluency settings",
                           fields=("reuse_pre",))
    return {json.dumps(line["case_id"]): line["pre"] for line in run.records if "pre" in line}


def evaluate_record_line(model, record, variant: Variant, resolved, *, batch_size: int = 32, fluency=None,
                         pre: dict | None = None, key: str | None = None, progress: bool = False) -> dict:
    """One record's run line: pre-edit scores (or ``pre``), then for an editing variant the edit
    (``resolved`` = :meth:`Variant.resolve`) and the post-edit scores, which compare with the
    pre-edit pass for NKL and locality token accuracy (with a reused ``pre``, NKL's pre-edit
    distributions are read from the model before the edit: one small forward); weights restored after.
    ``progress``: a bar over the edit's optimisation steps."""
    from attention_drift.measure.evaluate import evaluate_record, pre_edit_distributions

    start = time.perf_counter()
    options = {"batch_size": batch_size, "fluency": fluency if fluency is not None else False}
    pre_scores = None
    if pre is None:
        pre_scores = evaluate_record(model, record, **options)
        pre = pre_scores.to_json()
    line = {"case_id": record.case_id, "kind": record.kind, "method": variant.method, "model": model.model_name,
            "subject": record.rewrite.subject, "target_new": record.rewrite.target_new,
            "target_true": record.rewrite.target_true, "pre": pre, "edit_key": key, "edit_seconds": None}
    if variant.edits:
        from attention_drift.editing import edit

        config, sadr = resolved
        if pre_scores is None:  # reused: NKL's pre-edit distributions are read now, before the edit
            pre_scores = pre_edit_distributions(model, record, pre, batch_size=batch_size)
        with edit(model, record.rewrite, method=variant.method, config=config, sadr=sadr, progress=progress) as result:
            post = evaluate_record(model, record, **options, pre=pre_scores)
        if sadr is not None:
            trace = result.sadr_records[0]
            line["sadr"] = {"loss": trace["loss"][-1] if trace else None, "steps": result.traces[0].steps_run,
                            "selected_heads": int(trace["mask"][-1].sum()) if trace.get("mask") else 0}
            if sadr.verify:
                line["sadr"]["fallback"] = result.fallback
        line["post"] = post.to_json()
        line["edit_seconds"] = float(result.seconds)
    line["eval_seconds"] = time.perf_counter() - start
    return line


@dataclass(frozen=True)
class RunOutcome:
    """What :func:`evaluate_run` did."""

    path: Path
    written: int
    skipped: int


def evaluate_run(handle: ModelHandle, records: Sequence, variant: Variant, out: str | os.PathLike, meta: dict, *,
                 batch_size: int = 32, fluency=None, reuse_pre: str | os.PathLike | None = None,
                 progress: bool = True) -> RunOutcome:
    """Evaluate ``records`` under ``variant`` into the run file ``out`` (resuming it).

    ``meta`` is the header (:func:`run_meta`). The model is loaded only when a record is left
    to do. Lines already in the file must carry the same ``edit_key`` as this run resolves to.
    """
    from attention_drift.core.jsonl import RunFile

    out = Path(out)
    check_writable(out)
    if batch_size < 1:
        raise RunError(f"batch_size must be >= 1, got {batch_size}", fields=("batch_size",))
    reused = reused_pre(reuse_pre, meta)
    with RunFile(out, meta) as run:
        todo = [r for r in records if not run.done(r.case_id, variant.method)]
        if todo:
            model = handle.get()
            resolved = variant.resolve(model)
            key = edit_key(model, variant, resolved)
            check_edit_key(out, key)
            from tqdm.auto import tqdm

            bar = tqdm(todo, desc=f"evaluate {variant.name}", unit="record", file=sys.stderr,
                       disable=not progress, dynamic_ncols=True)
            for record in bar:
                run.write(evaluate_record_line(model, record, variant, resolved, batch_size=batch_size,
                                               fluency=fluency, pre=reused.get(json.dumps(record.case_id)), key=key,
                                               progress=progress))
    return RunOutcome(out, len(todo), len(records) - len(todo))


def check_edit_key(path: Path, key: str | None) -> None:
    """Refuse to append to the run file ``path`` when its lines were written with another resolved
    edit configuration than ``key`` (a preset changed since)."""
    from attention_drift.core.jsonl import read_run

    if not path.is_file():
        return
    old = {line.get("edit_key") for line in read_run(path).records} - {None, key}
    if old:
        raise RunError(f"{path} was written with another resolved edit configuration (edit_key "
                       f"{sorted(old)[0]}, now {key}): a preset changed since; write to a new out path",
                       fields=("out",))


def edit_key(model, variant: Variant, resolved) -> str | None:
    """The run lines' ``edit_key``: :func:`attention_drift.editing.edit_key` of the resolved
    configuration (None for ``"none"``)."""
    if not variant.edits:
        return None
    from attention_drift.editing import edit_key

    config, sadr = resolved
    return edit_key(model, variant.method, config, sadr)

"""Evaluation runs: records x one variant -> a resumable run file (what ``attention-drift evaluate``,
``figures`` and sweeps call).

Each record is scored before the edit and, for an editing variant, inside it (the weights are
restored after every edit), and one JSON line per record is appended to the run file as soon as
it is done. Re-running with the same file resumes. With ``edit_batch`` B > 1 (batch editing, for
the editors that insert several requests as one update: :func:`~attention_drift.editing.registry.check_batch`)
the selected records are cut into consecutive chunks of B (the last may be smaller); each chunk's
records are scored pre-edit, then inside ONE edit of all the chunk's requests; a resumed chunk
with some lines written is edited whole again and only its missing lines written.

Run file lines (see :mod:`attention_drift.core.jsonl`): a header ``{"meta": {"format", "model",
"method", "variant", "data", "fluency", "edit", "created"}}`` (``edit``: the variant's
:meth:`~attention_drift.runs.variants.Variant.meta`; ``"edit_batch": B`` added where B > 1, so a
file resumes only with the same B; ``"groups": [...]`` added where the run scores other groups than
:data:`~attention_drift.measure.evaluate.BASE_GROUPS`, e.g. the distract suite of ``evaluate --suite``),
then per record ``{"case_id", "kind",
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
configurations, so a changed preset cannot silently resume an old run. ``edit_seconds`` is the
edit's time divided by the number of requests it edited (a record's share of a batch edit);
``eval_seconds`` the record's own scoring time plus that share. Batch-edited lines (B > 1) add
``"edit_batch": {"size": B, "index": chunk index, "case_ids": [the chunk's case_ids]}`` and
``"batch_edit_seconds"``: the whole chunk's edit time.
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


def run_meta(model: str, variant: Variant, selection: RecordSelection, fluency, edit_batch: int = 1,
             groups: Sequence[str] | None = None) -> dict:
    """The header of an evaluation run file (``edit_batch`` written only where it is above 1 and
    ``groups`` only where they are not the default, so other headers are those of older files)."""
    meta = {"format": FORMAT, "model": model, "method": variant.method, "variant": variant.name,
            "data": selection.label, "fluency": None if fluency is None else fluency.to_json(),
            "edit": variant.meta() if variant.edits else None, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if edit_batch != 1:
        meta["edit_batch"] = edit_batch
    if (listed := _groups_meta(groups)) is not None:
        meta["groups"] = listed
    return meta


def _groups_meta(groups: Sequence[str] | None) -> list[str] | None:
    """The header's ``"groups"``: None for the default groups, else the list in :data:`GROUPS` order."""
    from attention_drift.measure.evaluate import BASE_GROUPS, ordered_groups

    try:
        ordered = ordered_groups(groups)
    except ValueError as e:
        raise RunError(str(e), fields=("groups",)) from None
    return None if ordered is None or set(ordered) == set(BASE_GROUPS) else ordered


def suite_groups() -> tuple[str, ...]:
    """The default groups and the distract suite (:data:`~attention_drift.measure.evaluate.SUITE_GROUPS`):
    what ``evaluate --suite`` scores."""
    from attention_drift.measure.evaluate import BASE_GROUPS, SUITE_GROUPS

    return BASE_GROUPS + SUITE_GROUPS


def check_edit_batch(variant: Variant, edit_batch: int) -> None:
    """Raise a :class:`~attention_drift.editing.ConfigError` (or a :class:`RunError` for ``"none"``)
    when ``variant`` cannot edit ``edit_batch`` requests as one update; nothing is loaded."""
    if variant.edits:
        from attention_drift.editing.registry import check_batch

        check_batch(variant.method, edit_batch)
    elif edit_batch != 1:
        raise RunError(f"edit_batch {edit_batch!r} needs a batch editing method, not {variant.method!r}; "
                       "drop edit_batch or add --method memit", fields=("edit_batch",))


def reused_pre(path: str | os.PathLike | None, meta: dict) -> dict:
    """``{case_id json: pre scores}`` of a run file made with the same model, data, fluency and groups."""
    if path is None:
        return {}
    from attention_drift.core.jsonl import read_run

    run = read_run(path)
    for key in ("model", "data", "fluency", "groups"):
        if run.meta.get(key) != meta.get(key):
            raise RunError(f"reuse_pre {path} has {key}={run.meta.get(key)!r}, this run {meta[key]!r}; "
                           "pre-edit scores can only be reused from the same model, data, fluency and groups",
                           fields=("reuse_pre",))
    return {json.dumps(line["case_id"]): line["pre"] for line in run.records if "pre" in line}


def evaluate_record_line(model, record, variant: Variant, resolved, *, batch_size: int = 32, fluency=None,
                         pre: dict | None = None, key: str | None = None, progress: bool = False,
                         groups: Sequence[str] | None = None) -> dict:
    """One record's run line under a single edit: :func:`evaluate_lines` of ``[record]``
    (``pre``: the record's reused pre-edit scores, or None)."""
    reused = {} if pre is None else {json.dumps(record.case_id): pre}
    return evaluate_lines(model, [record], variant, resolved, batch_size=batch_size, fluency=fluency, pre=reused,
                          key=key, progress=progress, groups=groups)[0]


def evaluate_lines(model, records: Sequence, variant: Variant, resolved, *, score: Sequence[int] | None = None,
                   batch_size: int = 32, fluency=None, pre: dict | None = None, key: str | None = None,
                   batch: tuple[int, int] | None = None, on_line=None, progress: bool = False,
                   groups: Sequence[str] | None = None) -> list[dict]:
    """The run lines of ``records`` edited together: each scored pre-edit (or its scores taken from
    ``pre``, ``{case_id json: SCORES}``), then, for an editing variant, ONE edit of all their requests
    (``resolved`` = :meth:`Variant.resolve`) inside which each is scored post-edit (NKL and locality
    token accuracy compare with the pre-edit pass; with reused scores NKL's pre-edit distributions
    are read before the edit: one small forward); weights restored after.

    ``score``: positions of the records to write lines for (default all; the others are only
    edited, as in a resumed chunk). ``batch``: ``(B, chunk index)`` of a batch-edited run, which adds
    the lines' ``edit_batch`` and ``batch_edit_seconds``. ``on_line(line)`` is called as each line
    is done (inside the edit, for an editing variant). ``progress``: a bar over the edit's optimisation steps.
    ``groups``: the groups scored (default :data:`~attention_drift.measure.evaluate.BASE_GROUPS`;
    :func:`suite_groups` adds the distract suite)."""
    from attention_drift.measure.evaluate import evaluate_record, pre_edit_distributions

    score = range(len(records)) if score is None else score
    pre = pre or {}
    options = {"batch_size": batch_size, "fluency": fluency if fluency is not None else False, "groups": groups}
    lines, pre_scores, seconds = [], [], []
    for i in score:
        start = time.perf_counter()
        record = records[i]
        scores = reused = pre.get(json.dumps(record.case_id))
        if reused is None:
            scores = evaluate_record(model, record, **options)
            reused = scores.to_json()
        elif variant.edits:
            scores = pre_edit_distributions(model, record, reused, batch_size=batch_size)
        lines.append({"case_id": record.case_id, "kind": record.kind, "method": variant.method,
                      "model": model.model_name, "subject": record.rewrite.subject,
                      "target_new": record.rewrite.target_new, "target_true": record.rewrite.target_true,
                      "pre": reused, "edit_key": key, "edit_seconds": None})
        pre_scores.append(scores)
        seconds.append(time.perf_counter() - start)
    if not variant.edits:
        for line, s in zip(lines, seconds):
            line["eval_seconds"] = s
            if on_line is not None:
                on_line(line)
        return lines
    from attention_drift.editing import edit

    config, sadr = resolved
    with edit(model, [r.rewrite for r in records], method=variant.method, config=config, sadr=sadr,
              progress=progress) as result:
        share = float(result.seconds) / len(records)
        for i, line, scores, s in zip(score, lines, pre_scores, seconds):
            start = time.perf_counter()
            post = evaluate_record(model, records[i], **options, pre=scores)
            if sadr is not None:
                trace = result.sadr_records[i]
                line["sadr"] = {"loss": trace["loss"][-1] if trace else None, "steps": result.traces[i].steps_run,
                                "selected_heads": int(trace["mask"][-1].sum()) if trace.get("mask") else 0}
                if sadr.verify:
                    line["sadr"]["fallback"] = result.fallback
            line["post"] = post.to_json()
            line["edit_seconds"] = share
            if batch is not None:
                line["edit_batch"] = {"size": batch[0], "index": batch[1], "case_ids": [r.case_id for r in records]}
                line["batch_edit_seconds"] = float(result.seconds)
            line["eval_seconds"] = s + share + time.perf_counter() - start
            if on_line is not None:
                on_line(line)
    return lines


@dataclass(frozen=True)
class RunOutcome:
    """What :func:`evaluate_run` did."""

    path: Path
    written: int
    skipped: int


def evaluate_run(handle: ModelHandle, records: Sequence, variant: Variant, out: str | os.PathLike, meta: dict, *,
                 batch_size: int = 32, fluency=None, reuse_pre: str | os.PathLike | None = None,
                 progress: bool = True, edit_batch: int = 1, groups: Sequence[str] | None = None) -> RunOutcome:
    """Evaluate ``records`` under ``variant`` into the run file ``out`` (resuming it).

    ``meta`` is the header (:func:`run_meta`, with the same ``edit_batch``). The model is loaded
    only when a record is left to do. Lines already in the file must carry the same ``edit_key``
    as this run resolves to. ``edit_batch`` B > 1: consecutive chunks of B records, each edited as
    one update (:func:`evaluate_lines`; chunks are cut from the whole of ``records``, so they
    are the same when a run resumes). ``groups``: the groups scored (default: all but the
    distract suite; :func:`suite_groups` adds it), the same as ``meta``'s (:func:`run_meta`).
    """
    from attention_drift.core.jsonl import RunFile

    check_edit_batch(variant, edit_batch)
    if meta.get("edit_batch", 1) != edit_batch:
        raise RunError(f"meta has edit_batch {meta.get('edit_batch', 1)}, this run {edit_batch}; "
                       f"make meta with run_meta(..., edit_batch={edit_batch})", fields=("edit_batch",))
    if meta.get("groups") != _groups_meta(groups):
        raise RunError(f"meta has groups {meta.get('groups')}, this run {_groups_meta(groups)} (None: the default); "
                       "make meta with run_meta(..., groups=...) of the same groups", fields=("groups",))
    out = Path(out)
    check_writable(out)
    if batch_size < 1:
        raise RunError(f"batch_size must be >= 1, got {batch_size}", fields=("batch_size",))
    reused = reused_pre(reuse_pre, meta)
    chunks = [records[i: i + edit_batch] for i in range(0, len(records), edit_batch)]
    with RunFile(out, meta) as run:
        todo = [(index, chunk, [i for i, r in enumerate(chunk) if not run.done(r.case_id, variant.method)])
                for index, chunk in enumerate(chunks)]
        todo = [t for t in todo if t[2]]
        written = sum(len(score) for _, _, score in todo)
        if todo:
            model = handle.get()
            resolved = variant.resolve(model)
            key = edit_key(model, variant, resolved)
            check_edit_key(out, key)
            from tqdm.auto import tqdm

            bar = tqdm(total=written, desc=f"evaluate {variant.name}", unit="record", file=sys.stderr,
                       disable=not progress, dynamic_ncols=True)

            def write(line: dict) -> None:
                run.write(line)
                bar.update(1)

            with bar:
                for index, chunk, score in todo:
                    evaluate_lines(model, chunk, variant, resolved, score=score, batch_size=batch_size,
                                   fluency=fluency, pre=reused, key=key,
                                   batch=(edit_batch, index) if edit_batch > 1 else None, on_line=write,
                                   progress=progress, groups=groups)
    return RunOutcome(out, written, len(records) - written)


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

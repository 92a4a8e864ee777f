"""The run layer of drift and patching: record by record into resumable run files, then the reports.

:func:`run_drift` (the paper's RQ3) and :func:`run_patch` (RQ4 and RQ2) edit every record on its
own (single-edit protocol: the weights are restored after each record), measure it with the one
per-record function the notebooks use too (:func:`attention_drift.measure.drift.drift_record`,
:func:`attention_drift.measure.patch_record.patch_record`), write its line to a run file in the output
folder as soon as the record is done (re-running with the same folder skips the records already
there), then rebuild the whole report from that file (:mod:`attention_drift.reports.drift`,
:mod:`attention_drift.reports.patch`), write ``drift.json`` / ``patch.json`` and the figures
(:mod:`attention_drift.views.report_figures`), and return the report with its markdown.
:func:`dataset_drift` is the same drift measurement and report in memory, without files.
No measurement and no statistics happen here: this module is placement, resume and IO.

Run-file lines are :meth:`attention_drift.measure.drift.RecordDrift.to_line` and
:meth:`attention_drift.measure.patch_record.RecordPatch.to_line` plus ``"method"`` (a record without
prompts: ``{"case_id", "kind", "samples" or "cases": [], "skipped": "no prompts", "method"}``).
"""

import functools
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from attention_drift.core.data import Record
from attention_drift.core.jsonl import RunFile, read_run
from attention_drift.measure.drift import (
    DEFAULT_GROUPS,
    DriftError,
    EditFactory,
    HeadCapture,
    check_groups,
    drift_record,
)
from attention_drift.measure.patching import PatchingError
from attention_drift.measure.patch_record import RANDOM_DRAWS, patch_record
from attention_drift.reports.drift import DRIFT_FORMAT, DriftReport, drift_from_lines, drift_markdown, drift_report
from attention_drift.reports.patch import PATCH_FORMAT, PatchReport, patch_markdown
from attention_drift.runs.variants import Variant
from attention_drift.views.plots import png_ok
from attention_drift.views.report_figures import drift_figures, patch_figures

DRIFT_GROUPS = DEFAULT_GROUPS
CAPTURE_TOP_K = 6
"""Heads per record whose full patterns a drift run keeps for the explorer: the record's own
most drifting ones (6 keeps a 100-record page near 3-4 MB)."""


def _progress(items, desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="record", file=sys.stderr, dynamic_ncols=True, total=total)


def _measured(records: Sequence[Record], fn, model, edit_fn_factory, executor, edit_cache, desc: str,
              progress: bool):
    """``(record, fn(model, edit_fn_factory, record))`` per record, on ``executor``
    (:class:`attention_drift.runs.executor.Executor`; None: this process, with ``model``), in the
    order records finish; see :func:`run_drift`."""
    from attention_drift.runs.executor import Executor

    if executor is None:
        executor = Executor.here(model)
    results = executor.measure(records, fn, edit_fn_factory, edit_cache=edit_cache, progress=progress)
    if not executor.in_process:
        desc = f"{desc} ({executor.placement.workers} workers)"
    return _progress(results, desc, progress, total=len(records))


def _lines_of(run_path: Path, records: Sequence[Record]) -> list[dict]:
    """The run file's lines of ``records`` (a run file may hold more records than asked for)."""
    wanted = {json.dumps(r.case_id) for r in records}
    return [line for line in read_run(run_path).records if json.dumps(line["case_id"]) in wanted]


# =============================================================================================
# drift


def _prompt_patterns(model, record: Record, capture: HeadCapture) -> dict[int, dict]:
    """A record's captured patterns in the explorer's schema (:class:`attention_drift.views.explorer.PromptPatterns`)."""
    from attention_drift.core.regions import Regions

    out = {}
    for i, prompt in enumerate(capture.prompts):
        subject = Regions.of(model, record.rewrite, prompt).subject
        out[i] = {"tokens": capture.tokens[i], "query": len(capture.tokens[i]) - 1, "subject_last": subject[1],
                  "heads": {head: (capture.before[i][j].float().numpy(), capture.after[i][j].float().numpy())
                            for j, head in enumerate(capture.heads)}}
    return out


def _drift_lines(model, edit_fn_factory: EditFactory, record: Record, *, groups: Sequence[str], capture_heads,
                 method: str) -> tuple[dict, dict | None]:
    """A record's drift run line and its explorer patterns line (None without prompts)."""
    from attention_drift.views import explorer

    result = drift_record(model, record, edit_fn_factory, groups, capture_heads=capture_heads)
    if result is None:
        return {"case_id": record.case_id, "kind": record.kind, "samples": [], "skipped": "no prompts",
                "method": method}, None
    patterns = explorer.patterns_line(record.case_id, _prompt_patterns(model, record, result.capture), method)
    return {**result.to_line(), "method": method}, patterns


def run_drift(model, records: Sequence[Record], edit_fn_factory: EditFactory | Variant | None, out_dir, meta: dict, *,
              groups: Sequence[str] = DRIFT_GROUPS, top_k: int = 10, method: str = "edit",
              progress: bool = False, figures: bool = True,
              capture_heads: Sequence[tuple[int, int]] | int | str = CAPTURE_TOP_K, executor=None,
              edit_cache: str | None = None) -> dict:
    """Measure drift record by record (:func:`~attention_drift.measure.drift.drift_record`, resumable in
    ``out_dir/drift_records.jsonl``), then write ``drift.json``, the figures and the drift
    explorer (``explorer.html``); returns the ``drift.json`` content plus ``"markdown"`` (and
    ``"figures"``).

    ``capture_heads`` (see :func:`~attention_drift.measure.drift.drift_record`; default: each record's
    :data:`CAPTURE_TOP_K` most drifting heads) picks the heads whose full attention patterns
    before / inside the edit are kept, from the measurement's own forward passes, in
    ``out_dir/drift_patterns.jsonl`` for the explorer's per-head panels.

    Where the records are measured: ``executor`` (an :class:`attention_drift.runs.executor.Executor`:
    this process or Ray workers, as its placement says), whose workers load the model themselves
    (``model`` is then not used; None is fine) and build the editor of ``edit_fn_factory``, then a
    :class:`~attention_drift.runs.variants.Variant` (replaying stored edits from the ``edit_cache``
    folder), after computing its statistics once; None: in this process with ``model`` and
    ``edit_fn_factory`` (a Variant, or an editor already built over ``model``). The lines are the
    same either way, written here (the only writer) in the order records finish.
    """
    from attention_drift.views import explorer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_path = out / explorer.RUN_FILE
    meta = {"format": DRIFT_FORMAT, **meta, "groups": list(groups)}
    capture_meta = capture_heads if isinstance(capture_heads, (int, str)) else [list(h) for h in capture_heads]
    with RunFile(run_path, meta) as run, \
            RunFile(out / explorer.PATTERNS_FILE, {**meta, "format": explorer.PATTERNS_FORMAT,
                                                   "capture_heads": capture_meta}) as patterns:
        todo = [r for r in records if not run.done(r.case_id, method)]
        fn = functools.partial(_drift_lines, groups=tuple(groups), capture_heads=capture_heads, method=method)
        for record, (line, pattern_line) in _measured(todo, fn, model, edit_fn_factory, executor, edit_cache,
                                                      "drift", progress):
            if pattern_line is not None and not patterns.done(record.case_id, method):
                patterns.write(pattern_line)
            run.write(line)
    result = drift_from_lines(_lines_of(run_path, records), groups, top_k=top_k)
    result["meta"] = meta
    (out / "drift.json").write_text(json.dumps(result, indent=1))
    if figures:
        result["figures"] = drift_figures(result, out, png_ok())
        page = explorer.ExplorerData.from_run(out, title=f"Attention drift · {meta.get('model')} · {method}")
        result["figures"].append(str(explorer.write_explorer(out / "explorer.html", page)))
    result["markdown"] = drift_markdown(result, f"{meta.get('model')} · {method}")
    return result


# =============================================================================================
# patch


def load_top_heads(path, k: int) -> list[tuple[int, int]]:
    """The first ``k`` top heads of a ``drift.json`` written by :func:`run_drift`."""
    data = json.loads(Path(path).read_text())
    if "top_heads" not in data:
        raise DriftError(f"{path} has no 'top_heads'; give a drift.json written by 'attention-drift drift'")
    heads = [(t["layer"], t["head"]) for t in data["top_heads"]][:k]
    if len(heads) < k:
        print(f"attention-drift: {path} lists {len(heads)} heads, fewer than k={k}", file=sys.stderr)
    return heads


def _patch_line(model, edit_fn_factory: EditFactory, record: Record, *, method: str, **options) -> dict:
    """A record's patching run line (:func:`~attention_drift.measure.patch_record.patch_record` with ``options``)."""
    result = patch_record(model, record, edit_fn_factory, **options)
    line = ({"case_id": record.case_id, "kind": record.kind, "cases": [], "skipped": "no prompts"}
            if result is None else result.to_line())
    return {**line, "method": method}


def run_patch(model, records: Sequence[Record], edit_fn_factory: EditFactory | Variant | None, out_dir, meta: dict, *,
              k: int = 10, heads: Sequence[tuple[int, int]] | None = None, window: int = 10,
              sweep_prompts: int = 1, contamination_prompts: int = 1, contamination_window: int = 6,
              contamination_positions: str = "key", batch_size: int = 64, method: str = "edit",
              progress: bool = False, figures: bool = True, random_draws: int = RANDOM_DRAWS, executor=None,
              edit_cache: str | None = None) -> dict:
    """Patch record by record (:func:`~attention_drift.measure.patch_record.patch_record`, resumable in
    ``out_dir/patch_records.jsonl``), then write ``patch.json`` and the figures; returns the
    ``patch.json`` content plus ``"markdown"`` (and ``"figures"``). ``random_draws``: draws of
    the random-heads control of the top-k heads patch (0: none). ``executor``, ``edit_cache``: as in
    :func:`run_drift`."""
    if k < 1:
        raise PatchingError(f"k must be >= 1, got {k}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_path = out / "patch_records.jsonl"
    meta = {"format": PATCH_FORMAT, **meta, "k": k, "heads": None if heads is None else [list(h) for h in heads],
            "window": window, "sweep_prompts": sweep_prompts, "contamination_prompts": contamination_prompts,
            "contamination_window": contamination_window, "contamination_positions": contamination_positions,
            "random_draws": random_draws}
    with RunFile(run_path, meta) as run:
        todo = [r for r in records if not run.done(r.case_id, method)]
        fn = functools.partial(_patch_line, method=method, k=k, heads=heads, window=window,
                               sweep_prompts=sweep_prompts, contamination_prompts=contamination_prompts,
                               contamination_window=contamination_window,
                               contamination_positions=contamination_positions, batch_size=batch_size,
                               random_draws=random_draws)
        for _, line in _measured(todo, fn, model, edit_fn_factory, executor, edit_cache, "patch", progress):
            run.write(line)
    result = PatchReport.from_lines(_lines_of(run_path, records)).to_dict()
    if "contamination" in result:
        result["contamination"]["window"] = contamination_window
    result["meta"] = meta
    (out / "patch.json").write_text(json.dumps(result, indent=1))
    if figures:
        result["figures"] = patch_figures(result, out, png_ok())
    result["markdown"] = patch_markdown(result, f"{meta.get('model')} · {method}")
    return result


def dataset_drift(
    model,
    records: Iterable[Record],
    edit_fn_factory: EditFactory,
    groups: Sequence[str] = DEFAULT_GROUPS,
    *,
    threshold: float = 0.05,
    levels: tuple[float, ...] = (0.1, 0.5, 0.9),
    n_bins: int = 5,
    progress: bool = False,
) -> DriftReport:
    """:func:`~attention_drift.measure.drift.drift_record` on every record, then
    :func:`~attention_drift.reports.drift.drift_report`: drift of every head on
    each record's prompts of ``groups`` and its link to failure, in memory (the ``attention-drift
    drift`` command runs the same two functions through a resumable run file).

    ``edit_fn_factory(record)`` returns the context manager that applies the record's edit (e.g.
    ``lambda r: edit(model, r.rewrite, method="rome")``); each record is edited once. Records
    without prompts containing the edited subject (plain neighbourhood prompts) are skipped
    without editing.
    """
    check_groups(groups)
    records = list(records)
    if progress:
        from tqdm.auto import tqdm

        records = tqdm(records, desc="drift")
    measured = [drift_record(model, record, edit_fn_factory, groups) for record in records]
    if not any(m is not None for m in measured):
        raise DriftError(f"no record has prompts containing its subject in groups {tuple(groups)}")
    return drift_report([m for m in measured if m is not None], groups, threshold=threshold, levels=levels,
                        n_bins=n_bins)


def drift_pair(
    model_before,
    model_after,
    records: Iterable[Record],
    groups: Sequence[str] = DEFAULT_GROUPS,
    *,
    allow_other_base: bool = False,
    **report_options,
) -> DriftReport:
    """Per-head drift between two models of the same architecture on the same prompts: the
    :class:`~attention_drift.reports.drift.DriftReport` an in-process edit gives, with
    ``model_after`` in the role of the edit.

    ``model_after`` is a model (bridge or Hugging Face) or any source of
    :func:`~attention_drift.editing.external.load_edited` (a Hugging Face folder, a saved edit, a
    PEFT adapter). Its changed tensors become a :class:`~attention_drift.editing.external.WeightSwap`
    over ``model_before``, the edit factory of :func:`dataset_drift`: every record goes through
    :func:`~attention_drift.measure.drift.drift_record` exactly as an in-process edit does, the
    weights swapped in for the edited pass and restored bitwise after. ``report_options`` as in
    :func:`dataset_drift` (``threshold``, ``levels``, ``n_bins``, ``progress``). ``run_drift(model,
    records, load_edited(model, source), ...)`` writes the same report as ``drift.json``.
    """
    from attention_drift.editing.external import load_edited

    swap = load_edited(model_before, model_after, allow_other_base=allow_other_base)
    return dataset_drift(model_before, records, swap, groups, **report_options)

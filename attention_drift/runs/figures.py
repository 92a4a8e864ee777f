"""``attention-drift figures``: the paper's seven analyses, from one resumable command.

Items (``ITEMS``) and where their numbers come from:

1. ``case_study`` -- one edit and one distract prompt: predictions before, after, and after
   with every attention pattern restored, plus the prediction row of the most drifting heads
   (:mod:`attention_drift.measure.case_study`). The prompt is picked from the drift run by the stated
   rule :data:`CASE_RULE` (:func:`pick_case`, from ``drift.json``'s samples), among the prompts
   the model got right before the edit whose true answer does not occur in the prompt.
2. ``prevalence`` (RQ1) -- neighbourhood vs distract neighbourhood and relation vs distract
   relation accuracy, pre-edit and after ROME, MEMIT and PMET (evaluation runs).
3. ``contamination`` (RQ2) -- the pre-edit model with the edited model's MLP / attention
   outputs substituted over 6-layer windows at key positions, and the converse restoration
   per layer and module (``attention-drift patch``).
4. ``drift`` (RQ3) -- per-head drift onto the edited subject and its link to failure
   (``attention-drift drift``).
5. ``patching`` (RQ4) -- accuracy recovered by restoring all / the top-k drifting heads'
   attention patterns (``attention-drift patch``).
6. ``main_table`` -- every editor with and without SADR, every metric with 95% CIs.
7. ``ablations`` -- hinge vs all-heads selection, distract rows, SADR layer range, and the
   trade-off of efficacy / paraphrase vs distract neighbourhood as the SADR weight grows.

Evaluation runs are ``attention-drift evaluate`` run files named after :func:`variants`
(``<variant>.jsonl``): taken from ``runs`` when that folder has them (e.g. a GPU grid made with
``benchmarks/eval_grid.py``), otherwise computed into ``OUT/runs`` on the first ``limit``
records (balanced). Drift and patching use the first ``drift_limit`` / ``patch_limit``
records that have distract prompts, balanced between the kinds (distract-neighbourhood prompts
come from CounterFact-type records, distract-relation prompts from WikiData-type ones). Every stage writes
resumable run files, so an interrupted command continues where it stopped; with
``reuse_reports`` (``--reuse-reports``) the drift and patching items are built from the
``drift.json`` / ``patch.json`` already in ``OUT`` instead (their run files are not needed). The result is
``OUT/figures.md`` and ``OUT/figures.json`` (every number behind every figure, the file list,
and per item ``"n"``: the records and prompts behind each figure) next to the figures (HTML
that opens offline, and PNG when a browser for kaleido is there). Every figure's title gives
its n, and its intervals are drawn (error bars, bands, or the hover of heatmaps).
"""

import dataclasses
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from attention_drift.core.errors import AttentionDriftError
from attention_drift.reports.case_pick import CASE_RULE, CASE_TIERS, pick_case  # noqa: F401 (the gallery's rule)
from attention_drift.runs.figure_tables import ABLATION_FAMILIES, ablations, main_table, prevalence

ITEMS = ("case_study", "prevalence", "contamination", "drift", "patching", "main_table", "ablations")


def variants():
    """The evaluation variants (:func:`attention_drift.runs.variants.paper_variants`): name -> Variant."""
    from attention_drift.runs.variants import paper_variants

    return paper_variants()


class FiguresError(AttentionDriftError):
    """A figures request that cannot run; the message says what to change."""


@dataclass(frozen=True)
class FiguresConfig:
    """What ``attention-drift figures`` regenerates (the model, and where the work runs: the
    :class:`~attention_drift.runs.placement.Placement` given to :func:`run_figures`).

    Args:
        data: CounterFact-style JSON file, or ``"dev"`` (None: the packaged 8-record example).
        out: output folder (figures, ``figures.md``, ``figures.json``, run files).
        limit: records (balanced between the two kinds) for evaluation runs computed here.
        drift_limit: records with distract prompts (balanced) of the drift analysis (items 1 and 4).
        patch_limit: records with distract prompts (balanced) of the patching analysis (items 3 and 5).
        runs: folder of existing evaluation run files ``<variant>.jsonl`` to use as they are
            (several, comma-separated: the first that has a variant's file gives it).
        items: which of :data:`ITEMS` to make.
        variants: evaluation variants to use (names of :func:`variants`; default: all but ``none``).
        stats_samples: covariance statistics sample count (None: the model preset's).
        progress: progress bars on stderr.
        reuse_reports: build the drift, contamination, patching and case-study items from
            ``OUT/drift/drift.json`` and ``OUT/patch/patch.json`` as they are (markdown and figures
            redrawn, ``explorer.html`` kept) instead of measuring; they must exist and their run must
            match the model, data, limits and edit asked for (:func:`reused_report`).
    """

    data: str | None = None
    out: str = "figures"
    limit: int = 4
    drift_limit: int = 10
    patch_limit: int = 4
    runs: str | None = None
    items: tuple[str, ...] = ITEMS
    variants: tuple[str, ...] | None = None
    stats_samples: int | None = None
    progress: bool = True
    reuse_reports: bool = False

    def __post_init__(self):
        bad = [i for i in self.items if i not in ITEMS]
        if bad:
            raise FiguresError(f"unknown items {bad}; choose from {', '.join(ITEMS)}")
        table = variants()
        if self.variants is None:
            object.__setattr__(self, "variants", tuple(v for v in table if v != "none"))
        bad = [v for v in self.variants if v not in table]
        if bad:
            raise FiguresError(f"unknown variants {bad}; choose from {', '.join(table)}")
        for name in ("limit", "drift_limit", "patch_limit"):
            if getattr(self, name) < 1:
                raise FiguresError(f"{name} must be >= 1, got {getattr(self, name)}", fields=(name,))
        missing = [f for f in self.run_folders if not Path(f).is_dir()]
        if missing:
            raise FiguresError(f"runs {missing[0]!r} is not a folder of run files", fields=("runs",))

    def variant(self, name: str):
        """The named variant with this configuration's statistics sample count."""
        from attention_drift.runs.variants import with_stats_samples

        return with_stats_samples(variants()[name], self.stats_samples)

    @property
    def run_folders(self) -> list[str]:
        """The ``runs`` folders (comma-separated), in the order they are searched."""
        return [f for f in (self.runs or "").split(",") if f]

    def to_json(self, placement) -> dict:
        """``figures.json``'s ``"config"``: these settings with the placement's model, device,
        dtype, workers and address, in the order the file has always had them."""
        own = dataclasses.asdict(self)
        first = ("data", "out", "limit", "drift_limit", "patch_limit", "runs", "items", "variants", "stats_samples")
        return {"model": placement.model, **{k: own.pop(k) for k in first}, "device": placement.device,
                "dtype": placement.dtype, "progress": own.pop("progress"), "workers": placement.workers,
                "address": placement.address, **own}


def evaluation_runs(cfg: FiguresConfig, names: Sequence[str], executor) -> dict[str, Path]:
    """``{variant: run file}``: from the first ``cfg.runs`` folder that has it, else evaluated here
    by one sweep on ``executor`` (:func:`attention_drift.runs.sweep.run_sweep`, pre-edit scores
    shared through ``none``)."""
    from attention_drift.measure.evaluate import FluencyConfig
    from attention_drift.runs.evaluation import RecordSelection
    from attention_drift.runs.sweep import SweepConfig, run_sweep

    out = Path(cfg.out) / "runs"
    found: dict[str, Path] = {}
    todo = []
    for name in names:
        given = [Path(f) / f"{name}.jsonl" for f in cfg.run_folders if (Path(f) / f"{name}.jsonl").is_file()]
        if given:
            found[name] = given[0]
        else:
            todo.append(name)
    if todo:
        selection = RecordSelection(cfg.data, limit=cfg.limit, balanced=True)
        chosen = ["none", *[n for n in todo if n != "none"]]
        run_sweep(SweepConfig(tuple(cfg.variant(n) for n in chosen), out, selection, fluency=FluencyConfig(),
                              progress=cfg.progress), executor)
        found.update({n: out / f"{n}.jsonl" for n in chosen if n in todo})
    return found


def _analysis(cfg: FiguresConfig, executor, kind: str, limit: int, folder: Path) -> None:
    """ROME drift or patching (:func:`attention_drift.runs.analysis.run_drift` / ``run_patch``) on
    ``executor``, on the first ``limit`` records that have distract prompts, half of each kind
    (so both distract neighbourhood and distract relation are measured), resumable in
    ``folder``. Patching restores each record's own top-10 drifting heads (so it does not wait
    for the drift run)."""
    from attention_drift.runs import analysis
    from attention_drift.runs.evaluation import RecordSelection

    selection = RecordSelection(cfg.data, limit=limit, balanced=True, with_distract=True)
    variant = cfg.variant("rome")
    meta = {"model": executor.placement.model, "data": selection.label, "edit": variant.meta()}
    common = {"method": variant.name, "progress": cfg.progress, "figures": True, "executor": executor}
    if kind == "drift":
        analysis.run_drift(None, selection.load(), variant, folder, meta, **common)
        return
    analysis.run_patch(None, selection.load(), variant, folder, meta, k=10, **common)


def reused_report(cfg: FiguresConfig, model: str, kind: str) -> dict:
    """``OUT/<kind>/<kind>.json`` (``kind``: ``"drift"`` or ``"patch"``) for ``reuse_reports``,
    after checking that its run is the one :func:`_analysis` would make here: the same model,
    data, edit and records (the first ``drift_limit`` / ``patch_limit`` with distract prompts).
    Raises :class:`FiguresError` saying what differs, or that the file is missing."""
    from attention_drift.runs.evaluation import RecordSelection

    path = Path(cfg.out) / kind / f"{kind}.json"
    if not path.is_file():
        raise FiguresError(f"reuse_reports needs {path}, which is missing; copy the committed report there or "
                           "leave reuse_reports off to measure it", fields=("reuse_reports",))
    content = json.loads(path.read_text())
    meta = content.get("meta") or {}
    name = "drift_limit" if kind == "drift" else "patch_limit"
    selection = RecordSelection(cfg.data, limit=getattr(cfg, name), balanced=True, with_distract=True)
    asked = {"model": model, "data": selection.label, "edit": json.loads(json.dumps(cfg.variant("rome").meta()))}
    wrong = [f"{k} {meta.get(k)!r} (asked: {v!r})" for k, v in asked.items() if meta.get(k) != v]
    expected = {json.dumps(r.case_id) for r in selection.load()}
    if kind == "drift":
        ids = {json.dumps(s["case_id"]) for s in content.get("samples", [])}
    else:
        ids = set(content.get("top_heads", {}))
    if ids - expected or content.get("records") != len(expected):
        wrong.append(f"records: {content.get('records')} ({len(ids - expected)} not among the asked ones), asked "
                     f"{len(expected)} ({name} {getattr(cfg, name)})")
    if wrong:
        raise FiguresError(f"reuse_reports: {path} was made for another request: " + "; ".join(wrong),
                           fields=("reuse_reports", name))
    return content


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _edited_case(prompt: str, target_true: str, variant, worker, record):
    """The case study of ``record`` on ``prompt`` (edited by ``variant``'s configuration), on a worker."""
    from attention_drift.measure.case_study import case_study

    model = worker.model
    return case_study(model, record.rewrite, prompt, target_true, method=variant.method, config=variant.config(model))


def _case_study(cfg: FiguresConfig, executor, out: Path, png: bool, drift: dict) -> dict:
    from attention_drift.views import plots, viz
    from attention_drift.measure.case_study import STATE_NAMES, CaseStudy
    from attention_drift.views.case_study import case_study_figure, case_study_view
    from attention_drift.runs.evaluation import RecordSelection

    sample = pick_case(drift) if drift.get("samples") else None
    if sample is None:
        return {}
    records = RecordSelection(cfg.data).load()
    record = next((r for r in records if json.dumps(r.case_id) == json.dumps(sample["case_id"])), None)
    if record is None:
        raise FiguresError(f"case_id {sample['case_id']!r} of the drift run is not in {cfg.data}")
    saved = out / "case_study.json"
    old = _read_json(saved)
    if old.get("prompt") == sample["prompt"] and old.get("request", {}).get("subject") == record.rewrite.subject:
        cs = CaseStudy.from_json(old)
    else:
        case = functools.partial(_edited_case, sample["prompt"], sample["target_true"], cfg.variant("rome"))
        [(_, cs)] = executor.map([record], case)
        saved.write_text(json.dumps(cs.to_json()))
    pick = sample["pick"]
    title = (f"Case study: {record.rewrite.subject} → {cs.new_target.strip()} (rome) · 1 record, 1 prompt, "
             f"picked by rule: {pick['tier']} (largest log-odds drop of {pick['candidates']})")
    files = plots.save_figure(case_study_figure(cs, title=title), out / "case_study", png)
    files.append(str(viz.save_html(case_study_view(cs), out / "case_study_heads.html")))
    numbers = {k: v for k, v in cs.to_json().items() if k not in ("rows_before", "rows_after")}
    numbers["pick"] = pick
    md = "| state | top-1 | P(true) | P(new) |\n|---|---|---|---|\n" + "\n".join(
        f"| {STATE_NAMES[state]} | {p['top_token']!r} | {p['p_true']:.3f} | {p['p_new']:.3f} |"
        for state, p in numbers["predictions"].items())
    top = cs.restored.top_token.strip()
    back = bool(top) and sample["target_true"].strip().startswith(top)
    md += (f"\n\nRestoring every attention pattern to its pre-edit value {'brings' if back else 'does not bring'} the "
           f"true answer (its first token) back to top-1 (top-1 {cs.restored.top_token!r}, P(true) {cs.restored.p_true:.3f} vs "
           f"P(new) {cs.restored.p_new:.3f}).")
    heads = ", ".join(f"L{h['layer']}H{h['head']} {h['before']:.3f}→{h['after']:.3f}" for h in numbers["top_heads"])
    md = (f"Chosen by rule: {pick['rule']}. Tier used: {pick['tier']} ({pick['candidates']} candidates; "
          f"{pick['right_before']} of {pick['prompts']} distract-neighbourhood prompts of the drift run were right "
          f"before the edit and eligible, {pick['answer_in_prompt']} excluded for holding their true answer).\n\n"
          f"Edit: {record.rewrite.edit_sentence!r} (was {record.rewrite.target_true!r}); "
          f"prompt {sample['prompt']!r}, true {sample['target_true']!r}.\n\n{md}\n\n"
          f"Attention of the prediction position to the subject's last token, top heads: {heads}")
    return {"numbers": numbers, "markdown": md, "files": files, "n": {"case_study": {"records": 1, "prompts": 1}}}


def run_figures(cfg: FiguresConfig, where) -> dict:
    """Make the requested items with the model and on the workers of ``where`` (a
    :class:`~attention_drift.runs.placement.Placement` or an
    :class:`~attention_drift.runs.executor.Executor`: evaluation runs, drift, patching and the
    case study all run on it); returns (and writes to ``OUT/figures.json``) their numbers,
    markdown and files, and writes ``OUT/figures.md``. With ``cfg.reuse_reports`` the drift and
    patch reports are read (:func:`reused_report`) and redrawn, not measured; the case study
    still runs its one edit unless ``OUT/case_study.json`` holds the picked prompt."""
    from attention_drift.reports.drift import drift_markdown
    from attention_drift.reports.patch import patch_markdown
    from attention_drift.runs.executor import as_executor
    from attention_drift.views.plots import png_ok
    from attention_drift.views.report_figures import drift_figures, patch_figures

    executor = as_executor(where)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    png = png_ok()
    items = set(cfg.items)
    previous = _read_json(out / "figures.json")
    result: dict = {"config": cfg.to_json(executor.placement),
                    "items": {k: v for k, v in previous.get("items", {}).items() if k in ITEMS and k not in items}}
    if items & {"prevalence", "main_table", "ablations"}:
        runs = evaluation_runs(cfg, list(cfg.variants), executor)
        result["runs"] = {n: str(p) for n, p in runs.items()}
        for item, make in (("prevalence", prevalence), ("main_table", main_table), ("ablations", ablations)):
            if item in items:
                result["items"][item] = make(runs, out, png)
    model = executor.placement.model
    drift: dict = {}
    if items & {"drift", "case_study", "contamination", "patching"}:
        if cfg.reuse_reports:
            drift = reused_report(cfg, model, "drift")
            drift_figures(drift, out / "drift", png)
        else:
            _analysis(cfg, executor, "drift", cfg.drift_limit, out / "drift")
            drift = _read_json(out / "drift" / "drift.json")
        result["items"]["drift"] = {
            "numbers": {k: drift.get(k) for k in ("records", "n_samples", "n_samples_by_group", "records_by_group",
                                                  "definitions", "failure", "wrong_after_rate", "top_heads",
                                                  "headline_right_before", "auroc_right_before") if k in drift},
            "markdown": drift_markdown(drift) if drift else "",
            "files": sorted(str(p) for p in (out / "drift").iterdir() if p.suffix in (".html", ".png")),
            "n": _drift_sizes(drift)}
    if items & {"contamination", "patching"}:
        if cfg.reuse_reports:
            patch = reused_report(cfg, model, "patch")
            patch_figures(patch, out / "patch", png)
        else:
            _analysis(cfg, executor, "patch", cfg.patch_limit, out / "patch")
            patch = _read_json(out / "patch" / "patch.json")
        files = sorted(str(p) for p in (out / "patch").iterdir() if p.suffix in (".html", ".png"))
        md = patch_markdown(patch) if patch else ""
        sizes = _patch_sizes(patch)
        if "contamination" in items:
            at = md.find("\n\nContamination")  # the last section: its paragraphs to the end
            windows = [p for p in md.split("\n\n") if p.startswith("10-layer")]
            result["items"]["contamination"] = {
                "numbers": {k: patch.get(k) for k in ("contamination", "sweep", "windows") if k in patch},
                "markdown": "\n\n".join(windows + ([md[at + 2:]] if at >= 0 else [])),
                "files": [f for f in files if any(k in f for k in ("contamination", "layer_component", "windows"))],
                "n": {k: v for k, v in sizes.items() if k != "patch_accuracy"}}
        if "patching" in items:
            result["items"]["patching"] = {
                "numbers": {k: patch.get(k) for k in ("records", "n_prompts", "pre", "post", "variants",
                                                      "topk_vs_random", "top_heads", "random_heads") if k in patch},
                "markdown": md, "files": [f for f in files if "accuracy" in f],
                "n": {k: v for k, v in sizes.items() if k == "patch_accuracy"}}
    if "case_study" in items:
        result["items"]["case_study"] = _case_study(cfg, executor, out, png, drift)
    (out / "figures.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "figures.md").write_text(figures_markdown(result))
    return result


def _drift_sizes(drift: dict) -> dict:
    """Records and prompts behind the drift figures (the failure figure: prompts right before the edit)."""
    if not drift:
        return {}
    f = drift["failure"]["all"]
    return {"drift_heatmap": {"records": drift["records"], "prompts": drift["n_samples"]},
            "drift_vs_failure": {"records": f["n_records_kept"], "prompts": f["n_kept"],
                                 "prompts_excluded_wrong_before": f["n_excluded_wrong_before"]}}


def _patch_sizes(patch: dict) -> dict:
    """Records and prompts behind each patching figure."""
    if not patch:
        return {}
    out = {"patch_accuracy": {"records": patch["records"], "prompts": patch["n_prompts"]}}
    for key, name in (("sweep", "patch_layer_component"), ("windows", "patch_windows")):
        if key in patch:
            out[name] = {"records": patch[key].get("n_records"), "prompts": patch[key]["n_prompts"]}
    damage = patch.get("contamination", {}).get("damage")
    if damage:
        out["patch_contamination"] = {"records": damage["n_records"], "prompts": damage["n_prompts"]}
    return out


def _sizes_markdown(sizes: dict) -> str:
    """``"n per figure: ..."`` of the sizes with plain counts; "" when there are none."""
    parts = [f"{name}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in n.items() if not isinstance(v, dict))
             for name, n in sizes.items() if any(not isinstance(v, dict) for v in n.values())]
    return "n per figure: " + "; ".join(parts) if parts else ""


def figures_markdown(result: dict) -> str:
    """The numbers file: one section per item with its tables and the files of it that exist (paths as
    written, relative to where the command ran; plotly pages load ``plotly.min.js`` from their folder)."""
    parts = ["# attention-drift figures", "", f"Configuration: `{json.dumps(result['config'])}`", ""]
    for item in ITEMS:
        entry = result["items"].get(item)
        if not entry:
            continue
        parts += [f"## {ITEMS.index(item) + 1}. {item.replace('_', ' ')}", ""]
        for key in ("markdown",):
            if entry.get(key):
                parts += [entry[key], ""]
        for key in ("shared", "weight", *ABLATION_FAMILIES):
            if isinstance(entry.get(key), dict) and entry[key].get("markdown"):
                parts += [f"**{key}**", "", entry[key]["markdown"], ""]
        sizes = _sizes_markdown(entry.get("n") or {})
        if sizes:
            parts += [sizes, ""]
        files = [f for f in entry.get("files") or [] if Path(f).is_file()]
        if files:
            parts += ["Files: " + ", ".join(f"`{f}`" for f in files), ""]
    return "\n".join(parts)

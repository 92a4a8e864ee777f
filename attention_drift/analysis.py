"""Data-set analyses behind the ``attention-drift drift`` and ``attention-drift patch`` commands.

Both edit every record on its own (single-edit protocol: the weights are restored after each
record), write one JSON line per record to a run file in the output folder as soon as the
record is done (re-running with the same folder skips the records already there), then
rebuild the whole result from that file, write ``drift.json`` / ``patch.json`` and the figures,
and return a short markdown summary.

:func:`run_drift` (RQ3 of the paper): attention drift of every head at the prediction position
on the distract-neighbourhood and distract-relation prompts (:func:`attention_drift.drift.measure_drift`),
per-head statistics, the top drifting heads with their attention to the edited subject's last
token before -> after the edit, and how drift predicts specificity failure (Pearson / Spearman
with 95% CIs, AUROC, binned failure curves).

:func:`run_patch` (RQ4 and RQ2): on each record's distract-neighbourhood prompts, the unedited
model's activations are patched into the edited model (*restoration*). Variants:

* ``attn_pattern_all`` (a): attention patterns of every layer and head, every query position;
* ``attn_pattern_topk`` (b): only the patterns of the k heads whose attention from the last
  token to the edited subject's last token grew most (ranked on the record's own prompts, or
  taken from a ``drift.json``);
* ``attn_out_all``: attention outputs of every layer at every position;
* ``mlp_out_all`` (c): MLP outputs of every layer at every position (a check: ROME / MEMIT /
  PMET change MLP weights only, so this is the unedited run and recovers 100%);
* ``mlp_out_last``: MLP outputs of every layer at the last token only;
* ``resid_subject`` (d): the residual stream (``hook_resid_post`` of every layer) at the edited
  subject's last token inside the edit sentence, i.e. what the edit wrote where ROME writes;
  the last token's own residual is not offered as a summary variant because restoring it at the
  last layer is the unedited output by construction (the sweep shows it layer by layer);

plus two sweeps on the first ``sweep_prompts`` prompts of each record: layer x component
(per layer alone: attention pattern, attention output, MLP output at every position, and the
residual stream entering the layer at the last token) and the paper's sliding windows of 10
layers of attention patterns; and the reverse *contamination* (the unedited model with the
edited model's MLP or attention outputs over windows of 6 layers at one position; on the
first ``contamination_prompts`` prompts, at the key positions (edited subject's last token,
the new target's last token in the edit sentence, the last token) or at every position).

Per variant: mean P(true), mean log-odds(true vs new), the fraction of the post- to pre-edit
log-odds gap it recovers (pooled: gap of the means; and the mean / median of per-prompt
fractions over prompts with a gap) and the distract-neighbourhood accuracy after patching
(the fraction of prompts where the true answer beats the new target, the paper's strict
per-token test), next to the pre- and post-edit accuracy.
"""

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch

from attention_drift import tokens
from attention_drift.data import Record
from attention_drift.drift import (
    DriftError,
    DriftSample,
    Regions,
    drift_report,
    measure_drift,
    record_prompts,
)
from attention_drift.jsonl import RunFile, read_run
from attention_drift.models import model_device
from attention_drift.hooks import act_name
from attention_drift.patching import (
    Grid,
    Patch,
    PatchCase,
    PatchingError,
    layer_position_grid,
    record_activations,
    run_patched,
    window_grid,
)

DRIFT_FORMAT = "attention_drift.analysis.drift/1"
PATCH_FORMAT = "attention_drift.analysis.patch/1"
DRIFT_GROUPS = ("distract_neighborhood", "distract_relation")
SUMMARY_VARIANTS = ("none", "attn_pattern_all", "attn_pattern_topk", "attn_out_all", "mlp_out_all",
                    "mlp_out_last", "resid_subject")
SWEEP_COMPONENTS = ("attn_pattern", "attn_out", "mlp_out", "resid_pre_last")
CONTAMINATION_COMPONENTS = ("mlp_out", "attn_out")
KEY_POSITIONS = ("subject_last", "target_new_last", "last")

EditFactory = Callable[[Record], AbstractContextManager]


def _round(t: torch.Tensor, digits: int = 6) -> list:
    scale = 10.0 ** digits
    return (t.detach().double().cpu() * scale).round().div(scale).tolist()


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="record", file=sys.stderr, dynamic_ncols=True)


def _save_figure(fig, path: Path, png: bool) -> list[str]:
    from attention_drift import plots

    written = plots.save(fig, path.with_suffix(".html"))
    if png:
        try:
            written += plots.save(fig, path.with_suffix(".png"))
        except plots.PngExportError as err:
            print(f"attention-drift: no PNG for {path.name}: {err}", file=sys.stderr)
    return [str(p) for p in written]


def _png_ok() -> bool:
    from attention_drift import plots

    problem = plots.png_export_problem()
    if problem:
        print(f"attention-drift: HTML only, no PNG: {problem}", file=sys.stderr)
    return problem is None


def _fmt(x: float, spec: str = ".3f") -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


# =============================================================================================
# edit cache


class EditCache:
    """An editor factory that remembers each record's weight change and replays it.

    The first edit of a record runs ``factory(record)`` (e.g. ROME) and stores
    ``result.deltas`` (``{"blocks.L.mlp.out.weight": new - original}``) in memory and, with
    ``folder``, as ``folder/<case_id>.pt``; later edits of that record (in this process or, from
    the folder, in another command) add the stored deltas to the weights and restore the exact
    originals on exit, without optimising again. The folder belongs to one model, method and
    edit configuration: keep one per setting (the commands key it by their options).
    """

    def __init__(self, model, factory: EditFactory, folder=None):
        self.model, self.factory = model, factory
        self.folder = None if folder is None else Path(folder)
        self.deltas: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = 0

    def _path(self, record: Record) -> Path | None:
        if self.folder is None:
            return None
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(record.case_id))
        return self.folder / f"{name}.pt"

    def _stored(self, record: Record) -> dict | None:
        key = json.dumps(record.case_id)
        if key not in self.deltas:
            path = self._path(record)
            if path is not None and path.is_file():
                self.deltas[key] = torch.load(path)
        return self.deltas.get(key)

    @contextlib.contextmanager
    def __call__(self, record: Record):
        from attention_drift.models import mlp_out_weight

        stored = self._stored(record)
        if stored is None:
            with self.factory(record) as result:
                deltas = {n: d.detach().cpu().clone() for n, d in getattr(result, "deltas", {}).items()}
                if deltas:
                    self.deltas[json.dumps(record.case_id)] = deltas
                    path = self._path(record)
                    if path is not None:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        torch.save(deltas, path)
                yield result
            return
        self.hits += 1
        params = {n: mlp_out_weight(self.model, int(n.split(".")[1])) for n in stored}
        originals = {n: p.detach().clone() for n, p in params.items()}
        try:
            with torch.no_grad():
                for n, p in params.items():
                    p.add_(stored[n].to(p.device, p.dtype))
            yield None
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(originals[n])


# =============================================================================================
# drift


def drift_record(model, record: Record, edit_fn_factory: EditFactory,
                 groups: Sequence[str] = DRIFT_GROUPS, *, capture: bool = False) -> dict | None:
    """One record's drift line (None when it has no prompt of ``groups`` containing its subject,
    without editing). With ``capture`` the line also holds the full attention patterns of its first
    prompt before / inside the edit (``"patterns"``: tensors, not JSON; popped by :func:`run_drift`)."""
    prompts, targets, names = record_prompts(record, groups)
    if not prompts:
        return None
    captured: dict = {}
    hook_names = [act_name("pattern", l) for l in range(model.cfg.n_layers)]

    def patterns() -> torch.Tensor:
        ids = torch.tensor([tokens.encode(model, prompts[0])], device=model_device(model))
        with torch.no_grad():
            _, cache = model.run_with_cache(ids, names_filter=lambda n: n in hook_names)
        return torch.stack([cache[n][0] for n in hook_names]).float().cpu()

    seconds = {}

    @contextlib.contextmanager
    def edited():
        start = time.perf_counter()
        with edit_fn_factory(record) as result:
            seconds["edit"] = getattr(result, "seconds", time.perf_counter() - start)
            if capture:
                captured["after"] = patterns()
            yield result

    if capture:
        captured["before"] = patterns()
    drift = measure_drift(model, record.rewrite, prompts, edited, targets)
    factors = drift.factors()
    before, after = drift.mass("subject_last")
    sb, sa = drift.mass("subject")
    sc_b, sc_a = drift.scores_before, drift.scores_after
    samples = [
        DriftSample(record.case_id, group, prompt, target, {k: float(v[i]) for k, v in factors.items()},
                    float(sc_b.lp_true[i]), float(sc_b.lp_new[i]), float(sc_a.lp_true[i]),
                    float(sc_a.lp_new[i])).to_dict()
        for i, (prompt, target, group) in enumerate(zip(prompts, targets, names))
    ]
    line = {
        "case_id": record.case_id, "kind": record.kind, "subject": record.rewrite.subject,
        "target_new": record.rewrite.target_new, "samples": samples,
        "heads": {"subject_last_before": _round(before), "subject_last_after": _round(after),
                  "delta_subject": _round(sa - sb), "kl": _round(drift.kl())},
        "edit_seconds": float(seconds.get("edit", float("nan"))),
    }
    if capture:
        ids = tokens.encode(model, prompts[0])
        line["patterns"] = {"prompt": prompts[0], "tokens": tokens.token_strings(model, ids), **captured}
    return line


def drift_from_lines(lines: Sequence[dict], groups: Sequence[str] = DRIFT_GROUPS, *, top_k: int = 10,
                     threshold: float = 0.05) -> dict:
    """The ``drift.json`` content rebuilt from per-record lines of :func:`drift_record`."""
    lines = [line for line in lines if line.get("samples")]
    if not lines:
        raise DriftError("no record with distract prompts containing its subject; nothing to report")
    samples = [DriftSample.from_dict(s) for line in lines for s in line["samples"]]

    def stack(key: str) -> torch.Tensor:
        return torch.cat([torch.tensor(line["heads"][key], dtype=torch.float64) for line in lines])

    before, after = stack("subject_last_before"), stack("subject_last_after")
    report = drift_report(samples, after - before, stack("delta_subject"), stack("kl"), groups,
                          threshold=threshold)
    out = report.to_dict()
    mean_before, mean_after = before.nanmean(0), after.nanmean(0)
    stats = report.head_stats["delta_subject_last"]
    out["top_heads"] = [
        {"layer": l, "head": h, "before": float(mean_before[l, h]), "after": float(mean_after[l, h]),
         "drift": d, "median_drift": float(stats.quantiles[stats.levels.index(0.5), l, h])
         if 0.5 in stats.levels else None, "frac_above": float(stats.frac_above[l, h])}
        for l, h, d in report.top_heads(top_k)
    ]
    out["subject_last_attention"] = {"before": _round(mean_before), "after": _round(mean_after)}
    out["records"] = len(lines)
    out["n_samples_by_group"] = {g: sum(s.group == g for s in samples) for g in groups}
    out["headline"] = {
        group: {factor: {"pearson_fails": report.correlations[group][factor]["fails"]["pearson"].to_dict(),
                         "spearman_fails": report.correlations[group][factor]["fails"]["spearman"].to_dict(),
                         "pearson_logodds_drop":
                             report.correlations[group][factor]["logodds_drop"]["pearson"].to_dict(),
                         "spearman_logodds_drop":
                             report.correlations[group][factor]["logodds_drop"]["spearman"].to_dict(),
                         "auroc": report.auroc[group][factor]}
                for factor in ("max_drift_subject_last", "sum_drift_subject_last")}
        for group in ("all", *groups)
    }
    return out


def drift_markdown(result: dict, title: str = "") -> str:
    rows = [f"## attention drift{' · ' + title if title else ''}", "",
            f"{result['records']} records, {result['n_samples']} prompts "
            f"({', '.join(f'{g}: {n}' for g, n in result['n_samples_by_group'].items())}); failure rate "
            + ", ".join(f"{g} {_fmt(v, '.2f')}" for g, v in result["failure_rate"].items()), "",
            "| layer | head | subject attn before → after | mean drift | frac > 0.05 |", "|---:|---:|---|---:|---:|"]
    for t in result["top_heads"]:
        rows.append(f"| {t['layer']} | {t['head']} | {t['before']:.3f} → {t['after']:.3f} | "
                    f"{t['drift']:+.3f} | {t['frac_above']:.2f} |")
    rows += ["", "| group | factor | Pearson r [95% CI] vs fails | Spearman ρ [95% CI] vs fails | "
             "Pearson r vs log-odds drop | AUROC | n |", "|---|---|---|---|---|---:|---:|"]
    for group, by_factor in result["headline"].items():
        for factor, h in by_factor.items():
            p, s, pl = h["pearson_fails"], h["spearman_fails"], h["pearson_logodds_drop"]
            rows.append(f"| {group} | {factor} | {_fmt(p['r'])} [{_fmt(p['ci_low'])}, {_fmt(p['ci_high'])}] | "
                        f"{_fmt(s['r'])} [{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}] | {_fmt(pl['r'])} "
                        f"(p {_fmt(pl['p_value'], '.2g')}) | {_fmt(h['auroc'])} | {p['n']} |")
    return "\n".join(rows)


def _drift_figures(result: dict, out: Path, patterns: dict | None, png: bool, n_view: int = 6) -> list[str]:
    from attention_drift import plots

    written = []
    before = torch.tensor(result["subject_last_attention"]["before"])
    after = torch.tensor(result["subject_last_attention"]["after"])
    kl = torch.tensor(result["head_stats"]["kl"]["mean"])
    fig = plots.drift_heatmap(before, after, kl=kl, title=(
        f"Drift of attention to the edited subject · {result['n_samples']} prompts, "
        f"{result['records']} edits"))
    written += _save_figure(fig, out / "drift_heatmap", png)
    samples = [s for s in result["samples"]
               if math.isfinite(s["factors"]["max_drift_subject_last"]) and math.isfinite(s["severity"]["logodds_drop"])]
    if len(samples) >= 2:
        c = result["correlations"]["all"]["max_drift_subject_last"]["logodds_drop"]["pearson"]
        fig = plots.drift_vs_failure(
            torch.tensor([s["factors"]["max_drift_subject_last"] for s in samples]),
            torch.tensor([s["severity"]["logodds_drop"] for s in samples]),
            bins=min(8, len(samples)), rho=None if c["r"] != c["r"] else c["r"],
            p_value=None if c["p_value"] != c["p_value"] else c["p_value"],
            xlabel="max over heads of the drift to the subject's last token",
            ylabel="log-odds(true vs new) drop")
        written += _save_figure(fig, out / "drift_vs_failure", png)
    if patterns is not None:
        written.append(str(_heads_view(patterns, result["top_heads"][:n_view], out / "heads_before_after.html")))
    return written


def _heads_view(patterns: dict, top: list[dict], path: Path) -> Path:
    """circuitsvis before / after / difference panels of the top heads on one prompt."""
    from circuitsvis.attention import attention_heads

    from attention_drift import viz

    picks = [(t["layer"], t["head"]) for t in top]
    names = [f"L{l}H{h}" for l, h in picks]
    b = torch.stack([patterns["before"][l, h] for l, h in picks])
    a = torch.stack([patterns["after"][l, h] for l, h in picks])
    diff = a - b
    m = float(diff.abs().max()) or 1.0
    toks = list(patterns["tokens"])
    panels = (
        ("before the edit", attention_heads(b, toks, attention_head_names=names, min_value=0.0, max_value=1.0)),
        ("after the edit", attention_heads(a, toks, attention_head_names=names, min_value=0.0, max_value=1.0)),
        (f"after − before (±{m:.3g})", attention_heads(diff, toks, attention_head_names=names,
                                                       min_value=-m, max_value=m)),
    )
    view = viz.AttentionView(f"Top drifting heads on: {patterns['prompt']}", panels, side_by_side=True)
    return viz.save_html(view, path)


def run_drift(model, records: Sequence[Record], edit_fn_factory: EditFactory, out_dir, meta: dict, *,
              groups: Sequence[str] = DRIFT_GROUPS, top_k: int = 10, method: str = "edit",
              progress: bool = False, figures: bool = True) -> dict:
    """Measure drift record by record (resumable in ``out_dir/drift_records.jsonl``), then write
    ``drift.json`` and the figures; returns the ``drift.json`` content plus ``"markdown"``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_path = out / "drift_records.jsonl"
    pattern_path = out / "heads_patterns.pt"
    meta = {"format": DRIFT_FORMAT, **meta, "groups": list(groups)}
    with RunFile(run_path, meta) as run:
        todo = [r for r in records if not run.done(r.case_id, method)]
        for record in _progress(todo, "drift", progress):
            line = drift_record(model, record, edit_fn_factory, groups, capture=not pattern_path.exists())
            if line is None:
                line = {"case_id": record.case_id, "kind": record.kind, "samples": [], "skipped": "no prompts"}
            patterns = line.pop("patterns", None)
            if patterns is not None:
                torch.save(patterns, pattern_path)
            run.write({**line, "method": method})
    wanted = {json.dumps(r.case_id) for r in records}
    lines = [line for line in read_run(run_path).records if json.dumps(line["case_id"]) in wanted]
    result = drift_from_lines(lines, groups, top_k=top_k)
    result["meta"] = meta
    (out / "drift.json").write_text(json.dumps(result, indent=1))
    if figures:
        patterns = torch.load(pattern_path) if pattern_path.exists() else None
        result["figures"] = _drift_figures(result, out, patterns, _png_ok())
    result["markdown"] = drift_markdown(result, f"{meta.get('model')} · {method}")
    return result


# =============================================================================================
# patch


def _all(model) -> tuple[int, ...]:
    return tuple(range(model.cfg.n_layers))


def topk_variant(heads: Sequence[tuple[int, int]]) -> tuple[Patch, ...]:
    """One variant patching the attention patterns of exactly ``heads`` ((layer, head) pairs)."""
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(int(l), []).append(int(h))
    return tuple(Patch("pattern", (l,), tuple(sorted(hs))) for l, hs in sorted(by_layer.items()))


def summary_variants(model, top_heads: Sequence[tuple[int, int]], has_subject: bool = True) -> dict[str, tuple]:
    """The named restoration variants of the module docstring (``resid_subject`` only when the
    prompt's edit sentence holds the subject's tokens)."""
    layers = _all(model)
    out = {
        "none": (),
        "attn_pattern_all": (Patch("pattern", layers),),
        "attn_pattern_topk": topk_variant(top_heads),
        "attn_out_all": (Patch("attn_out", layers),),
        "mlp_out_all": (Patch("mlp_out", layers),),
        "mlp_out_last": (Patch("mlp_out", layers, positions=(-1,)),),
    }
    if has_subject:
        out["resid_subject"] = (Patch("resid_post", layers, positions="subject_last"),)
    return out


def sweep_grid(model) -> Grid:
    """[layer, component]: each layer alone, components of :data:`SWEEP_COMPONENTS`."""
    variants = []
    for l in range(model.cfg.n_layers):
        variants += [(Patch("pattern", (l,)),), (Patch("attn_out", (l,)),), (Patch("mlp_out", (l,)),),
                     (Patch("resid_pre", (l,), positions=(-1,)),)]
    return Grid(tuple(variants), ("layer", "component"),
                (tuple(map(str, range(model.cfg.n_layers))), SWEEP_COMPONENTS))


def _key_positions(model, case: PatchCase) -> dict[str, int]:
    regions = Regions.of(model, case.rewrite, case.prompt)
    found = {"subject_last": regions.positions("subject_last"), "target_new_last": regions.positions("target_new"),
             "last": regions.positions("last")}
    return {name: pos[-1] for name, pos in found.items() if pos}


def _scores_pair(scores, i: int | None = None) -> list[float]:
    if i is None:
        return [float(scores.lp_true[0]), float(scores.lp_new[0])]
    return [float(scores.lp_true[i]), float(scores.lp_new[i])]


def _subject_drift(model, case: PatchCase, clean, edited) -> torch.Tensor | None:
    """[layer, head] change of the last prompt token's attention to the edited subject's last token."""
    pos = Regions.of(model, case.rewrite, case.prompt).positions("subject_last")
    if not pos:
        return None
    q = int(clean.batch.prompt_lengths[0]) - 1
    names = [act_name("pattern", l) for l in range(model.cfg.n_layers)]
    b = torch.stack([clean.cache[n][0, :, q, pos[0]] for n in names]).float().cpu()
    a = torch.stack([edited.cache[n][0, :, q, pos[0]] for n in names]).float().cpu()
    return a - b


def top_heads_of(drift: torch.Tensor, k: int) -> list[tuple[int, int, float]]:
    """The ``k`` heads with the largest drift, as (layer, head, drift)."""
    n_heads = drift.shape[1]
    order = torch.nan_to_num(drift, nan=-math.inf).flatten().argsort(descending=True, stable=True)[:k]
    return [(*divmod(int(i), n_heads), float(drift.flatten()[i])) for i in order]


def patch_record(model, record: Record, edit_fn_factory: EditFactory, *, k: int = 10,
                 heads: Sequence[tuple[int, int]] | None = None, window: int = 10, sweep_prompts: int = 1,
                 contamination_prompts: int = 1, contamination_window: int = 6,
                 contamination_positions: str = "key", batch_size: int = 64) -> dict | None:
    """One record's patching line (None, without editing, when it has no neighbourhood prompt).

    ``heads``: the top-k heads to patch in (b); None ranks the heads by this record's own drift.
    """
    if contamination_positions not in ("key", "all"):
        raise PatchingError(f"contamination_positions must be 'key' or 'all', not {contamination_positions!r}")
    cases = PatchCase.from_record(record, ("neighborhood",))
    if not cases:
        return None
    clean = [record_activations(model, case, None) for case in cases]
    sweep = sweep_grid(model) if sweep_prompts > 0 else None
    windows = window_grid(model, "pattern", window) if sweep_prompts > 0 else None
    line = {"case_id": record.case_id, "kind": record.kind, "subject": record.rewrite.subject,
            "target_new": record.rewrite.target_new, "cases": [], "sweeps": [], "contamination": []}
    start = time.perf_counter()
    with edit_fn_factory(record) as result:
        line["edit_seconds"] = float(getattr(result, "seconds", time.perf_counter() - start))
        edited = [record_activations(model, case, None) for case in cases]
        drifts = [d for d in (_subject_drift(model, c, s, e) for c, s, e in zip(cases, clean, edited)) if d is not None]
        record_drift = torch.stack(drifts).mean(0) if drifts else None
        if heads is None:
            ranked = top_heads_of(record_drift, k) if record_drift is not None else []
            line["head_source"] = "record"
        else:
            ranked = [(int(l), int(h), float(record_drift[l, h]) if record_drift is not None else float("nan"))
                      for l, h in list(heads)[:k]]
            line["head_source"] = "given"
        line["top_heads"] = [list(t) for t in ranked]
        for i, (case, source) in enumerate(zip(cases, clean)):
            has_subject = bool(Regions.of(model, case.rewrite, case.prompt).positions("subject_last"))
            named = summary_variants(model, [(l, h) for l, h, _ in ranked], has_subject)
            if not named["attn_pattern_topk"]:
                del named["attn_pattern_topk"]
            res = run_patched(model, source, list(named.values()), batch_size=batch_size)
            entry = {"prompt": case.prompt, "target_true": case.true_target, "target_new": case.new_target,
                     "pre": _scores_pair(res.source), "post": _scores_pair(res.base),
                     "variants": {name: _scores_pair(res.patched, j) for j, name in enumerate(named)}}
            line["cases"].append(entry)
            if i < sweep_prompts:
                lc = run_patched(model, source, sweep, batch_size=batch_size)
                wr = run_patched(model, source, windows, batch_size=batch_size)
                line["sweeps"].append({
                    "prompt": case.prompt, "pre": entry["pre"], "post": entry["post"],
                    "layer_component": {"components": list(SWEEP_COMPONENTS),
                                        "lp_true": _round(lc.patched.lp_true.view(*sweep.shape)),
                                        "lp_new": _round(lc.patched.lp_new.view(*sweep.shape))},
                    "windows": {"labels": list(windows.labels[0]), "lp_true": _round(wr.patched.lp_true),
                                "lp_new": _round(wr.patched.lp_new)},
                })
    for case, source in list(zip(cases, edited))[:contamination_prompts]:
        n_tokens = int(source.batch.prompt_lengths[0])
        keys = _key_positions(model, case)
        positions = list(keys.values()) if contamination_positions == "key" else list(range(n_tokens))
        names = {p: n for n, p in keys.items()}
        ids = tokens.encode(model, case.prompt)
        entry = {"prompt": case.prompt, "positions": positions,
                 "labels": [names.get(p, "") for p in positions],
                 "tokens": [tokens.token_strings(model, [ids[p]])[0] for p in positions], "components": {}}
        for component in CONTAMINATION_COMPONENTS:
            grid = layer_position_grid(model, positions, component, contamination_window)
            res = run_patched(model, source, grid, batch_size=batch_size)
            entry["pre"], entry["post"] = _scores_pair(res.base), _scores_pair(res.source)
            entry["components"][component] = {"lp_true": _round(res.patched.lp_true.view(*grid.shape)),
                                              "lp_new": _round(res.patched.lp_new.view(*grid.shape))}
        line["contamination"].append(entry)
    return line


def _accuracy(lp: np.ndarray) -> dict:
    correct = lp[:, 0] > lp[:, 1]
    n = int(correct.size)
    p = float(correct.mean()) if n else float("nan")
    half = 1.96 * math.sqrt(p * (1 - p) / n) if n else float("nan")
    return {"accuracy": p, "ci95": [max(0.0, p - half), min(1.0, p + half)], "half_width": half, "n": n}


def _variant_stats(patched: np.ndarray, pre: np.ndarray, post: np.ndarray) -> dict:
    lo, lo_pre, lo_post = (x[:, 0] - x[:, 1] for x in (patched, pre, post))
    gap = lo_pre - lo_post
    ok = np.abs(gap) > 1e-6
    per = (lo[ok] - lo_post[ok]) / gap[ok]
    p, p_pre, p_post = (np.exp(x[:, 0]) for x in (patched, pre, post))
    gap_p = p_pre.mean() - p_post.mean()
    return {
        **_accuracy(patched),
        "mean_p_true": float(p.mean()), "mean_logodds": float(lo.mean()),
        "recovery_pooled": float((lo.mean() - lo_post.mean()) / gap.mean()) if abs(gap.mean()) > 1e-9 else None,
        "recovery_mean": float(per.mean()) if per.size else None,
        "recovery_median": float(np.median(per)) if per.size else None,
        "recovery_p_pooled": float((p.mean() - p_post.mean()) / gap_p) if abs(gap_p) > 1e-12 else None,
    }


def _pooled_recovery(patched_true, patched_new, pre: np.ndarray, post: np.ndarray) -> np.ndarray:
    """Pooled log-odds recovery per grid cell over prompts: arrays [prompt, ...]."""
    lo = (patched_true - patched_new).mean(0)
    lo_pre, lo_post = (pre[:, 0] - pre[:, 1]).mean(), (post[:, 0] - post[:, 1]).mean()
    return (lo - lo_post) / (lo_pre - lo_post) if abs(lo_pre - lo_post) > 1e-9 else np.full_like(lo, np.nan)


def patch_from_lines(lines: Sequence[dict]) -> dict:
    """The ``patch.json`` content rebuilt from per-record lines of :func:`patch_record`."""
    lines = [line for line in lines if line.get("cases")]
    if not lines:
        raise PatchingError("no record with distract-neighbourhood prompts; nothing to report")
    cases = [c for line in lines for c in line["cases"]]
    pre = np.array([c["pre"] for c in cases])
    post = np.array([c["post"] for c in cases])
    variants = {}
    for name in SUMMARY_VARIANTS:
        keep = [i for i, c in enumerate(cases) if name in c["variants"]]
        if keep:
            patched = np.array([cases[i]["variants"][name] for i in keep])
            variants[name] = _variant_stats(patched, pre[keep], post[keep])
    out = {"records": len(lines), "n_prompts": len(cases), "pre": _variant_stats(pre, pre, post),
           "post": _variant_stats(post, pre, post), "variants": variants,
           "top_heads": {json.dumps(line["case_id"]): line.get("top_heads", []) for line in lines}}
    sweeps = [s for line in lines for s in line["sweeps"]]
    if sweeps:
        s_pre, s_post = np.array([s["pre"] for s in sweeps]), np.array([s["post"] for s in sweeps])
        lc_t = np.array([s["layer_component"]["lp_true"] for s in sweeps])
        lc_n = np.array([s["layer_component"]["lp_new"] for s in sweeps])
        w_t = np.array([s["windows"]["lp_true"] for s in sweeps])
        w_n = np.array([s["windows"]["lp_new"] for s in sweeps])
        out["sweep"] = {
            "n_prompts": len(sweeps), "components": sweeps[0]["layer_component"]["components"],
            "recovery_pooled": _pooled_recovery(lc_t, lc_n, s_pre, s_post).tolist(),
            "accuracy": ((lc_t > lc_n).mean(0)).tolist(),
            "mean_p_true": np.exp(lc_t).mean(0).tolist(),
        }
        out["windows"] = {
            "n_prompts": len(sweeps), "labels": sweeps[0]["windows"]["labels"],
            "recovery_pooled": _pooled_recovery(w_t, w_n, s_pre, s_post).tolist(),
            "accuracy": ((w_t > w_n).mean(0)).tolist(), "mean_p_true": np.exp(w_t).mean(0).tolist(),
            "pre_accuracy": float((s_pre[:, 0] > s_pre[:, 1]).mean()),
            "post_accuracy": float((s_post[:, 0] > s_post[:, 1]).mean()),
        }
    contamination = [c for line in lines for c in line["contamination"]]
    if contamination:
        summary = {}
        for component in CONTAMINATION_COMPONENTS:
            per_label: dict[str, list] = {}
            best = []
            for c in contamination:
                p_pre = math.exp(c["pre"][0])
                lp = np.array(c["components"][component]["lp_true"])
                drop = p_pre - np.exp(lp)
                i, l = np.unravel_index(int(np.argmax(drop)), drop.shape)
                best.append({"prompt": c["prompt"], "drop": float(drop[i, l]), "relative_drop": float(drop[i, l] / p_pre),
                             "position": c["positions"][i], "token": c["tokens"][i], "label": c["labels"][i],
                             "layer": int(l)})
                for j, label in enumerate(c["labels"]):
                    if label:
                        per_label.setdefault(label, []).append(drop[j])
            summary[component] = {
                "mean_drop_by_position": {k: np.mean(v, 0).tolist() for k, v in per_label.items()},
                "max_drop": max(best, key=lambda b: b["drop"]), "mean_max_drop": float(np.mean([b["drop"] for b in best])),
                "mean_max_relative_drop": float(np.mean([b["relative_drop"] for b in best])),
            }
        p_pre = np.array([math.exp(c["pre"][0]) for c in contamination])
        p_post = np.array([math.exp(c["post"][0]) for c in contamination])
        out["contamination"] = {"n_prompts": len(contamination), "window": None, "components": summary,
                                "full_edit_drop": float((p_pre - p_post).mean()),
                                "full_edit_relative_drop": float(((p_pre - p_post) / p_pre).mean())}
    return out


VARIANT_LABELS = {
    "none": "post-edit (no patch)",
    "attn_pattern_all": "(a) attention patterns, all layers",
    "attn_pattern_topk": "(b) attention patterns, top-k drifting heads",
    "attn_out_all": "attention outputs, all layers",
    "mlp_out_all": "(c) MLP outputs, all layers, all positions",
    "mlp_out_last": "MLP outputs, all layers, last token",
    "resid_subject": "(d) residual stream at the edited subject's last token, all layers",
}


def patch_markdown(result: dict, title: str = "") -> str:
    rows = [f"## patching (restoration){' · ' + title if title else ''}", "",
            f"{result['records']} records, {result['n_prompts']} distract-neighbourhood prompts", "",
            "| variant | DNS accuracy ± ci | mean P(true) | mean log-odds | recovery (pooled) | recovery (median) |",
            "|---|---:|---:|---:|---:|---:|"]

    def row(label, s):
        rec = "–" if s.get("recovery_pooled") is None else f"{s['recovery_pooled']:.3f}"
        med = "–" if s.get("recovery_median") is None else f"{s['recovery_median']:.3f}"
        return (f"| {label} | {100 * s['accuracy']:.1f} ± {100 * s['half_width']:.1f} | {s['mean_p_true']:.4f} | "
                f"{s['mean_logodds']:+.3f} | {rec} | {med} |")

    rows.append(row("pre-edit", result["pre"]))
    for name, s in result["variants"].items():
        rows.append(row(VARIANT_LABELS.get(name, name), s))
    if "windows" in result:
        w = result["windows"]
        best = int(np.nanargmax(np.array(w["recovery_pooled"], dtype=float)))
        rows += ["", f"10-layer windows of attention patterns ({w['n_prompts']} prompts): best window "
                 f"{w['labels'][best]} recovers {w['recovery_pooled'][best]:.3f} of the log-odds gap "
                 f"(accuracy {100 * w['accuracy'][best]:.1f}% vs pre {100 * w['pre_accuracy']:.1f}%, "
                 f"post {100 * w['post_accuracy']:.1f}%)"]
    if "contamination" in result:
        c = result["contamination"]
        parts = [f"{comp}: largest drop in P(true) {v['max_drop']['drop']:.4f} "
                 f"({100 * v['max_drop']['relative_drop']:.1f}% relative) at {v['max_drop']['label'] or 'token'} "
                 f"{v['max_drop']['token']!r}, window centred on layer {v['max_drop']['layer']}"
                 for comp, v in c["components"].items()]
        rows += ["", f"Contamination ({c['n_prompts']} prompts; the full edit changes P(true) by "
                 f"{-c['full_edit_drop']:+.4f} on average, a mean per-prompt relative drop of "
                 f"{100 * c['full_edit_relative_drop']:.1f}%): " + "; ".join(parts)]
    return "\n".join(rows)


def _patch_figures(result: dict, out: Path, png: bool) -> list[str]:
    from attention_drift import plots

    written = []
    bars = {"pre-edit": {"DNS": result["pre"]}}
    for name, s in result["variants"].items():
        bars[VARIANT_LABELS.get(name, name)] = {"DNS": s}
    fig = plots.metric_bars(bars, f"DNS accuracy after restoring pre-edit activations · {result['n_prompts']} prompts")
    written += _save_figure(fig, out / "patch_accuracy", png)
    if "sweep" in result:
        s = result["sweep"]
        rec = torch.tensor(s["recovery_pooled"], dtype=torch.float64)
        fig = plots.patching_heatmap(rec, list(range(rec.shape[0])), s["components"],
                                     f"Restoration per layer · pooled log-odds recovery, {s['n_prompts']} prompts")
        written += _save_figure(fig, out / "patch_layer_component", png)
    if "windows" in result:
        w = result["windows"]
        fig = plots.recovery_curves(
            {"attention patterns, 10-layer window": torch.tensor(w["recovery_pooled"], dtype=torch.float64)},
            "Restoring attention patterns, sliding windows · pooled log-odds recovery",
            xlabel="window centre layer")
        written += _save_figure(fig, out / "patch_windows", png)
    if "contamination" in result:
        curves = {f"{comp} @ {label}": torch.tensor(v, dtype=torch.float64)
                  for comp, c in result["contamination"]["components"].items()
                  for label, v in c["mean_drop_by_position"].items()}
        if curves:
            fig = plots.recovery_curves(curves, "Contamination: P(true) drop, 6-layer windows", xlabel="window centre layer",
                                        ylabel="P(true) drop")
            written += _save_figure(fig, out / "patch_contamination", png)
    return written


def load_top_heads(path, k: int) -> list[tuple[int, int]]:
    """The first ``k`` top heads of a ``drift.json`` written by :func:`run_drift`."""
    data = json.loads(Path(path).read_text())
    if "top_heads" not in data:
        raise DriftError(f"{path} has no 'top_heads'; give a drift.json written by 'attention-drift drift'")
    heads = [(t["layer"], t["head"]) for t in data["top_heads"]][:k]
    if len(heads) < k:
        print(f"attention-drift: {path} lists {len(heads)} heads, fewer than k={k}", file=sys.stderr)
    return heads


def run_patch(model, records: Sequence[Record], edit_fn_factory: EditFactory, out_dir, meta: dict, *,
              k: int = 10, heads: Sequence[tuple[int, int]] | None = None, window: int = 10,
              sweep_prompts: int = 1, contamination_prompts: int = 1, contamination_window: int = 6,
              contamination_positions: str = "key", batch_size: int = 64, method: str = "edit",
              progress: bool = False, figures: bool = True) -> dict:
    """Patch record by record (resumable in ``out_dir/patch_records.jsonl``), then write
    ``patch.json`` and the figures; returns the ``patch.json`` content plus ``"markdown"``."""
    if k < 1:
        raise PatchingError(f"k must be >= 1, got {k}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_path = out / "patch_records.jsonl"
    meta = {"format": PATCH_FORMAT, **meta, "k": k, "heads": None if heads is None else [list(h) for h in heads],
            "window": window, "sweep_prompts": sweep_prompts, "contamination_prompts": contamination_prompts,
            "contamination_window": contamination_window, "contamination_positions": contamination_positions}
    with RunFile(run_path, meta) as run:
        todo = [r for r in records if not run.done(r.case_id, method)]
        for record in _progress(todo, "patch", progress):
            line = patch_record(model, record, edit_fn_factory, k=k, heads=heads, window=window,
                                sweep_prompts=sweep_prompts, contamination_prompts=contamination_prompts,
                                contamination_window=contamination_window,
                                contamination_positions=contamination_positions, batch_size=batch_size)
            if line is None:
                line = {"case_id": record.case_id, "kind": record.kind, "cases": [], "skipped": "no prompts"}
            run.write({**line, "method": method})
    wanted = {json.dumps(r.case_id) for r in records}
    lines = [line for line in read_run(run_path).records if json.dumps(line["case_id"]) in wanted]
    result = patch_from_lines(lines)
    if "contamination" in result:
        result["contamination"]["window"] = contamination_window
    result["meta"] = meta
    (out / "patch.json").write_text(json.dumps(result, indent=1))
    if figures:
        result["figures"] = _patch_figures(result, out, _png_ok())
    result["markdown"] = patch_markdown(result, f"{meta.get('model')} · {method}")
    return result

"""The drift explorer: one self-contained, offline HTML page per drift run.

A drift run (``attention-drift drift --out DIR``) leaves ``DIR/drift_records.jsonl``: a header
``{"meta": {...}}`` and one line per edited record with its distract prompts' scores and, per
prompt, every head's attention from the prediction position to the edited subject's last token
before / inside the edit and the row KL (:func:`attention_drift.runs.analysis.drift_record`).
Optionally ``DIR/drift_patterns.jsonl`` holds the *full* attention patterns of some heads on
some prompts (:data:`PATTERNS_FORMAT`, written with :func:`patterns_line`).

:meth:`ExplorerData.from_run` reads both (and, optionally, a second run of the same records
to compare with, e.g. the edit with SADR) and :func:`write_explorer` writes the page; in
Jupyter ``viz.explorer(run)`` shows the same page inline. The page holds:

* the layer x head heatmap over the data set, switchable between mean drift, fraction of
  prompts whose drift exceeds a threshold, mean KL, the per-head correlation of drift with
  failure, and the drift on the selected prompt (and between the two runs);
* clicking a head draws its attention before, after and after - before on the selected prompt,
  with the measured cell (prediction row -> subject's last token) outlined, colour scales that
  leave out the first-token attention sink, signed colours with a legend and token labels; a
  head without a stored pattern shows the measured values only, and says so;
* the prompt list (P(true) / P(new) before and after, failed or not, in both runs), the top
  heads, and where a run used SADR the heads it selected with their drift in both runs.

Numbers travel in one binary block (float16 per-prompt values, attention patterns as 8-bit
square-root codes of their lower triangle), zlib-compressed and base64 encoded once, and the
JavaScript (``templates/explorer.js``, no dependencies) is inlined once per page, so a
100-record run stays a few MB and the page needs no network.

The page payload is versioned by :data:`FORMAT`; the patterns file by :data:`PATTERNS_FORMAT`.
"""

import base64
import functools
import html
import json
import math
import os
import secrets
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from jaxtyping import Float

from attention_drift.measure.drift import Outcome
from attention_drift.editing.sadr import selection_frequency
from attention_drift.reports.stats import pearson
from attention_drift.core.errors import AttentionDriftError
from attention_drift.core.jsonl import Run, read_run

FORMAT = "attention_drift.explorer/1"
PATTERNS_FORMAT = "attention_drift.explorer.patterns/1"
RUN_FILE = "drift_records.jsonl"
PATTERNS_FILE = "drift_patterns.jsonl"
METRICS = {
    "mean_drift": ("mean drift", "mean over prompts of the drift: after - before attention from the prediction "
                   "position to the edited subject's last token"),
    "frac_above": ("fraction of prompts above the threshold", "fraction of prompts whose drift exceeds the threshold"),
    "kl": ("mean KL of the row", "mean over prompts of KL(before || after) of the prediction row"),
    "corr_fails": ("correlation with failure", "Pearson r over prompts between the head's drift and failure (0 / 1)"),
}
"""Heatmap metrics per head over a run's prompts: key -> (short label, description)."""
TEMPLATES = Path(__file__).parent / "templates"


class ExplorerError(AttentionDriftError):
    """A run, patterns file or view request the explorer cannot use; the message says why."""


# =============================================================================================
# arrays


def _array(x, name: str) -> np.ndarray:
    """``x`` (nested lists, numpy array or torch tensor) as a float32 numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").float().numpy()
    try:
        return np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ExplorerError(f"{name} is not a numeric array ({exc}); give nested lists, numpy or torch") from None


def _case_key(case_id) -> str:
    return json.dumps(case_id)


def _tril(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.tril_indices(n)


def _is_causal(m: np.ndarray) -> bool:
    upper = m[np.triu_indices(m.shape[0], 1)]
    return not upper.size or bool(np.nanmax(np.abs(upper)) <= 1e-4)


# =============================================================================================
# full attention patterns


@dataclass(frozen=True)
class PromptPatterns:
    """Full attention patterns of some heads on one prompt, before and inside an edit.

    Args:
        tokens: the prompt's token strings (BOS included where the model uses one), one per
            query / key position.
        query: the prediction position whose row drift measures (the last prompt token).
        subject_last: the edited subject's last token, the key position drift measures.
        heads: ``{(layer, head): (before, after)}``, each a ``[q, k]`` float16 array with
            ``q == k == len(tokens)``.
    """

    tokens: tuple[str, ...]
    query: int
    subject_last: int
    heads: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(hash=False)

    def __post_init__(self):
        n = len(self.tokens)
        if not 0 <= self.query < n:
            raise ExplorerError(f"query position {self.query} is outside the {n} tokens")
        if not 0 <= self.subject_last <= self.query:
            raise ExplorerError(f"subject_last {self.subject_last} must lie in 0..query={self.query} "
                                "(the prediction row only sees earlier keys)")
        for (layer, head), pair in self.heads.items():
            for state, m in zip(("before", "after"), pair):
                if m.shape != (n, n):
                    raise ExplorerError(f"pattern {state} of L{layer}H{head} is {list(m.shape)} but the prompt "
                                        f"has {n} tokens; give the [q, k] = [{n}, {n}] pattern")

    @classmethod
    def from_dict(cls, d: Mapping) -> "PromptPatterns":
        """The patterns of the schema ``{"tokens": [...], "query": int, "subject_last": int,
        "heads": {(layer, head): {"before": [[..]], "after": [[..]]}}}`` (arrays as nested lists,
        numpy or torch; head keys also as ``"layer,head"`` strings or lists; values also as
        ``(before, after)`` pairs)."""
        missing = [k for k in ("tokens", "query", "subject_last", "heads") if k not in d]
        if missing:
            raise ExplorerError(f"prompt patterns lack {missing}; expected keys tokens, query, subject_last, heads")
        heads = {}
        for key, value in dict(d["heads"]).items():
            layer, head = _head_key(key)
            before, after = (value["before"], value["after"]) if isinstance(value, Mapping) else value
            heads[(layer, head)] = (_array(before, f"L{layer}H{head} before").astype(np.float16),
                                    _array(after, f"L{layer}H{head} after").astype(np.float16))
        return cls(tuple(str(t) for t in d["tokens"]), int(d["query"]), int(d["subject_last"]), heads)

    def to_json(self, index: int) -> dict:
        """This prompt's entry of a patterns-file line (``index``: the prompt's position among
        its record's samples): float16, lower triangle when causal, base64."""
        entries = []
        for (layer, head), (before, after) in sorted(self.heads.items()):
            entries.append({"layer": layer, "head": head, "before": _pack16(before), "after": _pack16(after)})
        return {"prompt_index": int(index), "tokens": list(self.tokens), "query": self.query,
                "subject_last": self.subject_last, "heads": entries}

    @classmethod
    def from_json(cls, d: Mapping) -> "PromptPatterns":
        n = len(d["tokens"])
        heads = {(int(e["layer"]), int(e["head"])): (_unpack16(e["before"], n), _unpack16(e["after"], n))
                 for e in d["heads"]}
        return cls(tuple(d["tokens"]), int(d["query"]), int(d["subject_last"]), heads)


def _head_key(key) -> tuple[int, int]:
    try:
        if isinstance(key, str):
            layer, head = (int(x) for x in key.replace("L", "").replace("H", ",").split(",") if x.strip())
        else:
            layer, head = (int(x) for x in key)
    except (TypeError, ValueError):
        raise ExplorerError(f"head key {key!r} is not (layer, head); use a tuple like (12, 3)") from None
    return layer, head


def _pack16(m: np.ndarray) -> dict:
    m = np.asarray(m, dtype=np.float16)
    causal = _is_causal(m.astype(np.float32))
    values = m[_tril(m.shape[0])] if causal else m.reshape(-1)
    return {"layout": "tril" if causal else "full", "f16": base64.b64encode(values.astype("<f2").tobytes()).decode()}


def _unpack16(packed: Mapping, n: int) -> np.ndarray:
    values = np.frombuffer(base64.b64decode(packed["f16"]), dtype="<f2")
    if packed["layout"] == "full":
        if values.size != n * n:
            raise ExplorerError(f"a stored pattern holds {values.size} values, not {n}x{n}; the file is damaged")
        return values.reshape(n, n).astype(np.float16)
    out = np.zeros((n, n), dtype=np.float16)
    rows, cols = _tril(n)
    if values.size != rows.size:
        raise ExplorerError(f"a stored pattern holds {values.size} values, not the {rows.size} of a {n}-token "
                            "lower triangle; the file is damaged")
    out[rows, cols] = values
    return out


def patterns_line(case_id: int | str, prompts: Mapping[int, "PromptPatterns | Mapping"], method: str = "edit") -> dict:
    """One record's line of a patterns file (:data:`PATTERNS_FORMAT`): ``prompts`` maps the
    index of each prompt among the record's samples to its :class:`PromptPatterns` (or the dict
    schema of :meth:`PromptPatterns.from_dict`). Write it with :class:`attention_drift.core.jsonl.RunFile`
    under the header ``{"format": PATTERNS_FORMAT, ...}`` beside the run, as ``drift_patterns.jsonl``."""
    entries = []
    for index, p in sorted(prompts.items()):
        p = p if isinstance(p, PromptPatterns) else PromptPatterns.from_dict(p)
        entries.append(p.to_json(index))
    return {"case_id": case_id, "method": method, "prompts": entries}


def write_patterns(path: str | os.PathLike, patterns: Mapping, meta: Mapping | None = None,
                   method: str = "edit") -> Path:
    """Write ``{(case_id, prompt_index): PromptPatterns or dict}`` as a patterns file."""
    by_case: dict[str, tuple[object, dict]] = {}
    for (case_id, index), p in patterns.items():
        by_case.setdefault(_case_key(case_id), (case_id, {}))[1][int(index)] = p
    lines = [{"meta": {"format": PATTERNS_FORMAT, **dict(meta or {})}}]
    lines += [patterns_line(case_id, prompts, method) for case_id, prompts in by_case.values()]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def read_patterns(path: str | os.PathLike, method: str | None = None) -> dict[tuple[int | str, int], PromptPatterns]:
    """``{(case_id, prompt_index): PromptPatterns}`` of a patterns file (lines of ``method`` only,
    when given)."""
    run = read_run(path)
    if run.meta.get("format") != PATTERNS_FORMAT:
        raise ExplorerError(f"{path} is not a patterns file (format {run.meta.get('format')!r}, expected "
                            f"{PATTERNS_FORMAT!r})")
    out = {}
    for line in run.records:
        if method is not None and line.get("method") != method:
            continue
        for entry in line.get("prompts", []):
            out[(line["case_id"], int(entry["prompt_index"]))] = PromptPatterns.from_json(entry)
    return out


# =============================================================================================
# SADR


def sadr_selected(sadr_records: Sequence[Mapping], n_layers: int, n_heads: int) -> list[list[float]]:
    """:func:`attention_drift.editing.sadr.selection_frequency` as JSON-ready ``[layer][head]``: a drift
    line's ``"sadr_selected"`` (the drift run stores it when the edit used SADR), which the
    explorer shows as the heads SADR selected."""
    return selection_frequency(sadr_records, n_layers, n_heads).numpy().round(4).tolist()


# =============================================================================================
# one run


@dataclass(frozen=True)
class PromptRow(Outcome):
    """One distract prompt of a drift run and its scores before / inside the edit.

    Args:
        case_id: the edited record.
        index: the prompt's position among its record's samples (the patterns key).
        group: ``distract_neighborhood`` or ``distract_relation``.
        prompt: the full prompt text (edit sentence, then the prompt proper).
        target_true: the prompt's true answer; ``target_new`` the edit's new target.
        subject: the edited subject.
        lp_true_before, lp_new_before, lp_true_after, lp_new_after: mean per-token
            log-probabilities of the two answers before / inside the edit.
    """

    case_id: int | str
    index: int
    group: str
    prompt: str
    target_true: str
    target_new: str
    subject: str
    lp_true_before: float
    lp_new_before: float
    lp_true_after: float
    lp_new_after: float


def _label(meta: Mapping) -> str:
    method = str(meta.get("method") or "edit")
    sadr = (meta.get("edit") or {}).get("sadr") if isinstance(meta.get("edit"), Mapping) else None
    return method.upper() + (" + SADR" if sadr else "")


@dataclass(frozen=True)
class ExplorerRun:
    """One drift run's per-prompt, per-head numbers as the explorer shows them.

    Args:
        label: the run's name on the page (e.g. ``ROME + SADR``).
        meta: the run header (model, method, edit settings).
        prompts: one row per distract prompt, in record order.
        before: attention from the prediction position to the subject's last token before the
            edit, ``[prompt, layer, head]``; ``after``: inside the edit.
        kl: KL(before || after) of the prediction row, ``[prompt, layer, head]``.
        kinds: ``{case key: record kind}`` (case key: ``json.dumps(case_id)``).
        sadr: ``{case key: [layer, head] fraction selected}`` for records whose line holds
            ``"sadr_selected"`` (see :func:`sadr_selected`).
        patterns: ``{(case key, prompt index): PromptPatterns}``.
    """

    label: str
    meta: dict
    prompts: tuple[PromptRow, ...]
    before: Float[np.ndarray, "prompt layer head"]
    after: Float[np.ndarray, "prompt layer head"]
    kl: Float[np.ndarray, "prompt layer head"]
    kinds: dict[str, str] = field(default_factory=dict, hash=False)
    sadr: dict[str, np.ndarray] = field(default_factory=dict, hash=False)
    patterns: dict[tuple[str, int], PromptPatterns] = field(default_factory=dict, hash=False)

    @property
    def n_layers(self) -> int:
        return int(self.before.shape[1])

    @property
    def n_heads(self) -> int:
        return int(self.before.shape[2])

    @property
    def drift(self) -> Float[np.ndarray, "prompt layer head"]:
        return self.after.astype(np.float64) - self.before.astype(np.float64)

    @classmethod
    def from_lines(cls, lines: Sequence[Mapping], meta: Mapping | None = None, *, label: str | None = None,
                   patterns: Mapping | None = None, method: str | None = None) -> "ExplorerRun":
        """The run of drift lines (:func:`attention_drift.runs.analysis.drift_record`; a leading
        ``{"meta": ...}`` header is taken as ``meta``). ``method`` keeps the lines of one method
        when the file holds several; ``patterns`` as in :meth:`ExplorerData.from_run`."""
        lines = list(lines)
        if lines and "meta" in lines[0] and "case_id" not in lines[0]:
            meta = dict(lines[0]["meta"]) if meta is None else meta
            lines = lines[1:]
        methods = sorted({str(line.get("method")) for line in lines if line.get("samples")})
        if method is None and len(methods) > 1:
            raise ExplorerError(f"the run holds the methods {methods}; choose one with method=...")
        lines = [line for line in lines if line.get("samples") and (method is None or line.get("method") == method)]
        if not lines:
            raise ExplorerError("the run has no record with distract prompts" +
                                (f" of method {method!r}" if method else "") +
                                "; run 'attention-drift drift' on records whose prompts contain the subject")
        meta = dict(meta or {})
        if method is not None:
            meta["method"] = method
        elif methods and "method" not in meta:
            meta["method"] = methods[0]
        rows, before, after, kl, kinds, sadr = [], [], [], [], {}, {}
        shape = None
        for line in lines:
            samples, heads = line["samples"], line.get("heads") or {}
            missing = [k for k in ("subject_last_before", "subject_last_after", "kl") if k not in heads]
            if missing:
                raise ExplorerError(f"record {line.get('case_id')!r} lacks heads {missing}; is this a drift run "
                                    "(drift_records.jsonl of 'attention-drift drift')?")
            arrays = [_array(heads[k], f"record {line['case_id']!r} heads.{k}")
                      for k in ("subject_last_before", "subject_last_after", "kl")]
            for a in arrays:
                if a.ndim != 3 or a.shape[0] != len(samples):
                    raise ExplorerError(f"record {line['case_id']!r}: per-head values are {list(a.shape)}, expected "
                                        f"[{len(samples)} prompts, layer, head]")
                if shape is not None and a.shape[1:] != shape:
                    raise ExplorerError(f"record {line['case_id']!r} has {list(a.shape[1:])} layers x heads, others "
                                        f"{list(shape)}; a run holds one model")
                shape = a.shape[1:]
            before.append(arrays[0]), after.append(arrays[1]), kl.append(arrays[2])
            key = _case_key(line["case_id"])
            kinds[key] = str(line.get("kind", ""))
            if line.get("sadr_selected") is not None:
                selected = _array(line["sadr_selected"], f"record {line['case_id']!r} sadr_selected")
                if selected.shape != shape:
                    raise ExplorerError(f"record {line['case_id']!r}: sadr_selected is {list(selected.shape)}, "
                                        f"expected [layer, head] = {list(shape)}")
                sadr[key] = selected
            for i, s in enumerate(samples):
                rows.append(PromptRow(line["case_id"], i, str(s["group"]), str(s["prompt"]), str(s["target_true"]),
                                      str(line.get("target_new", "")), str(line.get("subject", "")),
                                      float(s["lp_true_before"]), float(s["lp_new_before"]),
                                      float(s["lp_true_after"]), float(s["lp_new_after"])))
        stored = _normalise_patterns(patterns, {(_case_key(r.case_id), r.index): r for r in rows})
        return cls(label or _label(meta), meta, tuple(rows), np.concatenate(before), np.concatenate(after),
                   np.concatenate(kl), kinds, sadr, stored)

    def head_metrics(self, threshold: float = 0.05) -> dict[str, Float[np.ndarray, "layer head"]]:
        """:data:`METRICS` per head over the run's prompts, as ``drift_report``'s head statistics
        (NaN prompts left out; NaN where a head has no valid prompt); the correlation is
        :func:`attention_drift.reports.stats.pearson` of the head's drift with failure (0 / 1) over the
        prompts the unedited model got right (failure as :class:`~attention_drift.measure.drift.Outcome`
        and the drift report define it)."""
        drift = self.drift
        valid = ~np.isnan(drift)
        count = valid.sum(0)
        safe = np.maximum(count, 1)
        mean = np.where(valid, drift, 0.0).sum(0) / safe
        frac = ((drift > threshold) & valid).sum(0) / safe
        kl = self.kl.astype(np.float64)
        kl_valid = ~np.isnan(kl)
        mean_kl = np.where(kl_valid, kl, 0.0).sum(0) / np.maximum(kl_valid.sum(0), 1)
        right = np.array([r.right_before for r in self.prompts], dtype=bool)
        flipped = np.array([r.flipped for r in self.prompts], dtype=np.float64)[right]
        corr = np.full(drift.shape[1:], np.nan)
        for l, h in np.ndindex(*drift.shape[1:]):
            corr[l, h] = pearson(drift[right, l, h], flipped).r
        none = count == 0
        return {"mean_drift": np.where(none, np.nan, mean), "frac_above": np.where(none, np.nan, frac),
                "kl": np.where(kl_valid.sum(0) == 0, np.nan, mean_kl), "corr_fails": corr}

    def top_heads(self, k: int = 10) -> list[tuple[int, int]]:
        """The ``k`` heads with the largest mean drift (NaN last), largest first."""
        mean = np.nan_to_num(self.head_metrics()["mean_drift"], nan=-np.inf).reshape(-1)
        order = np.argsort(-mean, kind="stable")[:k]
        return [tuple(int(x) for x in divmod(int(i), self.n_heads)) for i in order]

    def failure_rate(self) -> dict[str, float]:
        """Failure (right before the edit, wrong inside it) as a share of the prompts the unedited
        model got right, overall and per group (NaN where none was right)."""
        def rate(rows) -> float:
            right = [r for r in rows if r.right_before]
            return float(np.mean([r.flipped for r in right])) if right else math.nan

        out = {"all": rate(self.prompts)}
        for group in sorted({r.group for r in self.prompts}):
            out[group] = rate([r for r in self.prompts if r.group == group])
        return out


def _normalise_patterns(patterns, rows: Mapping[tuple[str, int], PromptRow]) -> dict[tuple[str, int], PromptPatterns]:
    if not patterns:
        return {}
    out = {}
    for key, value in patterns.items():
        try:
            case_id, index = key
        except (TypeError, ValueError):
            raise ExplorerError(f"patterns key {key!r} is not (case_id, prompt_index)") from None
        norm = (_case_key(case_id), int(index))
        if norm not in rows:
            raise ExplorerError(f"patterns for case {case_id!r} prompt {index} match no prompt of the run; "
                                "keys are (case_id, index of the prompt among the record's samples)")
        out[norm] = value if isinstance(value, PromptPatterns) else PromptPatterns.from_dict(value)
    return out


def _lines_of(run) -> tuple[list[dict], dict, Path | None]:
    """(lines, meta, folder) of a run folder, run file, :class:`Run` or list of lines."""
    if isinstance(run, Run):
        return list(run.records), dict(run.meta), None
    if isinstance(run, (str, os.PathLike)):
        path = Path(run)
        folder = path if path.is_dir() else path.parent
        if path.is_dir():
            path = path / RUN_FILE
        if not path.is_file():
            raise ExplorerError(f"no drift run at {str(path)!r}; give the output folder of a drift run (run_drift, "
                                "attention-drift drift) "
                                f"(it holds {RUN_FILE}) or that file")
        read = read_run(path)
        return list(read.records), dict(read.meta), folder
    if isinstance(run, Sequence) and not isinstance(run, (str, bytes)):
        lines = [dict(x) for x in run]
        meta = {}
        if lines and "meta" in lines[0] and "case_id" not in lines[0]:
            meta, lines = dict(lines[0]["meta"]), lines[1:]
        return lines, meta, None
    raise ExplorerError(f"cannot read a drift run from {type(run).__name__}; give a run folder, its {RUN_FILE}, "
                        "a jsonl.Run or a list of drift lines")


def _run_of(run, patterns, label: str | None, method: str | None) -> ExplorerRun:
    if isinstance(run, ExplorerRun):
        if patterns:
            raise ExplorerError("patterns= cannot be added to an ExplorerRun; pass them to ExplorerRun.from_lines")
        return run
    lines, meta, folder = _lines_of(run)
    if patterns is None and folder is not None and (folder / PATTERNS_FILE).is_file():
        patterns = folder / PATTERNS_FILE
    if isinstance(patterns, (str, os.PathLike)):
        patterns = read_patterns(patterns, method)
    return ExplorerRun.from_lines(lines, meta, label=label, patterns=patterns or None, method=method)


# =============================================================================================
# the explorer's data


@dataclass(frozen=True)
class ExplorerData:
    """Everything one explorer page shows (versioned by :data:`FORMAT`).

    Args:
        run: the drift run explored.
        comparison: optionally a second run of the same records (e.g. with SADR), shown side by
            side; prompts are matched by case id and prompt text.
        threshold: the drift above which a prompt counts in the ``frac_above`` metric.
        top_k: rows of the top-heads table.
        title: the page heading.
    """

    run: ExplorerRun
    comparison: ExplorerRun | None = None
    threshold: float = 0.05
    top_k: int = 10
    title: str = ""

    def __post_init__(self):
        if self.comparison is not None:
            a, b = self.run.before.shape[1:], self.comparison.before.shape[1:]
            if a != b:
                raise ExplorerError(f"the comparison run has {list(b)} layers x heads but the run {list(a)}; "
                                    "compare runs of the same model")
        if self.top_k < 1:
            raise ExplorerError(f"top_k must be >= 1, got {self.top_k}")

    @classmethod
    def from_run(cls, run, *, patterns=None, comparison=None, comparison_patterns=None, method: str | None = None,
                 comparison_method: str | None = None, label: str | None = None,
                 comparison_label: str | None = None, threshold: float = 0.05, top_k: int = 10,
                 title: str | None = None) -> "ExplorerData":
        """Build from a run and, optionally, a comparison run.

        ``run`` / ``comparison``: a drift run folder (``drift_records.jsonl``; its
        ``drift_patterns.jsonl`` is read when ``patterns`` is None), that file, a
        :class:`~attention_drift.core.jsonl.Run`, a list of drift lines, or an :class:`ExplorerRun`.
        ``patterns``: a patterns file path or ``{(case_id, prompt_index): PromptPatterns or the
        dict schema of PromptPatterns.from_dict}``; ``False`` reads none.
        ``method`` / ``comparison_method`` pick one method of a file that holds several.
        """
        main = _run_of(run, patterns, label, method)
        other = None
        if comparison is not None:
            other = _run_of(comparison, comparison_patterns, comparison_label, comparison_method)
            if other.label == main.label:
                other = _relabel(other, other.label + " (comparison)")
        meta = main.meta
        default = " · ".join(str(x) for x in (meta.get("model"), main.label) if x)
        return cls(main, other, float(threshold), int(top_k), title or f"Drift explorer · {default}")

    def payload(self) -> tuple[dict, bytes]:
        """The page's JSON payload and its binary block (uncompressed)."""
        blob = _Blob()
        runs = [self.run] + ([self.comparison] if self.comparison is not None else [])
        out = {"format": FORMAT, "title": self.title, "threshold": self.threshold, "top_k": self.top_k,
               "n_layers": self.run.n_layers, "n_heads": self.run.n_heads,
               "metrics": [{"key": k, "label": label, "description": text} for k, (label, text) in METRICS.items()],
               "runs": [_run_payload(r, blob, self.threshold, self.top_k) for r in runs]}
        if self.comparison is not None:
            where = {(_case_key(r.case_id), r.prompt): i for i, r in enumerate(self.comparison.prompts)}
            out["runs"][1]["match"] = [where.get((_case_key(r.case_id), r.prompt), -1) for r in self.run.prompts]
        return out, blob.bytes()


def _relabel(run: ExplorerRun, label: str) -> ExplorerRun:
    from dataclasses import replace

    return replace(run, label=label)


class _Blob:
    """Numeric arrays packed into one little-endian byte block, each 4-byte aligned."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, values, kind: str) -> dict:
        a = np.asarray(values, dtype=np.float64).reshape(-1)
        if kind == "f4":
            data = a.astype("<f4").tobytes()
        elif kind == "f2":
            data = a.astype("<f2").tobytes()
        elif kind == "q8":
            data = np.round(np.sqrt(np.clip(np.nan_to_num(a), 0.0, 1.0)) * 255).astype(np.uint8).tobytes()
        else:
            raise ValueError(kind)
        ref = {"o": self.size, "n": int(a.size), "t": kind}
        pad = -len(data) % 4
        self.parts.append(data + b"\0" * pad)
        self.size += len(data) + pad
        return ref

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x if isinstance(x, (str, int, float, bool)) or x is None else str(x)


def _add_pattern(blob: _Blob, m: np.ndarray) -> dict:
    """A pattern as 8-bit square-root codes: its lower triangle when causal (the page tells the
    layouts apart by size: q(q+1)/2 or q*q values)."""
    m = m.astype(np.float32)
    return blob.add(m[_tril(m.shape[0])] if _is_causal(m) else m, "q8")


def _run_payload(run: ExplorerRun, blob: _Blob, threshold: float, top_k: int) -> dict:
    keys = list(dict.fromkeys(_case_key(r.case_id) for r in run.prompts))
    record_of = {k: i for i, k in enumerate(keys)}
    first = {}
    for r in run.prompts:
        first.setdefault(_case_key(r.case_id), r)
    records = [{"case_id": first[k].case_id, "kind": run.kinds.get(k, ""), "subject": first[k].subject,
                "target_new": first[k].target_new} for k in keys]
    prompts = [{"r": record_of[_case_key(r.case_id)], "i": r.index, "g": r.group, "p": r.prompt,
                "t": r.target_true} for r in run.prompts]
    lp = [[r.lp_true_before, r.lp_new_before, r.lp_true_after, r.lp_new_after] for r in run.prompts]
    metrics = run.head_metrics(threshold)
    sadr = None
    if run.sadr:
        sadr = {"mean": blob.add(np.mean(list(run.sadr.values()), axis=0), "f4"),
                "records": {str(record_of[k]): blob.add(v, "f2") for k, v in run.sadr.items() if k in record_of}}
    row_of = {(_case_key(r.case_id), r.index): i for i, r in enumerate(run.prompts)}
    patterns = {}
    for key, p in run.patterns.items():
        heads = {f"{l},{h}": [_add_pattern(blob, b), _add_pattern(blob, a)] for (l, h), (b, a) in sorted(p.heads.items())}
        patterns[str(row_of[key])] = {"tokens": list(p.tokens), "q": p.query, "s": p.subject_last, "heads": heads}
    return {
        "label": run.label, "meta": _json_safe(run.meta), "records": _json_safe(records), "prompts": prompts,
        "lp": blob.add(lp, "f4"), "before": blob.add(run.before, "f2"), "after": blob.add(run.after, "f2"),
        "kl": blob.add(run.kl, "f2"), "metrics": {k: blob.add(v, "f4") for k, v in metrics.items()},
        "top": [list(t) for t in run.top_heads(top_k)], "failure_rate": run.failure_rate(),
        "sadr": sadr, "patterns": patterns,
    }


# =============================================================================================
# HTML


@functools.cache
def _asset(name: str) -> str:
    path = TEMPLATES / name
    if not path.is_file():
        raise ExplorerError(f"the explorer's {name} is missing from {TEMPLATES}; reinstall attention_drift")
    return path.read_text(encoding="utf-8")


def bundle() -> str:
    """The explorer's CSS and JavaScript as one ``<style>`` and one ``<script>`` element."""
    js = _asset("explorer.js").replace("</script", "<\\/script")
    return f"<style>{_asset('explorer.css')}</style>\n<script>{js}</script>"


_SCRIPT_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026",
                   0x2028: "\\u2028", 0x2029: "\\u2029"}


def script_json(value) -> str:
    """``value`` as JSON text that can sit inside an HTML ``<script>`` element unchanged.

    Every ``<``, ``>`` and ``&`` is written as a ``\\u`` escape (outside strings JSON has none,
    and inside one the escape reads back as the same character), so no string can end the
    element (``</script>``) or switch the HTML parser into a state where the real end tag no
    longer ends it (``<!--<script>``); U+2028 / U+2029 are escaped too (not ASCII anyway)."""
    return json.dumps(_json_safe(value), separators=(",", ":"), allow_nan=False).translate(_SCRIPT_ESCAPES)


def render(kind: str, payload: Mapping, data: bytes = b"", *, compress: bool = True) -> str:
    """An HTML fragment that draws one view (``kind``: ``"explorer"`` or ``"patterns"``) of
    ``payload`` with its binary block ``data``, bundle included once."""
    if kind not in ("explorer", "patterns"):
        raise ExplorerError(f"unknown view kind {kind!r}; use 'explorer' or 'patterns'")
    packed = zlib.compress(data, 9) if compress else data
    payload = {**payload, "blob": {"deflate": bool(compress), "bytes": len(data)}}
    text = script_json(payload)
    uid = "ad-" + secrets.token_hex(4)
    return (f'<div class="ad-explorer" id="{uid}" data-kind="{kind}">loading…</div>\n'
            f'<script type="application/json" id="{uid}-data">{text}</script>\n'
            f'<script type="application/octet-stream" id="{uid}-blob">{base64.b64encode(packed).decode()}</script>\n'
            f"{bundle()}\n"
            f'<script>ADExplorer.start("{uid}");</script>')


def document(title: str, fragment: str) -> str:
    """A complete HTML page around ``fragment`` (opens offline)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n</head>\n<body>\n{fragment}\n</body>\n</html>\n")


def explorer_html(data: ExplorerData) -> str:
    """The explorer of ``data`` as an HTML fragment (for Jupyter; :func:`write_explorer` writes a page)."""
    payload, blob = data.payload()
    return render("explorer", payload, blob)


def write_explorer(path: str | os.PathLike, data: ExplorerData) -> Path:
    """Write the explorer page of ``data`` (a path without suffix gets ``.html``); returns the path."""
    path = Path(path)
    if not path.suffix:
        path = path.with_name(path.name + ".html")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document(data.title, explorer_html(data)), encoding="utf-8")
    return path

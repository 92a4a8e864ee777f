"""The summary of a sequential-editing run (``sequence.json``), built from its run file's lines only.

Series are aligned on ``edits`` (the checkpoints, 0 = the unedited model). A metric a checkpoint
lacks is None there (retention and NKL at 0; drift without edited records). Accuracies are
fractions with the pooled normal 95% interval of :func:`attention_drift.measure.evaluate.aggregate`.
"""

import math
import statistics
from collections.abc import Sequence

from attention_drift.core.jsonl import Run

SERIES = {
    "efficacy": ("retention", "groups", "efficacy"),
    "paraphrase": ("retention", "groups", "paraphrase"),
    "neighborhood": ("probes", "groups", "neighborhood"),
    "distract_neighborhood": ("probes", "groups", "distract_neighborhood"),
    "relation": ("probes", "groups", "relation"),
    "distract_relation": ("probes", "groups", "distract_relation"),
    "nkl": ("probes", "metrics", "nkl"),
}
"""Accuracy / metric series: ``name -> the path of its stats in a line`` (``accuracy`` or ``mean``, ``ci95``)."""
DRIFT_KEYS = ("max_delta", "sum_delta", "heads_above", "failure_rate")


def _get(line: dict, path: Sequence[str]):
    for key in path:
        line = (line or {}).get(key)
    return line


def sequence_summary(run: Run) -> dict:
    """``{"meta", "edits": [...], "series": {name: {"value": [...], "ci95": [...]}}, "fluency": [...],
    "drift": {"first"|"latest": {key: [...]}}, "efficacy_by_edit": [...] (the last checkpoint's),
    "timing": {...}}`` of a ``sequence.jsonl``."""
    lines = sorted(run.records, key=lambda l: l["edits"])
    edits = [l["edits"] for l in lines]
    series = {}
    for name, path in SERIES.items():
        stats = [_get(l, path) for l in lines]
        if any(s is not None for s in stats):
            series[name] = {"value": [None if s is None else s.get("accuracy", s.get("mean")) for s in stats],
                            "ci95": [None if s is None else s.get("ci95") for s in stats],
                            "n": [None if s is None else s.get("n") for s in stats]}
    fluency = [(_get(l, ("probes", "fluency")) or {}).get("ngram_entropy") for l in lines]
    drift = {which: {key: [(_get(l, ("drift", which)) or {}).get(key) for l in lines] for key in DRIFT_KEYS}
             for which in ("first", "latest")}
    per_call = [s for l in lines for s in l.get("edit_seconds", [])]
    per_edit = [sum(l["edit_seconds"]) / (l["edits"] - before["edits"])  # the block's edits: between checkpoints
                for before, l in zip(lines, lines[1:]) if l.get("edit_seconds")]
    return {
        "meta": run.meta, "edits": edits, "series": series, "fluency": fluency, "drift": drift,
        "efficacy_by_edit": (_get(lines[-1], ("retention", "efficacy_by_edit")) or []) if lines else [],
        "timing": {
            "seconds_per_edit": per_edit,
            "first_block_seconds_per_edit": per_edit[0] if per_edit else None,
            "last_block_seconds_per_edit": per_edit[-1] if per_edit else None,
            "edit_seconds": sum(per_call), "monitor_seconds": sum(l.get("monitor_seconds", 0.0) for l in lines),
            # blocks whose edit times a resume lost (written before checkpoints kept them) left out of both
            "timed_monitor_seconds": sum(l.get("monitor_seconds", 0.0) for l in lines
                                         if l.get("edit_seconds") or l["edits"] == 0),
            "median_edit_call_seconds": statistics.median(per_call) if per_call else None,
        },
        "complete": bool(edits) and edits[-1] == run.meta.get("n_edits"),
    }


def monitor_overhead(summary: dict) -> float:
    """Monitoring time over editing time of a run (0.25: monitoring added 25% to the run): the
    monitoring of the unedited checkpoint and of every block whose edit times are recorded, over
    those edit times (a block whose times a resume lost counts in neither)."""
    timing = summary["timing"]
    monitor = timing.get("timed_monitor_seconds", timing["monitor_seconds"])
    return monitor / timing["edit_seconds"] if timing["edit_seconds"] else math.nan

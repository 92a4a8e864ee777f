"""Sequential editing with a drift monitor: N edits applied one after another (or B at a time)
without restoring in between, measured every K edits (:mod:`attention_drift.measure.monitor`).

    run_sequence(model, edits, probes, "runs/seq-rome", SequenceConfig(Variant("rome", "rome"), n_edits=200))

The output folder holds:

* ``sequence.jsonl``: a header ``{"meta": {...}}`` (model, variant, config, the edits' and probes'
  case_ids, the resolved edit key), then one line per checkpoint as soon as it is measured:
  ``{"case_id": edits so far, "method", "edits", "edit_seconds": [seconds of each edit call since
  the previous checkpoint], "edits_per_call", "monitor_seconds", "retention", "probes",
  "drift": {"first": ..., "latest": ...}}`` (checkpoint 0 is the unedited model; its
  ``monitor_seconds`` include the probes' unedited baseline);
* ``checkpoint.pt``: the edited layers' current weights, the editor's state (AlphaEdit's keys of
  earlier edits), the number of edits and the last block's edit times (for its line, should the
  run stop between the checkpoint and the line), rewritten at every checkpoint. An interrupted run
  resumes from it with the same numbers: the weights are stored exactly (not as differences,
  since ``a + (b - a)`` need not equal ``b`` in floating point), and everything else an edit
  reads (statistics, templates) comes from the caches made on the unedited model;
* ``sequence.json``: :func:`attention_drift.reports.sequence.sequence_summary` of the lines, and
  ``sequence.html`` / ``.png``: every metric against the number of edits
  (:func:`attention_drift.views.sequence_plot.sequence_figure`);
* ``drift-tNNNN/``: at the checkpoints of ``explorer_at``, a full drift run of the latest edited
  records against the unedited model (``drift.json``, figures, ``explorer.html``).

Memory: the model plus the original weights of the layers the editor writes (the only ones a
sequence changes). The original weights are put back bitwise at the end, also when a run fails.
"""

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attention_drift.core.data import Record
from attention_drift.core.errors import AttentionDriftError
from attention_drift.core.hooks import mlp_weight_name
from attention_drift.core.jsonl import RunFile, read_run
from attention_drift.core.models import hf_parameters, mlp_out_weight
from attention_drift.core.paths import write_atomically
from attention_drift.editing import apply_edit
from attention_drift.editing.external import WeightSwap
from attention_drift.editing.identity import weights_fingerprint
from attention_drift.editing.registry import check_batch, resolve_edit
from attention_drift.measure import monitor
from attention_drift.measure.monitor import MonitorConfig
from attention_drift.runs.variants import Variant

FORMAT = "attention_drift.sequence/1"
RUN_FILE = "sequence.jsonl"
CHECKPOINT = "checkpoint.pt"


class SequenceError(AttentionDriftError):
    """A sequence that cannot start or resume; the message says what to change."""


@dataclass(frozen=True)
class SequenceConfig:
    """One sequential-editing run.

    Args:
        variant: the editor and its options (SADR / SADR+ included), as for ``evaluate``.
        n_edits: how many records of ``edits`` to apply, in order.
        edit_batch: requests per edit call (> 1 only for editors that insert several at once,
            :attr:`~attention_drift.editing.registry.Editor.batched`); must divide ``monitor.every``.
        monitor: what each checkpoint measures, and every how many edits.
        explorer_at: checkpoints (numbers of edits) at which a full drift run with the explorer
            page is written too.
    """

    variant: Variant
    n_edits: int
    edit_batch: int = 1
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    explorer_at: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.variant.edits:
            raise SequenceError("a sequence needs an editing method, not 'none'", fields=("method",))
        if not isinstance(self.n_edits, int) or self.n_edits < 1:
            raise SequenceError(f"n_edits must be an integer >= 1, got {self.n_edits!r}", fields=("n_edits",))
        check_batch(self.variant.method, self.edit_batch)
        if self.monitor.every % self.edit_batch:
            raise SequenceError(f"every ({self.monitor.every}) must be a multiple of edit_batch ({self.edit_batch}), "
                                "so that checkpoints fall between edit calls", fields=("every", "edit_batch"))
        object.__setattr__(self, "explorer_at", tuple(sorted(set(self.explorer_at))))
        bad = [t for t in self.explorer_at if t not in self.checkpoints]
        if bad:
            raise SequenceError(f"explorer_at {bad}: choose checkpoints, i.e. multiples of every ({self.monitor.every}) "
                                f"up to n_edits ({self.n_edits}), or n_edits itself", fields=("explorer_at",))

    @property
    def checkpoints(self) -> tuple[int, ...]:
        """The numbers of edits after which the monitor measures (0: the unedited model)."""
        return tuple(sorted({*range(0, self.n_edits, self.monitor.every), self.n_edits}))


def split_records(records: Sequence[Record], n_probes: int) -> tuple[list[Record], list[Record]]:
    """(edits, probes) of ``records``: the probes are the first ``n_probes`` records with
    neighbourhood or relation prompts, half of each kind
    (:func:`~attention_drift.core.data.balanced_subset`); the edits are the other records, in order,
    less any that edits a probe's subject."""
    from attention_drift.core.data import balanced_subset

    if not isinstance(n_probes, int) or n_probes < 1:
        raise SequenceError(f"probes must be an integer >= 1, got {n_probes!r}", fields=("probes",))
    probes = balanced_subset([r for r in records if r.neighborhood.prompts or r.relation.prompts], n_probes)
    ids = {str(r.case_id) for r in probes}
    subjects = {r.rewrite.subject for r in probes}
    return [r for r in records if str(r.case_id) not in ids and r.rewrite.subject not in subjects], probes


def check_sequence(edits: Sequence[Record], probes: Sequence[Record], config: SequenceConfig) -> None:
    """A :class:`SequenceError` (or the monitor's) for a request that cannot run, before any edit."""
    if len(edits) < config.n_edits:
        raise SequenceError(f"n_edits is {config.n_edits} but only {len(edits)} records are left to edit (probes are "
                            "never edited); edit fewer, take fewer probes or select more records", fields=("n_edits",))
    monitor.check_probes(probes, edits[: config.n_edits])


def sequence_meta(model, edits: Sequence[Record], probes: Sequence[Record], config: SequenceConfig, key) -> dict:
    """The run file's header: everything the numbers depend on."""
    return {"format": FORMAT, "model": model.model_name, "method": config.variant.method,
            "variant": config.variant.name, "edit": config.variant.meta(), "edit_key": key,
            "n_edits": config.n_edits, "edit_batch": config.edit_batch, "monitor": config.monitor.to_json(),
            "edits": [r.case_id for r in edits[: config.n_edits]], "probes": [r.case_id for r in probes],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


class _Weights:
    """The parameters a sequence writes, their originals (kept once) and their checkpoints."""

    def __init__(self, model, layers: Sequence[int]):
        self.params = {mlp_weight_name(l): mlp_out_weight(model, l) for l in layers}
        self.originals = {n: p.detach().clone() for n, p in self.params.items()}
        by_id = {id(p): n for n, p in hf_parameters(model).items()}
        self.hf_names = {n: by_id[id(p)] for n, p in self.params.items()}

    def current(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.params.items()}

    def put(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(weights[name])

    def restore(self) -> None:
        self.put(self.originals)

    def swap(self, model, weights: dict[str, torch.Tensor]) -> WeightSwap:
        return WeightSwap(model, {self.hf_names[n]: w for n, w in weights.items()}, source="the sequence's weights")


def _save_checkpoint(path: Path, edits: int, weights: _Weights, state, meta: dict, seconds: list[float]) -> None:
    data = {"format": FORMAT, "edits": edits, "header": json.dumps(_stable(meta), sort_keys=True), "seconds": seconds,
            "originals": weights_fingerprint(weights.originals),
            "weights": {n: w.cpu() for n, w in weights.current().items()},
            "state": None if state is None else {f: getattr(state, f) for f in state.__dataclass_fields__}}
    write_atomically(path, lambda tmp: torch.save(data, tmp))


def _stable(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "created"}


def _read_checkpoint(path: Path, weights: _Weights, meta: dict) -> dict:
    """The checkpoint at ``path``, checked to belong to this sequence and these original weights."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise SequenceError(f"cannot read the checkpoint {path}: {err}; delete it to start the sequence over") from None
    if data.get("format") != FORMAT or data.get("header") != json.dumps(_stable(meta), sort_keys=True):
        raise SequenceError(f"{path} belongs to another sequence (other model, editor, records or monitor settings); "
                            "write to a new out folder")
    if data["originals"] != weights_fingerprint(weights.originals):
        raise SequenceError(f"{path} was made on other weights than the model holds now (is an edit applied?)")
    return data


def _resume(data: dict, weights: _Weights, state_type):
    """Put a checkpoint's weights into the model; its editor state."""
    weights.put({n: w.to(weights.params[n].device) for n, w in data["weights"].items()})
    state = data["state"]
    return None if state is None else state_type(**state)


def _resolved(model, edits: Sequence[Record], probes: Sequence[Record], config: SequenceConfig):
    """(editor, its config, SADR config, run header) of a sequence: what its checkpoints are checked against."""
    editor_config, sadr = config.variant.resolve(model)
    editor, editor_config, sadr = resolve_edit(model, config.variant.method, editor_config, sadr)
    from attention_drift.editing import edit_key

    meta = sequence_meta(model, edits, probes, config, edit_key(model, editor.name, editor_config, sadr))
    return editor, editor_config, sadr, meta


@contextlib.contextmanager
def at_checkpoint(model, edits: Sequence[Record], probes: Sequence[Record], out_dir: str | os.PathLike,
                  config: SequenceConfig) -> Iterator[tuple[int, object]]:
    """Inside the block, ``model`` holds the weights of the last checkpoint of the sequence run in
    ``out_dir`` (made with these records and ``config``); yields (edits done, the editor's state
    after them), so edits can go on from there. The original weights are put back bitwise on exit."""
    editor, editor_config, _, meta = _resolved(model, edits, probes, config)
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        raise SequenceError(f"{out_dir} has no {CHECKPOINT}: run the sequence there first")
    weights = _Weights(model, editor_config.layers)
    saved = _read_checkpoint(path, weights, meta)
    try:
        yield saved["edits"], _resume(saved, weights, editor.state_type)
    finally:
        weights.restore()


def run_sequence(model, edits: Sequence[Record], probes: Sequence[Record], out_dir: str | os.PathLike,
                 config: SequenceConfig, *, progress: bool = True, figures: bool = True) -> dict:
    """Apply ``config.n_edits`` records of ``edits`` in order without restoring, measuring every
    ``config.monitor.every`` edits, into ``out_dir`` (resuming it); returns the summary
    (``sequence.json``). ``model`` must be unedited; it is again when this returns or raises."""
    from tqdm.auto import tqdm

    check_sequence(edits, probes, config)
    edits = list(edits[: config.n_edits])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    editor, editor_config, sadr, meta = _resolved(model, edits, probes, config)
    editor.prepare(model, editor_config, progress=progress)  # statistics and templates from the unedited model
    weights = _Weights(model, editor_config.layers)
    ckpt = out / CHECKPOINT
    try:
        saved = _read_checkpoint(ckpt, weights, meta) if ckpt.exists() else None
        done = saved["edits"] if saved else 0
        with RunFile(out / RUN_FILE, meta) as run:
            start = time.perf_counter()
            finished = done == config.n_edits and run.done(done, editor.name)
            baseline = [] if finished else monitor.probe_baseline(model, probes, config.monitor)
            baseline_seconds = time.perf_counter() - start
            state = _resume(saved, weights, editor.state_type) if saved else None
            if not run.done(done, editor.name):
                line = _checkpoint_line(model, edits, probes, baseline, weights, done,
                                        list(saved.get("seconds", [])) if saved else [], config, editor.name, out)
                if done == 0:
                    line["monitor_seconds"] += baseline_seconds
                run.write(line)
            seconds: list[float] = []
            with tqdm(total=config.n_edits, initial=done, desc=f"sequence {config.variant.name}", unit="edit",
                      file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
                while done < config.n_edits:
                    chunk = edits[done: done + config.edit_batch]
                    result = apply_edit(model, [r.rewrite for r in chunk], editor.name, editor_config, sadr=sadr,
                                        progress=False, state=state)
                    state, done = result.state, done + len(chunk)
                    seconds.append(float(result.seconds))
                    bar.update(len(chunk))
                    if done in config.checkpoints:
                        _save_checkpoint(ckpt, done, weights, state, meta, seconds)
                        run.write(_checkpoint_line(model, edits, probes, baseline, weights, done, seconds, config,
                                                   editor.name, out))
                        seconds = []
    finally:
        weights.restore()
    from attention_drift.reports.sequence import sequence_summary

    summary = sequence_summary(read_run(out / RUN_FILE))
    (out / "sequence.json").write_text(json.dumps(summary, indent=1))
    if figures:
        from attention_drift.views.plots import png_ok, save_figure
        from attention_drift.views.sequence_plot import sequence_figure

        summary["figures"] = [str(p) for p in save_figure(
            sequence_figure({config.variant.name: summary}), out / "sequence", png=png_ok())]
    return summary


def _checkpoint_line(model, edits, probes, baseline, weights: _Weights, done: int, seconds: list[float],
                     config: SequenceConfig, method: str, out: Path) -> dict:
    """Measure the model after ``done`` edits (weights in place; left in place) into a run line."""
    start = time.perf_counter()
    settings = config.monitor
    edited = edits[:done]
    current = weights.current()
    line = {"case_id": done, "method": method, "edits": done, "edit_seconds": seconds,
            "edits_per_call": config.edit_batch}
    line["retention"] = monitor.retention(model, edited, settings) if edited else None
    line["probes"] = monitor.probe_scores(model, probes, baseline, settings)
    line["drift"] = None
    if done and settings.drift_records:
        first, latest = monitor.drift_candidates(edited, settings.drift_records)
        weights.restore()
        try:
            swap = weights.swap(model, current)
            line["drift"] = {name: monitor.head_drift(model, records, swap, settings.drift_threshold)
                             for name, records in (("first", first), ("latest", latest))}
            if done in config.explorer_at and latest:
                from attention_drift.runs.analysis import run_drift

                run_drift(model, latest, swap, out / f"drift-t{done:04d}",
                          {"model": model.model_name, "method": method, "edits": done}, method=method)
        finally:
            weights.put(current)
    line["monitor_seconds"] = time.perf_counter() - start
    return line

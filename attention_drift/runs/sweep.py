"""Sweeps: records x variants on an executor's workers, into one resumable run file per variant.

``run_sweep(SweepConfig(variants, out, ...), placement)`` evaluates every selected record under
every variant and writes ``OUT/<variant>.jsonl``, the run files of ``attention-drift evaluate``
(same header, same lines: each line is made by :func:`attention_drift.runs.evaluation.evaluate_record_line`,
so a record gives the same numbers in this process and on Ray), which ``attention-drift compare``
reads. A sweep edits one record at a time; batch editing is ``evaluate_run(..., edit_batch=B)``
(``attention-drift evaluate --edit-batch B``), whose run files a sweep refuses to append to (their
header's ``edit_batch``).

How the work is spread (:mod:`attention_drift.runs.executor`, where the
:class:`~attention_drift.runs.placement.Placement` says: one worker in this process, or Ray
actors that each keep the model loaded for the whole sweep):

* The covariance statistics of every editing variant are computed once, by the first worker,
  before any edit runs (the other workers meanwhile score records pre-edit); the others read
  them from the disk cache (:mod:`attention_drift.editing.stats`; on a multi-node cluster
  each node without a shared cache fills its own).
* Pre-edit scores are computed once per record: by the first non-editing variant (e.g.
  ``none``) when the sweep has one, else by a pre-only pass; every editing variant of the
  record reuses them, as ``evaluate --reuse-pre`` does. Records already in a file lend theirs.
* The driver is the only writer: workers return lines and the driver appends them with
  :class:`~attention_drift.core.jsonl.RunFile`, so a line is never written twice. A Ray worker
  that dies is replaced and its record retried (at most ``max_retries`` times) on whichever
  worker is free first. Interrupted sweeps (Ctrl-C, a kill, an error, the ``deadline``) resume
  when re-run: records in the files are skipped.
"""

import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attention_drift.core.errors import AttentionDriftError
from attention_drift.runs.evaluation import (
    RecordSelection,
    check_edit_key,
    check_writable,
    run_meta,
)
from attention_drift.runs.executor import Executor, Task, as_executor
from attention_drift.runs.placement import Placement
from attention_drift.runs.variants import NONE, Variant


class SweepError(AttentionDriftError):
    """A sweep that cannot start or go on; the message says what to change."""


@dataclass(frozen=True)
class SweepConfig:
    """One sweep: its variants, the records, and where the run files go (the model and the
    workers are the :class:`~attention_drift.runs.placement.Placement` given to :func:`run_sweep`).

    Args:
        variants: the variants, one run file ``out/<name>.jsonl`` each (names unique).
        out: the folder of the run files.
        selection: which records.
        batch_size: sequences per forward pass.
        fluency: a :class:`~attention_drift.measure.evaluate.FluencyConfig` to also score
            generations, or None.
        max_retries: how often a record whose (Ray) worker died is tried again.
        deadline: seconds after which the sweep stops, dropping the lines in flight (a re-run
            continues); None: no limit.
        progress: one progress bar on stderr.
    """

    variants: tuple[Variant, ...]
    out: str | os.PathLike
    selection: RecordSelection = field(default_factory=RecordSelection)
    batch_size: int = 32
    fluency: Any = None
    max_retries: int = 2
    deadline: float | None = None
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "variants", tuple(self.variants))
        if not self.variants:
            raise SweepError("variants is empty: a sweep needs at least one variant", fields=("variants",))
        names = [v.name for v in self.variants]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise SweepError(f"variant {twice[0]!r} is given twice; each variant writes its own run file")
        if self.batch_size < 1:
            raise SweepError(f"batch_size must be >= 1, got {self.batch_size}", fields=("batch_size",))
        if self.max_retries < 0:
            raise SweepError(f"max_retries must be >= 0, got {self.max_retries}", fields=("max_retries",))
        if self.deadline is not None and self.deadline <= 0:
            raise SweepError(f"deadline must be > 0 seconds, got {self.deadline}", fields=("deadline",))

    def path(self, variant: Variant) -> Path:
        return Path(self.out) / f"{variant.name}.jsonl"


@dataclass(frozen=True)
class SweepOutcome:
    """What :func:`run_sweep` did.

    Args:
        out: the run files' folder.
        written: lines written, per variant name.
        skipped: lines already in the files, per variant name.
        retried: tasks run again because their (Ray) worker died.
        seconds: wall time of the whole sweep.
        complete: False when the deadline stopped it before every line was written.
    """

    out: Path
    written: dict[str, int]
    skipped: dict[str, int]
    retried: int
    seconds: float
    complete: bool = True


@dataclass(eq=False)
class _Task(Task):
    """One line to make; with ``write`` False only a record's pre-edit scores; without a record
    the statistics step (:meth:`~attention_drift.runs.executor.Worker.prepare`). The plan sets
    the worker call (``method``, ``args``, ``kwargs``) when it hands the task out."""

    record: Any = None
    variant: Variant | None = None
    write: bool = True
    gives_pre: bool = False

    @property
    def prepare(self) -> bool:
        return self.record is None

    @property
    def cid(self) -> str:
        return json.dumps(self.record.case_id)

    def describe(self) -> str:
        if self.prepare:
            return "the statistics step"
        what = "pre-edit scores" if not self.write else f"variant {self.variant.name!r}"
        return f"record {self.record.case_id!r} ({what})"


class _Plan:
    """Which lines are left, in which order, and which wait for pre-edit scores or statistics:
    an :mod:`executor <attention_drift.runs.executor>` plan (``next`` / ``done`` / ``again``),
    told each result with :meth:`finished`."""

    def __init__(self, records: Sequence, variants: Sequence[Variant], files: dict, pre: dict[str, dict], *,
                 batch_size: int = 32, fluency=None, progress: bool = False):
        self.pre = pre
        self.editing = [v for v in variants if v.edits]
        self.options = {"batch_size": batch_size, "fluency": fluency}
        self.progress = progress
        self.waiting: dict[str, list[_Task]] = {}
        self.ready: deque[_Task] = deque()
        self.pre_tasks: deque[_Task] = deque()
        self.parked: list[_Task] = []
        self.keys: dict[str, str | None] | None = None if self.editing else {}
        self.prepare_task = _Task(write=False)
        self.prepare_pending = self.keys is None
        self.lines = 0
        self.out = 0
        self.retried = 0
        for record in records:
            tasks = [_Task(record=record, variant=v) for v in variants
                     if not files[v.name].done(record.case_id, v.method)]
            self.lines += len(tasks)
            if not tasks:
                continue
            cid = tasks[0].cid
            if cid in pre:
                self._release(tasks)
                continue
            first = next((t for t in tasks if not t.variant.edits), None)
            if first is None:
                first = _Task(record=record, variant=Variant(NONE), write=False)
            else:
                tasks.remove(first)
            first.gives_pre = True
            self.pre_tasks.append(first)
            self.waiting[cid] = tasks
        if not self.lines:  # nothing to write: no statistics either (and no worker starts)
            self.prepare_pending = False

    @property
    def tasks(self) -> int:
        """Tasks left to hand out: the lines, the pre-only passes and the statistics step."""
        return self.lines + sum(not t.write for t in self.pre_tasks) + self.prepare_pending

    def _release(self, tasks: list[_Task]) -> None:
        for task in tasks:
            (self.parked if task.variant.edits and self.keys is None else self.ready).append(task)

    def _take(self) -> _Task | None:
        """The statistics step first, then lines whose inputs are ready, then pre-edit passes."""
        if self.prepare_pending:
            self.prepare_pending = False
            return self.prepare_task
        if self.ready:
            return self.ready.popleft()
        if self.pre_tasks:
            return self.pre_tasks.popleft()
        return None

    def next(self) -> _Task | None:
        task = self._take()
        if task is None:
            return None
        self.out += 1
        if task.prepare:
            task.method, task.args, task.kwargs = "prepare", (self.editing, self.progress), {}
        else:
            pre = None if task.gives_pre else self.pre[task.cid]
            task.method, task.args = "evaluate", (task.record, task.variant)
            task.kwargs = {**self.options, "pre": pre, "key": (self.keys or {}).get(task.variant.name)}
        return task

    def prepared(self, keys: dict[str, str | None]) -> None:
        self.keys = keys
        self.ready.extend(self.parked)
        self.parked = []

    def got_pre(self, task: _Task, pre: dict) -> None:
        self.pre[task.cid] = pre
        self._release(self.waiting.pop(task.cid, []))

    def finished(self, task: _Task, result) -> None:
        """``task`` came back with ``result`` (keys of the statistics step, or a run line)."""
        self.out -= 1
        if task.prepare:
            self.prepared(result)
        elif task.gives_pre:
            self.got_pre(task, result["pre"])

    def again(self, task: _Task) -> None:
        """Put a task whose worker died back at the front of its queue."""
        self.out -= 1
        self.retried += 1
        if task.prepare:
            self.prepare_pending = True
        else:
            (self.pre_tasks if task.gives_pre else self.ready).appendleft(task)

    def done(self) -> bool:
        return not (self.out or self.prepare_pending or self.ready or self.pre_tasks or self.parked or self.waiting)


def _known_pre(config: SweepConfig, metas: dict[str, dict]) -> dict[str, dict]:
    """Pre-edit scores already in the run files (same model, data and fluency settings)."""
    from attention_drift.runs.evaluation import reused_pre

    pre: dict[str, dict] = {}
    for variant in config.variants:
        if config.path(variant).is_file():
            for cid, scores in reused_pre(config.path(variant), metas[variant.name]).items():
                pre.setdefault(cid, scores)
    return pre


def _check_keys(config: SweepConfig, keys: dict[str, str | None]) -> None:
    """Refuse to append to a run file written with another resolved edit configuration."""
    for variant in config.variants:
        check_edit_key(config.path(variant), keys.get(variant.name))


def run_sweep(config: SweepConfig, where: Executor | Placement, *,
              on_line: Callable[[str, dict], None] | None = None) -> SweepOutcome:
    """Evaluate the selected records under every variant of ``config`` into ``out/<variant>.jsonl``
    (resuming them), with the model and on the workers of ``where`` (a
    :class:`~attention_drift.runs.placement.Placement` or an
    :class:`~attention_drift.runs.executor.Executor`, e.g. one with an instrumented worker
    class). ``on_line(variant name, line)`` is called after each line is written."""
    from attention_drift.core.jsonl import RunFile
    from tqdm.auto import tqdm

    start = time.perf_counter()
    executor = as_executor(where)
    out = Path(config.out)
    check_writable(out, folder=True)
    records = config.selection.load()
    model = executor.placement.model
    metas = {v.name: run_meta(model, v, config.selection, config.fluency) for v in config.variants}
    with ExitStack() as stack:
        files = {v.name: stack.enter_context(RunFile(config.path(v), metas[v.name])) for v in config.variants}
        skipped = {v.name: sum(files[v.name].done(r.case_id, v.method) for r in records) for v in config.variants}
        written = dict.fromkeys(files, 0)
        plan = _Plan(records, config.variants, files, _known_pre(config, metas), batch_size=config.batch_size,
                     fluency=config.fluency, progress=config.progress)
        stop_at = None if config.deadline is None else start + config.deadline
        workers = 1 if executor.in_process else min(executor.placement.workers, plan.tasks)
        bar = tqdm(total=plan.lines, desc=f"sweep ({workers} worker{'s' * (workers != 1)})", unit="line",
                   file=sys.stderr, disable=not config.progress or not plan.lines, dynamic_ncols=True)
        try:
            with closing(executor.run(plan, stop_at=stop_at, max_retries=config.max_retries)) as results:
                for task, result in results:
                    if task.prepare:
                        _check_keys(config, result)
                    elif task.write and not files[task.variant.name].done(task.record.case_id, task.variant.method):
                        files[task.variant.name].write(result)
                        written[task.variant.name] += 1
                        bar.update(1)
                        if on_line is not None:
                            on_line(task.variant.name, result)
                    plan.finished(task, result)
                    if plan.retried:
                        bar.set_postfix(retried=plan.retried)
        finally:
            bar.close()
    return SweepOutcome(out, written, skipped, plan.retried, time.perf_counter() - start, plan.done())

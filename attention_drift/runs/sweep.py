"""Sweeps: records x variants as Ray tasks, into one resumable run file per variant.

``run_sweep(SweepConfig(model, variants, out, ...))`` evaluates every selected record under
every variant and writes ``OUT/<variant>.jsonl``, the run files of ``attention-drift evaluate``
(same header, same lines: each line is made by :func:`attention_drift.runs.evaluation.evaluate_record_line`,
so a record gives the same numbers with and without Ray), which ``attention-drift compare``
reads.

How the work is spread:

* Workers are Ray actors (:class:`SweepWorker`), each holding one model for the whole sweep,
  one torch thread each (``threads``), ``gpus_per_worker`` of a GPU each with ``device="cuda"``
  (16 workers on one GPU: 0.0625). A local Ray with ``workers`` CPUs is started unless
  ``address`` names a cluster to join or Ray is already initialised in this process.
* The covariance statistics of every editing variant are computed once, by the first worker,
  before any edit runs (the other workers meanwhile score records pre-edit); the others read
  them from the disk cache (:mod:`attention_drift.editing.stats`; on a multi-node cluster
  each node without a shared cache fills its own).
* Pre-edit scores are computed once per record: by the first non-editing variant (e.g.
  ``none``) when the sweep has one, else by a pre-only pass; every editing variant of the
  record reuses them, as ``evaluate --reuse-pre`` does. Records already in a file lend theirs.
* The driver is the only writer: actors return lines and the driver appends them with
  :class:`~attention_drift.core.jsonl.RunFile`, so a line is never written twice. A worker that dies
  is replaced and its record retried (at most ``max_retries`` times) on whichever worker is
  free first. Interrupted sweeps (Ctrl-C, a kill, an error, the ``deadline``) resume when
  re-run: records in the files are skipped.
"""

import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attention_drift.core.errors import AttentionDriftError
from attention_drift.runs.evaluation import (
    ModelHandle,
    RecordSelection,
    check_edit_key,
    check_writable,
    edit_key,
    evaluate_record_line,
    run_meta,
)
from attention_drift.runs.variants import NONE, Variant

FORWARDED_ENV = ("ATTENTION_DRIFT_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Environment variables of the driver that the workers get too (where the caches are, offline mode);
on a cluster of several machines the paths must exist on each."""


class SweepError(AttentionDriftError):
    """A sweep that cannot start or go on; the message says what to change."""


@dataclass(frozen=True)
class SweepConfig:
    """One sweep: a model, its variants, the records, and how the work is spread.

    Args:
        model: model name or path, as ``attention-drift evaluate --model`` (also what the run
            headers record); every worker must be able to load it.
        variants: the variants, one run file ``out/<name>.jsonl`` each (names unique).
        out: the folder of the run files.
        selection: which records.
        workers: Ray actors, each with its own copy of the model.
        address: a Ray cluster to join (``ray.init(address=...)``); None: start a local Ray
            with ``workers`` CPUs (or use the one this process already initialised).
        device: the workers' torch device (``"cuda"`` for GPUs).
        dtype: the model weights' dtype name (edit maths stays float32).
        gpus_per_worker: Ray GPU share per worker (``num_gpus``); None: 0 on CPU, else the
            cluster's GPUs split evenly over the workers (at most 1 each).
        threads: torch threads per worker.
        batch_size: sequences per forward pass.
        fluency: a :class:`~attention_drift.measure.evaluate.FluencyConfig` to also score
            generations, or None.
        max_retries: how often a record whose worker died is tried again.
        deadline: seconds after which the sweep stops, dropping the lines in flight (a re-run
            continues); None: no limit.
        progress: one progress bar on stderr.
    """

    model: str
    variants: tuple[Variant, ...]
    out: str | os.PathLike
    selection: RecordSelection = field(default_factory=RecordSelection)
    workers: int = 1
    address: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    gpus_per_worker: float | None = None
    threads: int = 1
    batch_size: int = 32
    fluency: Any = None
    max_retries: int = 2
    deadline: float | None = None
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "variants", tuple(self.variants))
        if not self.variants:
            raise SweepError("a sweep needs at least one variant (e.g. --variants none,rome)")
        names = [v.name for v in self.variants]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise SweepError(f"variant {twice[0]!r} is given twice; each variant writes its own run file")
        for name in ("workers", "threads", "batch_size"):
            if getattr(self, name) < 1:
                raise SweepError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise SweepError(f"--max-retries must be >= 0, got {self.max_retries}")
        if self.deadline is not None and self.deadline <= 0:
            raise SweepError(f"--deadline must be > 0 seconds, got {self.deadline}")
        if self.gpus_per_worker is not None:
            if self.gpus_per_worker < 0:
                raise SweepError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
            if self.gpus_per_worker > 0 and not self.device.startswith("cuda"):
                raise SweepError("--gpus-per-worker gives workers GPUs they would not use: add --device cuda")

    def path(self, variant: Variant) -> Path:
        return Path(self.out) / f"{variant.name}.jsonl"


@dataclass(frozen=True)
class SweepOutcome:
    """What :func:`run_sweep` did.

    Args:
        out: the run files' folder.
        written: lines written, per variant name.
        skipped: lines already in the files, per variant name.
        retried: tasks run again because their worker died.
        seconds: wall time of the whole sweep.
        complete: False when the deadline stopped it before every line was written.
    """

    out: Path
    written: dict[str, int]
    skipped: dict[str, int]
    retried: int
    seconds: float
    complete: bool = True


class SweepWorker:
    """What one Ray actor holds: a model loaded on first use and kept for the whole sweep.

    Subclass it to instrument workers (pass the subclass to :func:`run_sweep`).
    """

    def __init__(self, model: str, device: str = "cpu", dtype: str = "float32", threads: int = 1,
                 env: dict[str, str] | None = None):
        os.environ.update(env or {})
        import torch

        torch.set_num_threads(threads)
        self.handle = ModelHandle(model, device=device, dtype=dtype)
        self._resolved: dict[Variant, tuple] = {}

    def resolve(self, variant: Variant) -> tuple:
        if variant not in self._resolved:
            self._resolved[variant] = variant.resolve(self.handle.get())
        return self._resolved[variant]

    def prepare(self, variants: Sequence[Variant], progress: bool = False) -> dict[str, str | None]:
        """Compute (or load) the covariance statistics of every editing variant, so they are in
        the disk cache before other workers edit; returns ``{name: edit_key}``."""
        from attention_drift.editing.stats import key_second_moments

        model = self.handle.get()
        keys = {}
        for variant in variants:
            resolved = self.resolve(variant)
            config = resolved[0]
            if config is not None:
                key_second_moments(model, config.layers, config.stats, progress=progress)
            keys[variant.name] = edit_key(model, variant, resolved)
        return keys

    def evaluate(self, record, variant: Variant, *, batch_size: int = 32, fluency=None, pre: dict | None = None,
                 key: str | None = None) -> dict:
        """The record's run line (:func:`~attention_drift.runs.evaluation.evaluate_record_line`)."""
        return evaluate_record_line(self.handle.get(), record, variant, self.resolve(variant), batch_size=batch_size,
                                    fluency=fluency, pre=pre, key=key)


@dataclass
class _Task:
    """One line to make; with ``write`` False only a record's pre-edit scores; without a record
    the statistics step (:meth:`SweepWorker.prepare`)."""

    record: Any = None
    variant: Variant | None = None
    write: bool = True
    gives_pre: bool = False
    attempts: int = 0

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
    """Which lines are left, in which order, and which wait for pre-edit scores or statistics."""

    def __init__(self, records: Sequence, variants: Sequence[Variant], files: dict, pre: dict[str, dict]):
        self.pre = pre
        self.waiting: dict[str, list[_Task]] = {}
        self.ready: deque[_Task] = deque()
        self.pre_tasks: deque[_Task] = deque()
        self.parked: list[_Task] = []
        self.keys: dict[str, str | None] | None = None if any(v.edits for v in variants) else {}
        self.prepare_task = _Task(write=False)
        self.prepare_pending = self.keys is None
        self.lines = 0
        for record in records:
            tasks = [_Task(record, v) for v in variants if not files[v.name].done(record.case_id, v.method)]
            self.lines += len(tasks)
            if not tasks:
                continue
            cid = tasks[0].cid
            if cid in pre:
                self._release(tasks)
                continue
            first = next((t for t in tasks if not t.variant.edits), None)
            if first is None:
                first = _Task(record, Variant(NONE), write=False)
            else:
                tasks.remove(first)
            first.gives_pre = True
            self.pre_tasks.append(first)
            self.waiting[cid] = tasks

    def _release(self, tasks: list[_Task]) -> None:
        for task in tasks:
            (self.parked if task.variant.edits and self.keys is None else self.ready).append(task)

    def next(self) -> _Task | None:
        """The statistics step first, then lines whose inputs are ready, then pre-edit passes."""
        if self.prepare_pending:
            self.prepare_pending = False
            return self.prepare_task
        if self.ready:
            return self.ready.popleft()
        if self.pre_tasks:
            return self.pre_tasks.popleft()
        return None

    def prepared(self, keys: dict[str, str | None]) -> None:
        self.keys = keys
        self.ready.extend(self.parked)
        self.parked = []

    def got_pre(self, task: _Task, pre: dict) -> None:
        self.pre[task.cid] = pre
        self._release(self.waiting.pop(task.cid, []))

    def again(self, task: _Task) -> None:
        """Put a task whose worker died back at the front of its queue."""
        if task.prepare:
            self.prepare_pending = True
        else:
            (self.pre_tasks if task.gives_pre else self.ready).appendleft(task)


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


def _import_ray():
    try:
        import ray
    except ImportError:
        raise SweepError("sweeps run on Ray, which is not installed: pip install 'ray>=2.10,<3'") from None
    return ray


@contextmanager
def ray_session(workers: int, address: str | None = None) -> Iterator[Any]:
    """Ray for a sweep: the one already initialised in this process, else a cluster joined at
    ``address`` (``"auto"``: the one running on this machine), else a new local Ray with
    ``workers`` CPUs (shut down on exit when started here)."""
    import logging

    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        options = {"logging_level": logging.WARNING, "include_dashboard": False}
        if address:
            _check_reachable(address)
        try:
            if address:
                ray.init(address=address, **options)
            else:  # a new local Ray even where one runs already (--address auto joins that one)
                ray.init(address="local", num_cpus=workers, **options)
        except ConnectionError as err:
            raise SweepError(f"cannot join the Ray cluster at --address {address!r}: {err}; start it with "
                             "'ray start --head' or leave --address out for a local Ray") from None
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail at once where nothing listens at a ``HOST:PORT`` address (Ray would retry for minutes)."""
    import re
    import socket

    match = re.fullmatch(r"([\w.-]+):(\d+)", address)
    if match is None:
        return
    try:
        socket.create_connection((match.group(1), int(match.group(2))), timeout=5).close()
    except OSError as err:
        raise SweepError(f"nothing answers at --address {address} ({err.strerror or err}); start the cluster with "
                         "'ray start --head', or leave --address out for a local Ray") from None


def _gpus(config, ray) -> float:
    """The GPU share per worker of a :class:`SweepConfig` or :class:`Workers`."""
    available = ray.cluster_resources().get("GPU", 0.0)
    if not config.device.startswith("cuda"):
        return 0.0
    if available <= 0:
        raise SweepError(f"--device {config.device} but the Ray cluster has no GPU; use --device cpu")
    share = config.gpus_per_worker if config.gpus_per_worker is not None else min(1.0, available / config.workers)
    if share * config.workers > available + 1e-9:
        raise SweepError(f"{config.workers} workers x {share} GPU need {share * config.workers:g} GPUs, the Ray "
                         f"cluster has {available:g}; lower --workers or --gpus-per-worker")
    return share


def _get(ray, ref, what: str):
    """``ray.get(ref)``, a library error of the task raised as a :class:`SweepError` naming ``what``
    (a dead worker's error passes unchanged)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, AttentionDriftError):
            raise SweepError(f"{what}: {cause}") from cause
        raise


def _gave_up(what: str, attempts: int, err: Exception, done: str) -> SweepError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return SweepError(f"{what} failed {attempts} time(s): its worker died each time (last: {reason}); {done} so far "
                      "are written, re-run to resume")


def _died_errors(ray) -> tuple:
    """The Ray errors that mean the worker (not the record) failed."""
    names = ("RayActorError", "WorkerCrashedError", "ObjectLostError", "OutOfMemoryError", "NodeDiedError")
    return tuple(getattr(ray.exceptions, name) for name in names if hasattr(ray.exceptions, name))


def run_sweep(config: SweepConfig, *, worker_class: type = SweepWorker,
              on_line: Callable[[str, dict], None] | None = None) -> SweepOutcome:
    """Evaluate the selected records under every variant of ``config`` on Ray workers into
    ``out/<variant>.jsonl`` (resuming them). ``worker_class`` is the actor class (a
    :class:`SweepWorker`); ``on_line(variant name, line)`` is called after each line is written."""
    from attention_drift.core.jsonl import RunFile

    start = time.perf_counter()
    out = Path(config.out)
    check_writable(out, folder=True)
    records = config.selection.load()
    metas = {v.name: run_meta(config.model, v, config.selection, config.fluency) for v in config.variants}
    with ExitStack() as stack:
        files = {v.name: stack.enter_context(RunFile(config.path(v), metas[v.name])) for v in config.variants}
        skipped = {v.name: sum(files[v.name].done(r.case_id, v.method) for r in records) for v in config.variants}
        written = dict.fromkeys(files, 0)
        plan = _Plan(records, config.variants, files, _known_pre(config, metas))
        retried, complete = 0, True
        if plan.lines:
            stop_at = None if config.deadline is None else start + config.deadline
            with ray_session(config.workers, config.address) as ray:
                retried, complete = _drive(ray, config, plan, files, written, worker_class, on_line, stop_at)
    return SweepOutcome(out, written, skipped, retried, time.perf_counter() - start, complete)


def _drive(ray, config: SweepConfig, plan: _Plan, files: dict, written: dict, worker_class: type,
           on_line: Callable[[str, dict], None] | None, stop_at: float | None) -> tuple[int, bool]:
    """The scheduling loop: hand tasks to idle workers, write what comes back, replace workers
    that die, stop at ``stop_at`` (a ``time.perf_counter()``). Returns (tasks retried, whether
    every task was done)."""
    from tqdm.auto import tqdm

    gpus = _gpus(config, ray)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    remote = ray.remote(worker_class).options(num_cpus=1, num_gpus=gpus, max_restarts=0, max_task_retries=0)

    def spawn():
        return remote.remote(config.model, config.device, config.dtype, config.threads, env)

    editing = [v for v in config.variants if v.edits]
    n_tasks = plan.lines + sum(not t.write for t in plan.pre_tasks) + plan.prepare_pending
    idle = deque(spawn() for _ in range(min(config.workers, n_tasks)))
    inflight: dict = {}
    retried = 0
    bar = tqdm(total=plan.lines, desc=f"sweep ({len(idle)} workers)", unit="line", file=sys.stderr,
               disable=not config.progress, dynamic_ncols=True)
    died = _died_errors(ray)
    try:
        while True:
            while idle and (task := plan.next()) is not None:
                actor = idle.popleft()
                if task.prepare:
                    ref = actor.prepare.remote(editing, config.progress)
                else:
                    pre = None if task.gives_pre else plan.pre[task.cid]
                    ref = actor.evaluate.remote(task.record, task.variant, batch_size=config.batch_size,
                                                fluency=config.fluency, pre=pre,
                                                key=(plan.keys or {}).get(task.variant.name))
                inflight[ref] = (actor, task)
            if not inflight:
                break
            if stop_at is not None and time.perf_counter() > stop_at:
                return retried, False
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            if not done:
                continue
            actor, task = inflight.pop(done[0])
            try:
                result = _get(ray, done[0], task.describe())
            except died as err:
                ray.kill(actor)
                task.attempts += 1
                if task.attempts > config.max_retries:
                    raise _gave_up(task.describe(), task.attempts, err, "the lines done") from None
                idle.append(spawn())
                retried += 1
                plan.again(task)
                bar.set_postfix(retried=retried)
                continue
            idle.append(actor)
            if task.prepare:
                _check_keys(config, result)
                plan.prepared(result)
                continue
            if task.write and not files[task.variant.name].done(task.record.case_id, task.variant.method):
                files[task.variant.name].write(result)
                written[task.variant.name] += 1
                bar.update(1)
                if on_line is not None:
                    on_line(task.variant.name, result)
            if task.gives_pre:
                plan.got_pre(task, result["pre"])
    finally:
        bar.close()
        for actor, _ in inflight.values():
            ray.kill(actor)
        for actor in idle:
            ray.kill(actor)
    return retried, True


# =============================================================================================
# per-record analyses (drift, patching) on the same workers


class AnalysisWorker(SweepWorker):
    """A :class:`SweepWorker` that also runs a per-record measurement ``fn(model, edit_fn_factory,
    record)`` under a variant's editor (built once per variant and edit cache)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._editors: dict[tuple, Callable] = {}

    def measure(self, fn: Callable, record, variant: Variant, edit_cache: str | None = None):
        key = (variant, edit_cache)
        editors = self._editors
        if key not in editors:
            model = self.handle.get()
            cache = None
            if edit_cache is not None:
                from attention_drift.editing.cache import EditCache

                cache = EditCache(model, edit_cache, progress=False)
            editors[key] = variant.editor(model, cache=cache, progress=False)
        return fn(self.handle.get(), editors[key], record)


@dataclass(frozen=True)
class Workers:
    """Ray workers for a per-record analysis (``attention-drift drift / patch / figures --workers N``).

    Each worker is an actor that loads ``model`` once and keeps it (with the variant's editor and
    statistics) across records; the statistics are computed once, by the first worker, before
    the records fan out. Results come back to the caller, the only writer of the run files. A
    record whose worker dies is tried again on a new worker (at most ``max_retries`` times).

    Args:
        model: model name or path every worker can load.
        variant: the editing variant the records are measured under.
        workers: actors (a local Ray with that many CPUs is started unless ``address`` is given
            or Ray is initialised already).
        address: a Ray cluster to join; None: local.
        device, dtype, gpus_per_worker, threads: as :class:`SweepConfig`.
        edit_cache: an edit-cache folder the workers replay stored edits from (shared disk).
        max_retries: tries again per record after its worker died.
        progress: the statistics' progress bar.
    """

    model: str
    variant: Variant
    workers: int = 2
    address: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    gpus_per_worker: float | None = None
    threads: int = 1
    edit_cache: str | None = None
    max_retries: int = 2
    progress: bool = False

    def __post_init__(self):
        if self.workers < 1 or self.threads < 1:
            raise SweepError(f"--workers and --threads must be >= 1, got {self.workers} and {self.threads}")
        if self.max_retries < 0:
            raise SweepError(f"--max-retries must be >= 0, got {self.max_retries}")
        if not self.variant.edits:
            raise SweepError("an analysis on workers needs an editing variant (--method rome, memit or pmet)")

    def map(self, records: Sequence, fn: Callable, *, worker_class: type = AnalysisWorker) -> Iterator[tuple[Any, Any]]:
        """``(record, fn(model, edit_fn_factory, record))`` for every record, in the order they
        finish. ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one)."""
        records = list(records)
        if not records:
            return
        with ray_session(self.workers, self.address) as ray:
            yield from self._drive(ray, records, fn, worker_class)

    def _drive(self, ray, records: list, fn: Callable, worker_class: type) -> Iterator[tuple[Any, Any]]:
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        remote = ray.remote(worker_class).options(num_cpus=1, num_gpus=_gpus(self, ray), max_restarts=0,
                                                  max_task_retries=0)

        def spawn():
            return remote.remote(self.model, self.device, self.dtype, self.threads, env)

        died = _died_errors(ray)
        idle = deque([spawn()])
        queue = deque((record, 0) for record in records)
        inflight: dict = {}
        try:
            try:
                _get(ray, idle[0].prepare.remote([self.variant], self.progress), "the statistics step")
            except died as err:
                raise SweepError(f"the worker computing the statistics died ({err}); re-run to resume") from None
            idle.extend(spawn() for _ in range(min(self.workers, len(records)) - 1))
            while queue or inflight:
                while idle and queue:
                    record, attempts = queue.popleft()
                    actor = idle.popleft()
                    ref = actor.measure.remote(fn, record, self.variant, self.edit_cache)
                    inflight[ref] = (actor, record, attempts)
                done, _ = ray.wait(list(inflight), num_returns=1)
                actor, record, attempts = inflight.pop(done[0])
                try:
                    result = _get(ray, done[0], f"record {record.case_id!r}")
                except died as err:
                    ray.kill(actor)
                    if attempts + 1 > self.max_retries:
                        raise _gave_up(f"record {record.case_id!r}", attempts + 1, err, "the records done") from None
                    idle.append(spawn())
                    queue.appendleft((record, attempts + 1))
                    continue
                idle.append(actor)
                yield record, result
        finally:
            for actor, _, _ in inflight.values():
                ray.kill(actor)
            for actor in idle:
                ray.kill(actor)

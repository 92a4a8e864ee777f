"""Where work runs: one executor for sweeps, drift, patching and figures.

``Executor(placement)`` runs tasks on workers that each hold the placement's model
(:class:`Worker`): in this process when the :class:`~attention_drift.runs.placement.Placement`
has one worker and no Ray address (no Ray at all), else on Ray actors. Either way the caller
gets the same results, and it is the only one that writes them anywhere.

What to run comes as a *plan* (any object with these three methods):

* ``next()``: the next :class:`Task` to hand to an idle worker, or None when none can start
  now (the rest wait for results in flight);
* ``done()``: True when nothing is left to hand out or to wait for;
* ``again(task)``: take back a task whose worker died, to hand out again.

:meth:`Executor.run` drives a plan and yields ``(task, result)`` as results come; the caller
tells its plan what a result means (which tasks it unblocks, and that the task is finished)
before the loop asks the plan for more. :meth:`Executor.map` is the trivial plan: one task per
item, optionally after a ``first`` step that runs once before the items fan out (the analyses'
covariance statistics); a sweep's plan (statistics first, pre-edit scores once per record,
:mod:`attention_drift.runs.sweep`) runs on the same loop.

On Ray (the package's one scheduling loop, :meth:`Executor.run`): actors are started as tasks
become ready, up to ``placement.workers``, each with ``num_cpus=1``, its GPU share and
:meth:`~attention_drift.runs.placement.Placement.worker_threads` torch threads; a local Ray with
``workers`` CPUs is started unless the placement names a cluster or Ray is already initialised in
this process. A worker that dies is replaced and its task handed out again (at most
``max_retries`` times); a library error of a task stops the run as an :class:`ExecutorError`
naming the task; at ``stop_at`` the run stops, dropping the results in flight. In this process
tasks run one after another in the plan's order, ``stop_at`` is checked between them, and a
task's error propagates as it is (nothing is retried: a dying worker is this process).
"""

import functools
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any

from attention_drift.core.errors import AttentionDriftError
from attention_drift.runs.evaluation import ModelHandle, edit_key, evaluate_record_line
from attention_drift.runs.placement import Placement, PlacementError
from attention_drift.runs.variants import Variant

FORWARDED_ENV = ("ATTENTION_DRIFT_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Environment variables of the driver that Ray workers get too (where the caches are, offline
mode); on a cluster of several machines the paths must exist on each."""


class ExecutorError(AttentionDriftError):
    """Work that cannot go on (a task's library error, a worker that keeps dying); the message
    names the task and says what to do."""


class Worker:
    """What one worker holds: the placement's model, loaded on first use and kept for every
    task, with the variants' resolved configurations and editors.

    In this process it is a plain object; on Ray each actor holds one. Subclass it to
    instrument workers (``Executor(placement, worker_class=...)``).

    Args:
        placement: the model to load (name, device, dtype).
        threads: torch threads to set (None: leave them as they are).
        env: environment variables to set first (the driver's caches, offline mode).
        model: an already loaded model to use instead (in this process only).
    """

    def __init__(self, placement: Placement, *, threads: int | None = None, env: dict[str, str] | None = None,
                 model=None):
        os.environ.update(env or {})
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        self.placement = placement
        self.handle = ModelHandle(placement, model=model)
        self._resolved: dict[Variant, tuple] = {}
        self._editors: dict[tuple, Callable] = {}

    @property
    def model(self):
        return self.handle.get()

    def resolve(self, variant: Variant) -> tuple:
        if variant not in self._resolved:
            self._resolved[variant] = variant.resolve(self.model)
        return self._resolved[variant]

    def prepare(self, variants: Sequence[Variant], progress: bool = False) -> dict[str, str | None]:
        """Compute (or load) the covariance statistics of every editing variant, so they are in
        the disk cache before other workers edit; returns ``{name: edit_key}``."""
        from attention_drift.editing.stats import key_second_moments

        keys = {}
        for variant in variants:
            resolved = self.resolve(variant)
            config = resolved[0]
            if getattr(config, "stats", None) is not None:  # FT uses no statistics
                key_second_moments(self.model, config.layers, config.stats, progress=progress)
            keys[variant.name] = edit_key(self.model, variant, resolved)
        return keys

    def evaluate(self, record, variant: Variant, *, batch_size: int = 32, fluency=None, pre: dict | None = None,
                 key: str | None = None) -> dict:
        """The record's run line (:func:`~attention_drift.runs.evaluation.evaluate_record_line`)."""
        return evaluate_record_line(self.model, record, variant, self.resolve(variant), batch_size=batch_size,
                                    fluency=fluency, pre=pre, key=key)

    def editor(self, edit, edit_cache: str | None = None, progress: bool = False):
        """The editor (``record -> edit context``) of ``edit`` over this worker's model: a
        :class:`~attention_drift.runs.variants.Variant`'s, built once per variant and edit cache
        (stored edits replayed from the ``edit_cache`` folder); anything else is an editor
        already built (in this process) and returned as it is."""
        if not isinstance(edit, Variant):
            return edit
        key = (edit, edit_cache)
        if key not in self._editors:
            cache = None
            if edit_cache is not None:
                from attention_drift.editing.cache import EditCache

                cache = EditCache(self.model, edit_cache, progress=progress)
            self._editors[key] = edit.editor(self.model, cache=cache, progress=progress)
        return self._editors[key]

    def measure(self, fn: Callable, record, edit, edit_cache: str | None = None, progress: bool = False):
        """``fn(model, editor, record)`` under :meth:`editor` of ``edit``."""
        return fn(self.model, self.editor(edit, edit_cache, progress), record)

    def call(self, fn: Callable, *args):
        """``fn(self, *args)``: what :meth:`Executor.map` runs."""
        return fn(self, *args)


@dataclass(eq=False)
class Task:
    """One call of a worker method: ``worker.<method>(*args, **kwargs)``.

    Args:
        method: the :class:`Worker` method.
        args, kwargs: its arguments (picklable, for Ray).
        what: how errors name the task (``"record 3"``).
        item: what the plan made it for (:meth:`Executor.map`: the item).
        attempts: tries that ended with the worker dead (kept by the executor).
    """

    method: str = "call"
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    what: str = "a task"
    item: Any = None
    attempts: int = 0

    def describe(self) -> str:
        return self.what


def _what(item, index: int) -> str:
    case_id = getattr(item, "case_id", None)
    return f"record {case_id!r}" if case_id is not None else f"item {index}"


class _MapPlan:
    """One task per item, all of them after the ``first`` task (if any, and only with items) finished."""

    def __init__(self, items: Sequence, fn: Callable, first: Callable | None, first_what: str):
        self.todo = deque(Task("call", (fn, item), what=_what(item, i), item=item) for i, item in enumerate(items))
        self.first = None if first is None or not items else Task("call", (first,), what=first_what)
        self.first_pending = self.first is not None
        self.first_done = self.first is None
        self.out = 0

    def next(self) -> Task | None:
        if self.first_pending:
            self.first_pending = False
            self.out += 1
            return self.first
        if not self.first_done or not self.todo:
            return None
        self.out += 1
        return self.todo.popleft()

    def finished(self, task: Task) -> None:
        self.out -= 1
        if task is self.first:
            self.first_done = True

    def again(self, task: Task) -> None:
        self.out -= 1
        if task is self.first:
            self.first_pending = True
        else:
            self.todo.appendleft(task)

    def done(self) -> bool:
        return self.first_done and not self.todo and not self.out


def _prepare(variants: tuple, progress: bool, worker: Worker):
    return worker.prepare(variants, progress)


def _measure(fn: Callable, edit, edit_cache: str | None, progress: bool, worker: Worker, record):
    return worker.measure(fn, record, edit, edit_cache, progress)


class Executor:
    """Runs work where a :class:`~attention_drift.runs.placement.Placement` says (see the module).

    Args:
        placement: the model and the workers.
        worker_class: the :class:`Worker` (sub)class each worker is.

    In this process the one worker is made on first use (setting torch's threads to
    :meth:`~attention_drift.runs.placement.Placement.worker_threads`) and kept across runs, so
    consecutive runs share its model; Ray actors live for one run.
    """

    def __init__(self, placement: Placement, *, worker_class: type = Worker):
        if not isinstance(placement, Placement):
            raise ExecutorError(f"an Executor needs a Placement, got {type(placement).__name__}")
        self.placement = placement
        self.worker_class = worker_class
        self._worker = None

    @classmethod
    def here(cls, model, *, worker_class: type = Worker) -> "Executor":
        """An executor in this process around an already loaded ``model`` (threads left as they are)."""
        executor = cls(Placement(str(getattr(model, "model_name", None) or "model")), worker_class=worker_class)
        executor._worker = worker_class(executor.placement, model=model)
        return executor

    def __repr__(self) -> str:
        return f"Executor({self.placement!r})"

    @property
    def in_process(self) -> bool:
        return self.placement.in_process

    @property
    def worker(self) -> Worker:
        """The worker of this process (in-process placements only)."""
        if not self.in_process:
            raise ExecutorError(f"{self.placement.workers} workers run on Ray; there is no worker in this process")
        if self._worker is None:
            self._worker = self.worker_class(self.placement, threads=self.placement.worker_threads())
        return self._worker

    def map(self, items: Iterable, fn: Callable, *, first: Callable | None = None,
            max_retries: int = 2) -> Iterator[tuple[Any, Any]]:
        """``(item, fn(worker, item))`` for every item: in item order in this process, in the order
        they finish on Ray. ``first(worker)``, when given, runs once before any item. On Ray, ``fn``
        and ``first`` must be picklable (module-level functions or ``functools.partial`` of them)."""
        return self._map(list(items), fn, first, "the first step", max_retries)

    def measure(self, records: Iterable, fn: Callable, edit, *, edit_cache: str | None = None,
                progress: bool = False, max_retries: int = 2) -> Iterator[tuple[Any, Any]]:
        """``(record, fn(model, editor, record))`` for every record, the editor being
        :meth:`Worker.editor` of ``edit``: a :class:`~attention_drift.runs.variants.Variant`, whose
        statistics the first worker computes before the records fan out (on Ray only a Variant
        works), or in this process an editor already built. ``progress``: the statistics' bars
        (and, in this process, the edits')."""
        if isinstance(edit, Variant):
            if not edit.edits:
                raise ExecutorError(f"measuring under an edit needs an editing variant, got {edit.name!r}")
            first = functools.partial(_prepare, (edit,), progress)
        elif not self.in_process:
            raise ExecutorError("workers on Ray need a Variant (each builds its editor over its own model), "
                                "not an editor function")
        else:
            first = None
        task = functools.partial(_measure, fn, edit, edit_cache, progress and self.in_process)
        return self._map(list(records), task, first, "the statistics step", max_retries)

    def _map(self, items: list, fn: Callable, first: Callable | None, first_what: str,
             max_retries: int) -> Iterator[tuple[Any, Any]]:
        plan = _MapPlan(items, fn, first, first_what)
        return _items(plan, self.run(plan, max_retries=max_retries))

    def run(self, plan, *, stop_at: float | None = None, max_retries: int = 2) -> Iterator[tuple[Task, Any]]:
        """Drive ``plan`` (see the module) to its end, or to ``stop_at`` (a ``time.perf_counter()``
        value; then ``plan.done()`` stays False), yielding ``(task, result)`` as results come.
        Nothing starts (no Ray, no model) when the plan is done already."""
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ExecutorError(f"max_retries must be >= 0, got {max_retries!r}", fields=("max_retries",))
        if plan.done():
            return _nothing()
        if self.in_process:
            return self._run_here(plan, stop_at)
        return self._run_on_ray(plan, stop_at, max_retries)

    def _run_here(self, plan, stop_at: float | None) -> Iterator[tuple[Task, Any]]:
        worker = self.worker
        while not plan.done():
            if stop_at is not None and time.perf_counter() > stop_at:
                return
            task = plan.next()
            if task is None:
                raise RuntimeError(f"{type(plan).__name__} is not done but has no task to hand out")
            yield task, getattr(worker, task.method)(*task.args, **task.kwargs)

    def _run_on_ray(self, plan, stop_at: float | None, max_retries: int) -> Iterator[tuple[Task, Any]]:
        """The scheduling loop: hand tasks to idle actors (starting actors as tasks become ready),
        yield what comes back, replace actors that die, stop at ``stop_at``."""
        placement = self.placement
        with ray_session(placement) as ray:
            remote = ray.remote(self.worker_class).options(num_cpus=1, num_gpus=_gpus(placement, ray),
                                                           max_restarts=0, max_task_retries=0)
            env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            threads = placement.worker_threads()
            died = _died_errors(ray)
            idle: deque = deque()
            inflight: dict = {}
            alive = 0
            try:
                while not plan.done():
                    while idle or alive < placement.workers:
                        task = plan.next()
                        if task is None:
                            break
                        if not idle:
                            idle.append(remote.remote(placement, threads=threads, env=env))
                            alive += 1
                        actor = idle.popleft()
                        inflight[getattr(actor, task.method).remote(*task.args, **task.kwargs)] = (actor, task)
                    if not inflight:
                        raise RuntimeError(f"{type(plan).__name__} is not done but has no task to hand out")
                    if stop_at is not None and time.perf_counter() > stop_at:
                        return
                    ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                    if not ready:
                        continue
                    actor, task = inflight.pop(ready[0])
                    try:
                        result = _get(ray, ready[0], task.describe())
                    except died as err:
                        ray.kill(actor)
                        alive -= 1
                        task.attempts += 1
                        if task.attempts > max_retries:
                            raise _gave_up(task.describe(), task.attempts, err) from None
                        plan.again(task)
                        continue
                    idle.append(actor)
                    yield task, result
            finally:
                for actor, _ in inflight.values():
                    ray.kill(actor)
                for actor in idle:
                    ray.kill(actor)


def _items(plan: _MapPlan, results: Iterator[tuple[Task, Any]]) -> Iterator[tuple[Any, Any]]:
    """``(item, result)`` of a map's results (the ``first`` step's left out)."""
    with closing(results):
        for task, result in results:
            plan.finished(task)
            if task is not plan.first:
                yield task.item, result


def _nothing() -> Iterator:
    yield from ()


def as_executor(where: "Executor | Placement") -> Executor:
    """``where`` itself, or an :class:`Executor` of a :class:`~attention_drift.runs.placement.Placement`."""
    return where if isinstance(where, Executor) else Executor(where)


# --- Ray ------------------------------------------------------------------------------------

def _import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError("more than one worker, or an address, runs on Ray, which is not installed: "
                            "pip install 'ray>=2.10,<3' (or use one worker and no address)",
                            fields=("address",)) from None
    return ray


@contextmanager
def ray_session(placement: Placement) -> Iterator[Any]:
    """Ray for ``placement``: the one already initialised in this process, else a cluster joined
    at its ``address`` (``"auto"``: the one running on this machine), else a new local Ray with
    ``workers`` CPUs (shut down on exit when started here)."""
    import logging

    ray = _import_ray()
    started = not ray.is_initialized()
    address = placement.address if placement.address != "local" else None
    if started:
        options = {"logging_level": logging.WARNING, "include_dashboard": False}
        if address:
            _check_reachable(address)
        try:
            if address:
                ray.init(address=address, **options)
            else:  # a new local Ray even where one runs already (address "auto" joins that one)
                ray.init(address="local", num_cpus=placement.workers, **options)
        except ConnectionError as err:
            raise PlacementError(f"cannot join the Ray cluster at address {address!r}: {err}; start it with "
                                 "'ray start --head', or give no address for a local Ray",
                                 fields=("address",)) from None
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
        raise PlacementError(f"nothing answers at address {address} ({err.strerror or err}); start the cluster "
                             "with 'ray start --head', or give no address for a local Ray",
                             fields=("address",)) from None


def _gpus(placement: Placement, ray) -> float:
    """The GPU share of each worker."""
    if not placement.on_gpu:
        return 0.0
    available = ray.cluster_resources().get("GPU", 0.0)
    if available <= 0:
        raise PlacementError(f"device {placement.device!r} but the Ray cluster has no GPU; use device 'cpu'",
                             fields=("device",))
    workers = placement.workers
    share = placement.gpus_per_worker if placement.gpus_per_worker is not None else min(1.0, available / workers)
    if share * workers > available + 1e-9:
        raise PlacementError(f"gpus_per_worker {share:g} for each of workers {workers} needs {share * workers:g} "
                             f"GPUs, the Ray cluster has {available:g}; lower workers or gpus_per_worker",
                             fields=("gpus_per_worker", "workers"))
    return share


def _get(ray, ref, what: str):
    """``ray.get(ref)``, a library error of the task raised as an :class:`ExecutorError` naming
    ``what`` (a dead worker's error passes unchanged)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, AttentionDriftError):
            raise ExecutorError(f"{what}: {cause}", fields=cause.fields) from cause
        raise


def _gave_up(what: str, attempts: int, err: Exception) -> ExecutorError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return ExecutorError(f"{what} failed {attempts} time(s): its worker died each time (last: {reason}); what was "
                         "done before is kept, re-run to resume")


def _died_errors(ray) -> tuple:
    """The Ray errors that mean the worker (not the task) failed."""
    names = ("RayActorError", "WorkerCrashedError", "ObjectLostError", "OutOfMemoryError", "NodeDiedError")
    return tuple(getattr(ray.exceptions, name) for name in names if hasattr(ray.exceptions, name))

"""Where a run's model lives and how its work is spread: one :class:`Placement` for every run.

Sweeps, drift, patching, figures and the command line all take the same value: which model,
on which device and in which dtype, with how many torch threads, on how many workers (and
which Ray cluster, and how much of a GPU each). :class:`~attention_drift.runs.executor.Executor`
runs the work where it says. Torch-free and Ray-free: the command line builds one from its
flags before anything heavy is imported.
"""

import math
import re
from dataclasses import dataclass

from attention_drift.core.dtypes import DTYPES, canonical_dtype
from attention_drift.core.errors import AttentionDriftError


class PlacementError(AttentionDriftError):
    """A placement that cannot be honoured (a bad value, or a cluster without what it names);
    the message says what to change, naming the :class:`Placement` field."""


_DEVICE = re.compile(r"[a-z][a-z0-9_]*(:\d+)?")


def _count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlacementError(f"{name} must be an integer >= {minimum}, got {value!r}", fields=(name,))
    if value < minimum:
        raise PlacementError(f"{name} must be >= {minimum}, got {value}", fields=(name,))


@dataclass(frozen=True)
class Placement:
    """Which model, where, and on how many workers.

    Args:
        model: model name or path (as :func:`attention_drift.core.models.load_model` takes it; also
            what run headers record); every worker must be able to load it.
        device: the torch device of the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        dtype: the weights' dtype, a name of :data:`attention_drift.core.dtypes.DTYPE_NAMES`
            (stored as its canonical name); edit maths stays float32 whatever it is.
        threads: torch threads per worker; None: in this process ``$OMP_NUM_THREADS``, else the
            cores idle right now (:func:`attention_drift.core.runtime.choose_threads`), and 1 on
            each Ray worker (see :meth:`worker_threads`).
        gpus_per_worker: Ray GPU share per worker (``num_gpus``; 16 workers on one GPU: 0.0625);
            None: 0 on CPU, else the cluster's GPUs split evenly over the workers (at most 1 each).
        workers: how many workers, each with its own copy of the model. 1 without ``address``:
            everything runs in this process, without Ray; more: Ray actors on a local Ray with
            ``workers`` CPUs (or the Ray this process already initialised).
        address: a Ray cluster to join (``ray.init(address=...)``): ``"auto"`` (the one running on
            this machine), ``"HOST:PORT"``, or ``"local"`` (a new local Ray, even for one worker);
            None: see ``workers``.
    """

    model: str
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    gpus_per_worker: float | None = None
    workers: int = 1
    address: str | None = None

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise PlacementError(f"model must be a model name or path, got {self.model!r}", fields=("model",))
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise PlacementError(f"device must look like 'cpu', 'cuda' or 'cuda:1', got {self.device!r}",
                                 fields=("device",))
        dtype = canonical_dtype(self.dtype)
        if dtype is None:
            raise PlacementError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}", fields=("dtype",))
        object.__setattr__(self, "dtype", dtype)
        if self.threads is not None:
            _count("threads", self.threads, 1)
        _count("workers", self.workers, 1)
        if self.gpus_per_worker is not None:
            share = self.gpus_per_worker
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share) or share < 0:
                raise PlacementError(f"gpus_per_worker must be a number >= 0, got {share!r}",
                                     fields=("gpus_per_worker",))
            if share > 0 and not self.on_gpu:
                raise PlacementError(f"gpus_per_worker {share:g} gives the workers GPUs they would not use on "
                                     f"device {self.device!r}; use device 'cuda'",
                                     fields=("gpus_per_worker", "device"))
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            raise PlacementError(f"address must name a Ray cluster ('auto', 'HOST:PORT' or 'local'), got "
                                 f"{self.address!r}", fields=("address",))

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def in_process(self) -> bool:
        """True when the work runs in this process (one worker, no Ray cluster named)."""
        return self.workers == 1 and self.address is None

    def worker_threads(self) -> int:
        """Torch threads of each worker: ``threads`` when given; else in this process
        ``$OMP_NUM_THREADS``, else the cores idle now (measured when called); else 1 per Ray
        worker (N workers on a machine share its cores, and a worker's numbers then do not
        depend on the machine's load)."""
        if self.threads is not None:
            return self.threads
        if self.in_process:
            from attention_drift.core.runtime import choose_threads

            return choose_threads()
        return 1

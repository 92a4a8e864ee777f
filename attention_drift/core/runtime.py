"""How many threads torch uses: the cores free to this process right now.

Two torch processes with two threads each on a 2-core machine run ~10x slower than one with
one thread each, so a run takes what is free rather than every core: ``OMP_NUM_THREADS`` when
set (the user's word), else the cores this process may use that are idle right now.

"Right now" is measured, not remembered: where ``/proc/stat`` exists (Linux) two readings
:data:`SAMPLE_SECONDS` apart give each allowed core's idle share over that interval
(:func:`idle_cores`). The 1-minute load average lags by about a minute, so a run started just
after another one ended would still see that one's load (on an idle 2-core machine: 1 core);
it is only the fallback where ``/proc/stat`` cannot be read.
"""

import os
import time
from collections.abc import Callable, Iterable

PROC_STAT = "/proc/stat"
SAMPLE_SECONDS = 0.15
"""How long :func:`free_cores` watches the cores (the kernel counts in 10 ms ticks: 15 per core)."""


def _read_proc_stat() -> str:
    with open(PROC_STAT) as f:
        return f.read()


def cpu_ticks(stat: str) -> dict[int, tuple[int, int]]:
    """``{cpu: (idle ticks, all ticks)}`` of the per-core ``cpuN`` lines of a ``/proc/stat``
    reading (idle counts ``idle`` and ``iowait``; all counts user, nice, system, idle, iowait,
    irq, softirq and steal: guest time is already inside user)."""
    out = {}
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        ticks = [int(x) for x in rest.split()[:8]]
        if len(ticks) < 4:
            continue
        out[int(name[3:])] = (ticks[3] + (ticks[4] if len(ticks) > 4 else 0), sum(ticks))
    return out


def idle_cores(before: str, after: str, cpus: Iterable[int]) -> float | None:
    """How many of ``cpus`` were idle between two ``/proc/stat`` readings: the sum of each
    core's idle share of its ticks (a core without ticks in between counts as idle). None when
    the readings name none of ``cpus``."""
    a, b = cpu_ticks(before), cpu_ticks(after)
    shares = []
    for cpu in cpus:
        if cpu in a and cpu in b:
            idle, total = b[cpu][0] - a[cpu][0], b[cpu][1] - a[cpu][1]
            shares.append(min(1.0, max(0.0, idle / total)) if total > 0 else 1.0)
    return sum(shares) if shares else None


def allowed_cpus() -> list[int]:
    """The cores this process may run on (its affinity; every core where that is not known)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def free_cores(cpus: Iterable[int] | None = None, *, read_stat: Callable[[], str] = _read_proc_stat,
               sleep: Callable[[float], None] = time.sleep, seconds: float = SAMPLE_SECONDS) -> int:
    """Cores of ``cpus`` (default: :func:`allowed_cpus`) idle right now, rounded, at least 1 and
    at most their number: :func:`idle_cores` over two ``read_stat()`` readings ``seconds``
    apart; where ``/proc/stat`` cannot be read, the cores less the 1-minute load average."""
    cpus = list(allowed_cpus() if cpus is None else cpus)
    cores = max(1, len(cpus))
    try:
        before = read_stat()
        sleep(seconds)
        free = idle_cores(before, read_stat(), cpus)
    except (OSError, ValueError):
        free = None
    if free is None:
        try:
            free = cores - os.getloadavg()[0]
        except (OSError, AttributeError):
            free = cores
    return max(1, min(cores, int(free + 0.5)))


def choose_threads(requested: int | None = None) -> int:
    """``requested`` if given, else ``$OMP_NUM_THREADS`` if set, else :func:`free_cores`."""
    if requested is not None:
        if requested < 1:
            from attention_drift.core.errors import AttentionDriftError

            raise AttentionDriftError(f"threads must be >= 1, got {requested}", fields=("threads",))
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return free_cores()


def configure_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads to :func:`choose_threads` and return the number."""
    import torch

    n = choose_threads(requested)
    torch.set_num_threads(n)
    return n

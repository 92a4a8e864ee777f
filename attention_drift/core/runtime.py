"""How many threads torch uses: the cores actually free to this process.

Two torch processes with two threads each on a 2-core machine run ~10x slower than one with
one thread each, so a run takes what is free rather than every core: ``OMP_NUM_THREADS`` when
set (the user's word), else the cores this process may use minus the machine's recent load.
"""

import os


def free_cores() -> int:
    """Cores this process may run on, less the 1-minute load average of the rest (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def choose_threads(requested: int | None = None) -> int:
    """``requested`` if given, else ``$OMP_NUM_THREADS`` if set, else :func:`free_cores`."""
    if requested is not None:
        if requested < 1:
            from attention_drift.core.errors import AttentionDriftError

            raise AttentionDriftError(f"--threads must be >= 1, got {requested}")
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

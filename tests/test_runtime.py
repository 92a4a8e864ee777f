"""The default torch threads: the cores idle right now, measured from two /proc/stat readings
(fake ones here), the load average only where /proc/stat is missing; --threads and
$OMP_NUM_THREADS first."""

import pytest

from attention_drift.core import runtime
from attention_drift.core.errors import AttentionDriftError


def _stat(*cpus) -> str:
    """A /proc/stat reading: per core (user, system, idle, iowait) ticks, the rest 0."""
    total = [sum(c[i] for c in cpus) for i in range(4)]
    line = lambda name, u, s, i, w: f"{name} {u} 0 {s} {i} {w} 0 0 0 0 0"  # noqa: E731
    return "\n".join([line("cpu", *total), *(line(f"cpu{n}", *c) for n, c in enumerate(cpus)),
                      "intr 1 2 3", "ctxt 99", "btime 0", "procs_running 2"]) + "\n"


def _free(before, after, cpus=(0, 1)):
    readings = iter([before, after])
    slept = []
    n = runtime.free_cores(cpus, read_stat=lambda: next(readings), sleep=slept.append)
    assert slept == [runtime.SAMPLE_SECONDS]
    return n


def test_free_cores_counts_the_cores_idle_between_two_readings():
    idle = _stat((100, 50, 1000, 0), (100, 50, 1000, 0))
    assert _free(idle, _stat((100, 50, 1015, 0), (100, 50, 1015, 0))) == 2  # both idle
    assert _free(idle, _stat((115, 50, 1000, 0), (100, 50, 1015, 0))) == 1  # one busy
    assert _free(idle, _stat((110, 55, 1000, 0), (112, 50, 1001, 2))) == 1  # both busy: at least 1
    assert _free(idle, _stat((107, 0 + 50, 1008, 0), (100, 57, 1008, 0))) == 1  # two half-busy: 1 free
    assert _free(idle, _stat((100, 50, 1005, 10), (100, 50, 1015, 0))) == 2  # waiting on disk is idle
    assert _free(idle, _stat((115, 50, 1000, 0), (100, 50, 1015, 0)), cpus=[1]) == 1  # only the allowed core
    assert _free(idle, _stat((115, 50, 1000, 0), (100, 50, 1015, 0)), cpus=[0]) == 1  # busy, but at least 1


def test_idle_cores_is_the_sum_of_idle_shares():
    before = _stat((0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0))
    after = _stat((10, 0, 10, 0), (0, 0, 20, 0), (20, 0, 0, 0))
    assert runtime.idle_cores(before, after, [0, 1, 2]) == pytest.approx(1.5)
    assert runtime.idle_cores(before, after, [7]) is None  # no such core in the readings
    assert runtime.cpu_ticks(after) == {0: (10, 20), 1: (20, 20), 2: (0, 20)}


def test_free_cores_falls_back_to_the_load_average_without_proc_stat(monkeypatch):
    def missing():
        raise FileNotFoundError("/proc/stat")

    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert runtime.free_cores([0, 1, 2, 3], read_stat=missing, sleep=lambda s: None) == 3
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert runtime.free_cores([0, 1], read_stat=missing, sleep=lambda s: None) == 1


def test_choose_threads_keeps_the_precedence(monkeypatch):
    monkeypatch.setattr(runtime, "free_cores", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.choose_threads(1) == 1 and runtime.choose_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert runtime.choose_threads() == 2
    with pytest.raises(AttentionDriftError, match="^threads must be >= 1, got 0$"):
        runtime.choose_threads(0)


def test_the_measurement_on_this_machine_is_in_range():
    assert 1 <= runtime.free_cores() <= len(runtime.allowed_cpus())

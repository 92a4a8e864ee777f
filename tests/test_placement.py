"""Placement (checked in library terms, shown by the CLI as flags), its default threads, the one
dtype table, and the executor in this process (no Ray, no model; on Ray: tests/test_sweep.py)."""

import pytest

from attention_drift import cli
from attention_drift.core import runtime
from attention_drift.core.dtypes import DTYPE_NAMES, DTYPES, canonical_dtype
from attention_drift.core.errors import AttentionDriftError
from attention_drift.runs.executor import Executor, ExecutorError
from attention_drift.runs.placement import Placement, PlacementError


# --- Placement ------------------------------------------------------------------------------

def test_placement_defaults_and_dtype_names():
    p = Placement("m")
    assert (p.device, p.dtype, p.threads, p.gpus_per_worker, p.workers, p.address) == ("cpu", "float32", None, None, 1,
                                                                                        None)
    assert p.in_process and not Placement("m", workers=2).in_process and not Placement("m", address="auto").in_process
    assert Placement("m", dtype="bf16").dtype == "bfloat16" and Placement("m", dtype="torch.float16").dtype == "float16"
    assert Placement("m", device="cuda:1", gpus_per_worker=0.0625, workers=16).on_gpu
    with pytest.raises(AttributeError):
        p.workers = 2  # frozen


@pytest.mark.parametrize("bad, message, fields", [
    ({"workers": 0}, "workers must be >= 1, got 0", ("workers",)),
    ({"threads": 0}, "threads must be >= 1, got 0", ("threads",)),
    ({"dtype": "int8"}, "dtype must be one of float32, bfloat16, float16, got 'int8'", ("dtype",)),
    ({"device": "GPU please"}, "device must look like 'cpu', 'cuda' or 'cuda:1', got 'GPU please'", ("device",)),
    ({"gpus_per_worker": -1.0}, "gpus_per_worker must be a number >= 0, got -1.0", ("gpus_per_worker",)),
    ({"gpus_per_worker": 0.5}, "gpus_per_worker 0.5 gives the workers GPUs they would not use on device 'cpu'; "
                               "use device 'cuda'", ("gpus_per_worker", "device")),
    ({"address": ""}, "address must name a Ray cluster ('auto', 'HOST:PORT' or 'local'), got ''", ("address",)),
    ({"model": ""}, "model must be a model name or path, got ''", ("model",)),
])
def test_a_bad_placement_is_one_error_in_library_terms(bad, message, fields):
    with pytest.raises(PlacementError) as caught:
        Placement(**{"model": "m", **bad})
    assert str(caught.value) == message and caught.value.fields == fields
    assert "--" not in str(caught.value)
    assert isinstance(caught.value, AttentionDriftError)


def test_worker_threads_given_else_measured_here_else_one_per_ray_worker(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "free_cores", lambda: 2)
    assert Placement("m", threads=3).worker_threads() == 3
    assert Placement("m").worker_threads() == 2
    assert Placement("m", workers=4).worker_threads() == 1
    assert Placement("m", workers=4, threads=2).worker_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's word beats the measurement
    assert Placement("m").worker_threads() == 1
    assert Placement("m", threads=2).worker_threads() == 2  # and --threads beats both


# --- one dtype table ------------------------------------------------------------------------

def test_one_dtype_table_for_the_cli_placement_and_loader():
    import torch

    from attention_drift.core.models import resolve_dtype

    parser = cli.build_parser()
    evaluate = parser._subparsers._group_actions[0].choices["evaluate"]
    assert next(a for a in evaluate._actions if a.dest == "dtype").choices == DTYPES
    for name, canonical in DTYPE_NAMES.items():
        assert resolve_dtype(name) is getattr(torch, canonical) and canonical_dtype(name) == canonical
        assert Placement("m", dtype=name).dtype == canonical
    assert canonical_dtype("float64") is None


# --- the CLI shows library names as its flags -----------------------------------------------

@pytest.mark.parametrize("argv, shown", [
    (["evaluate", "--threads", "0"], "--threads must be >= 1, got 0"),
    (["drift", "--workers", "0"], "--workers must be >= 1, got 0"),
    (["patch", "--gpus-per-worker", "0.5"], "--gpus-per-worker 0.5 gives the workers GPUs they would not use on "
                                            "--device 'cpu'; use --device 'cuda'"),
    (["figures", "--workers", "-2"], "--workers must be >= 1, got -2"),
    (["figures", "--drift-limit", "0"], "--drift-limit must be >= 1, got 0"),
    (["evaluate", "--balanced"], "--balanced needs --limit N"),
    (["evaluate", "--method", "rome", "--stats-samples", "0"], "--stats-samples must be >= 1, got 0"),
])
def test_cli_names_the_flag_of_a_library_error(tmp_path, capsys, argv, shown):
    assert cli.main([*argv, "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attention-drift: error: ") and shown in err[0], err


def test_flag_names_replace_only_whole_words():
    err = AttentionDriftError("out '/tmp/out/x.out' is a folder; choose another out path (outdated: 'out')",
                              fields=("out",))
    assert cli._in_flags(err) == ("--out '/tmp/out/x.out' is a folder; choose another --out path (outdated: 'out')")
    assert cli._in_flags(AttentionDriftError("workers must be >= 1")) == "workers must be >= 1"  # no fields: as is


# --- the executor in this process -----------------------------------------------------------

def _square(worker, x):
    return worker.placement.model, x * x


def _mark(worker):
    worker.marked = True


def _marked(worker, x):
    return getattr(worker, "marked", False), x


def test_in_process_executor_runs_here_in_item_order_without_ray(monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr("attention_drift.runs.executor.ray_session", no_ray)
    executor = Executor(Placement("m", threads=1))
    assert list(executor.map([3, 1, 2], _square)) == [(3, ("m", 9)), (1, ("m", 1)), (2, ("m", 4))]
    assert list(executor.map(["a", "b"], _marked, first=_mark)) == [("a", (True, "a")), ("b", (True, "b"))]
    assert executor.worker.handle._model is None  # nothing asked for the model: never loaded


def test_nothing_to_map_starts_nothing(monkeypatch):
    monkeypatch.setattr("attention_drift.runs.executor.ray_session",
                        lambda *a, **k: pytest.fail("Ray was started"))
    executor = Executor(Placement("m", workers=4))
    assert list(executor.map([], _square, first=_mark)) == []
    with pytest.raises(ExecutorError, match="no worker in this process"):
        executor.worker


def test_ray_workers_need_a_variant_not_an_editor_function():
    executor = Executor(Placement("m", workers=2))
    with pytest.raises(ExecutorError, match="need a Variant"):
        executor.measure([1], _square, lambda record: None)
    with pytest.raises(ExecutorError, match="^max_retries must be >= 0, got -1$"):
        executor.map([1], _square, max_retries=-1)

"""Sweeps and the executor with the tiny Llama, in this process and on a local Ray (2 CPUs, 1-2
workers): same lines as ``evaluate``, the same results in this process and on Ray, dead workers
retried, interrupted sweeps resumed, the CLI command."""

import json
import logging
import os

import pytest
import ray
import torch

from attention_drift import cli

from attention_drift.runs import evaluation as runs
from attention_drift.core.jsonl import read_run
from attention_drift.runs.evaluation import ModelHandle, RecordSelection
from attention_drift.runs.executor import Executor, ExecutorError, Worker
from attention_drift.runs.placement import Placement, PlacementError
from attention_drift.runs.sweep import SweepConfig, SweepError, _Plan, run_sweep
from attention_drift.runs.variants import Variant, paper_variants

VARIANTS = paper_variants()
TIMINGS = ("edit_seconds", "eval_seconds")


@pytest.fixture(scope="module")
def tiny_folder():
    from attention_drift.core.models import tiny_model

    return tiny_model("llama").model_name


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One local Ray for the module; the statistics cache in a temporary folder (workers get it too)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path_factory.mktemp("cache")))
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        yield
        ray.shutdown()


def _lines(path):
    return read_run(path).records


def _without_timings(line):
    return {k: v for k, v in line.items() if k not in TIMINGS}


def test_sweep_lines_equal_evaluate_run(tiny_folder, local_ray, tmp_path):
    """2 editing variants x 4 records on 2 workers (pre-edit scores computed once per record and
    shared) give the lines evaluate_run makes without Ray, but for the timings."""
    variants = (VARIANTS["rome"], VARIANTS["memit"])
    selection = RecordSelection(limit=4)
    outcome = run_sweep(SweepConfig(variants, tmp_path / "sweep", selection, progress=False),
                        Placement(tiny_folder, workers=2))
    assert outcome.written == {"rome": 4, "memit": 4} and outcome.skipped == {"rome": 0, "memit": 0}
    assert outcome.retried == 0

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker
    try:
        handle = ModelHandle(Placement(tiny_folder))
        records = selection.load()
        for variant in variants:
            meta = runs.run_meta(tiny_folder, variant, selection, None)
            runs.evaluate_run(handle, records, variant, tmp_path / f"{variant.name}.jsonl", meta, progress=False)
    finally:
        torch.set_num_threads(threads)

    for variant in variants:
        swept, plain = (read_run(p) for p in (tmp_path / "sweep" / f"{variant.name}.jsonl",
                                               tmp_path / f"{variant.name}.jsonl"))
        assert {k: v for k, v in swept.meta.items() if k != "created"} == \
            {k: v for k, v in plain.meta.items() if k != "created"}
        by_id = {line["case_id"]: line for line in swept.records}
        assert sorted(by_id) == [r.case_id for r in records]
        for line in plain.records:
            assert _without_timings(by_id[line["case_id"]]) == _without_timings(line)
            assert line["edit_seconds"] > 0
    rome = _lines(tmp_path / "sweep" / "rome.jsonl")
    assert all(x["post"] != x["pre"] for x in rome)  # the lines hold real edits
    memit = {x["case_id"]: x["pre"] for x in _lines(tmp_path / "sweep" / "memit.jsonl")}
    assert all(memit[x["case_id"]] == x["pre"] for x in rome)


def test_a_dead_worker_has_its_record_retried_once(tiny_folder, local_ray, tmp_path):
    flag = tmp_path / "crashed"

    class CrashOnce(Worker):
        """Dies (the whole process) the first time it edits record 1."""

        def evaluate(self, record, variant, **options):
            if variant.edits and record.case_id == 1 and not flag.exists():
                flag.write_text(str(os.getpid()))
                os._exit(1)
            return super().evaluate(record, variant, **options)

    config = SweepConfig((VARIANTS["rome"],), tmp_path / "out", RecordSelection(limit=4), progress=False)
    outcome = run_sweep(config, Executor(Placement(tiny_folder, workers=2), worker_class=CrashOnce))
    assert flag.exists() and outcome.retried == 1 and outcome.written == {"rome": 4}
    ids = [line["case_id"] for line in _lines(tmp_path / "out" / "rome.jsonl")]
    assert sorted(ids) == [0, 1, 2, 3]  # every record, each once


def test_a_record_that_keeps_killing_workers_stops_the_sweep(tiny_folder, local_ray, tmp_path):
    class AlwaysCrash(Worker):
        def evaluate(self, record, variant, **options):
            if record.case_id == 2:
                os._exit(1)
            return super().evaluate(record, variant, **options)

    config = SweepConfig((VARIANTS["none"],), tmp_path, RecordSelection(limit=4), max_retries=0, progress=False)
    one_on_ray = Placement(tiny_folder, address="local")  # one worker, on Ray (the one this process started)
    with pytest.raises(ExecutorError, match=r"record 2 .*failed 1 time\(s\).*re-run to resume"):
        run_sweep(config, Executor(one_on_ray, worker_class=AlwaysCrash))
    assert [line["case_id"] for line in _lines(tmp_path / "none.jsonl")] == [0, 1]  # what was done is kept


def test_an_interrupted_sweep_resumes_where_it_stopped(tiny_folder, local_ray, tmp_path):
    """In this process (one worker, no address)."""
    config = SweepConfig((VARIANTS["none"],), tmp_path, RecordSelection(limit=4), progress=False)
    here = Placement(tiny_folder, threads=1)
    seen = []

    def interrupt(name, line):
        seen.append(line["case_id"])
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, here, on_line=interrupt)
    first = _lines(tmp_path / "none.jsonl")
    assert [x["case_id"] for x in first] == seen
    outcome = run_sweep(config, here)
    assert outcome.written == {"none": 2} and outcome.skipped == {"none": 2}
    lines = _lines(tmp_path / "none.jsonl")
    assert lines[:2] == first and sorted(x["case_id"] for x in lines) == [0, 1, 2, 3]


def test_cli_sweep_then_compare(tiny_folder, local_ray, tmp_path, capsys):
    out = tmp_path / "grid"
    args = ["sweep", "--model", tiny_folder, "--variants", "none,rome", "--limit", "2", "--out", str(out),
            "--workers", "1", "--no-progress"]
    assert cli.main(args) == 0
    assert "compare" in capsys.readouterr().err
    none, rome = _lines(out / "none.jsonl"), _lines(out / "rome.jsonl")
    assert [x["case_id"] for x in none] == [x["case_id"] for x in rome] == [0, 1]
    assert [x["pre"] for x in none] == [x["pre"] for x in rome]  # the rome lines reuse the none pass
    assert cli.main(["compare", str(out / "none.jsonl"), str(out / "rome.jsonl"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["runs"]) == {"none", "rome"} and "none -> rome" in result["paired"]
    assert cli.main(args) == 0  # nothing left: no worker starts, nothing written
    assert "0 line(s) written" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--variants", "rome,nope"], "unknown variant 'nope'"),
    (["--variants", "rome", "--gpus-per-worker", "0.5"], "use --device 'cuda'"),
    (["--variants", "rome", "--threads", "0"], "--threads must be >= 1"),
    (["--variants", "rome", "--max-retries", "-1"], "--max-retries must be >= 0"),
    (["--variants", "rome", "--deadline", "0"], "--deadline must be > 0"),
    (["--variants", "rome", "--workers", "0"], "--workers must be >= 1"),
    (["--variants", "rome,rome"], "given twice"),
])
def test_cli_sweep_rejects_bad_flags_in_one_line(tmp_path, capsys, extra, message):
    assert cli.main(["sweep", "--out", str(tmp_path), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attention-drift: error: ") and message in err[0]


def test_cuda_without_a_gpu_in_the_cluster_is_refused(tiny_folder, local_ray, tmp_path):
    if ray.cluster_resources().get("GPU", 0):
        pytest.skip("this Ray cluster has a GPU")
    config = SweepConfig((VARIANTS["none"],), tmp_path, RecordSelection(limit=1))
    with pytest.raises(PlacementError, match="device 'cuda' but the Ray cluster has no GPU"):
        run_sweep(config, Placement(tiny_folder, device="cuda", workers=2))
    assert not (tmp_path / "none.jsonl").exists()


def test_the_deadline_stops_the_sweep(tiny_folder, local_ray, tmp_path):
    config = SweepConfig((VARIANTS["none"],), tmp_path, RecordSelection(limit=2), progress=False, deadline=1e-6)
    outcome = run_sweep(config, Placement(tiny_folder, threads=1))
    assert not outcome.complete and outcome.written == {"none": 0}
    assert not (tmp_path / "none.jsonl").exists()


# --- drift and patching on workers ---------------------------------------------------------

def _untimed(path):
    return {json.dumps(x["case_id"]): {k: v for k, v in x.items() if not k.endswith("seconds")} for x in _lines(path)}


def test_drift_and_patch_on_workers_equal_in_process(tiny_folder, local_ray, tmp_path):
    """The records of a drift and a patching run measured on 2 Ray workers give the lines (and
    explorer patterns) they give in this process, but for the timings."""
    from attention_drift.runs import analysis

    variant = VARIANTS["rome"]
    records = RecordSelection(limit=4).load()  # two of each kind: distract neighbourhood and relation
    workers = Executor(Placement(tiny_folder, workers=2))
    options = {"figures": False, "method": "rome"}
    analysis.run_drift(None, records, variant, tmp_path / "ray-drift", {"model": "tiny"}, executor=workers, **options)
    patch = {"sweep_prompts": 1, "contamination_prompts": 1, "random_draws": 2, **options}
    analysis.run_patch(None, records, variant, tmp_path / "ray-patch", {"model": "tiny"}, executor=workers, **patch)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker
    try:
        model = ModelHandle(Placement(tiny_folder)).get()
        editor = variant.editor(model, progress=False)
        analysis.run_drift(model, records, editor, tmp_path / "drift", {"model": "tiny"}, **options)
        analysis.run_patch(model, records, editor, tmp_path / "patch", {"model": "tiny"}, **patch)
    finally:
        torch.set_num_threads(threads)
    for name in ("drift/drift_records.jsonl", "drift/drift_patterns.jsonl", "patch/patch_records.jsonl"):
        on_ray, here = _untimed(tmp_path / f"ray-{name}"), _untimed(tmp_path / name)
        assert len(here) == 4 if "records" in name else len(here) >= 2
        assert on_ray == here, name
    groups = {c["group"] for x in _lines(tmp_path / "patch" / "patch_records.jsonl") for c in x["cases"]}
    assert groups == {"distract_neighborhood", "distract_relation"}


def test_an_analysis_worker_that_dies_has_its_record_retried(tiny_folder, local_ray, tmp_path):
    from attention_drift.runs import analysis

    flag = tmp_path / "crashed"

    class CrashOnce(Worker):
        def measure(self, fn, record, edit, edit_cache=None, progress=False):
            if record.case_id == 1 and not flag.exists():
                flag.write_text(str(os.getpid()))
                os._exit(1)
            return super().measure(fn, record, edit, edit_cache, progress)

    records = RecordSelection(limit=3).load()
    analysis.run_drift(None, records, VARIANTS["rome"], tmp_path, {"model": "tiny"}, figures=False, method="rome",
                       executor=Executor(Placement(tiny_folder, workers=2), worker_class=CrashOnce))
    assert flag.exists()
    assert sorted(x["case_id"] for x in _lines(tmp_path / "drift_records.jsonl")) == [0, 1, 2]


def test_cli_drift_on_workers(tiny_folder, local_ray, tmp_path, capsys):
    args = ["drift", "--model", tiny_folder, "--limit", "2", "--workers", "2", "--out", str(tmp_path),
            "--no-figures", "--no-progress"]
    assert cli.main(args) == 0
    assert sorted(x["case_id"] for x in _lines(tmp_path / "drift_records.jsonl")) == [0, 1]
    assert "drift" in capsys.readouterr().out
    assert cli.main([*args[:-4], "--workers", "0", "--out", str(tmp_path), "--no-progress"]) == 1
    assert "--workers must be >= 1" in capsys.readouterr().err


# --- the executor: the same results in this process and on Ray -------------------------------

def test_in_process_and_ray_executors_give_the_same_results(tiny_folder, local_ray):
    def next_tokens(worker, prompt):  # defined here: Ray pickles it by value (the tests are not importable there)
        """The worker model's top-3 next tokens after ``prompt`` and its top logit."""
        from attention_drift.core import tokens

        model = worker.model
        batch = tokens.batch_prompts(model, [prompt])
        with torch.no_grad():
            row = model(batch.input_ids, attention_mask=batch.attention_mask)[0, batch.last_prompt_index[0]]
        return row.topk(3).indices.tolist(), float(row.max())

    def load(worker):
        return worker.model.cfg.n_layers

    prompts = ["The Eiffel Tower is in", "The capital of Italy is", "Danielle Darrieux speaks", "Rome is in"]
    threads = torch.get_num_threads()
    try:
        here = Executor(Placement(tiny_folder, threads=1))  # as each Ray worker
        assert here.in_process
        in_process = list(here.map(prompts, next_tokens, first=load))
    finally:
        torch.set_num_threads(threads)
    on_ray = list(Executor(Placement(tiny_folder, workers=2)).map(prompts, next_tokens, first=load))
    assert [p for p, _ in in_process] == prompts  # in item order here; in the order they finish on Ray
    assert sorted(on_ray) == sorted(in_process) and len(on_ray) == len(prompts)


class _Done:
    def __init__(self, done=()):
        self.ids = set(done)

    def done(self, case_id, method):
        return case_id in self.ids


def test_plan_shares_pre_edit_scores_and_waits_for_statistics():
    """Without Ray: the order in which a sweep hands out work."""
    records = RecordSelection(limit=3).load()
    none, rome = VARIANTS["none"], VARIANTS["rome"]
    files = {"none": _Done({0}), "rome": _Done()}
    plan = _Plan(records, (none, rome), files, {json.dumps(0): {"groups": {}}})
    assert plan.lines == 5
    assert plan.next().prepare
    first = plan.next()  # record 0 has its pre-edit scores; its rome line waits for the statistics
    assert first.variant == none and first.record.case_id == 1 and first.gives_pre and first.write
    plan.got_pre(first, {"groups": {"x": 1}})
    assert plan.next().record.case_id == 2 and plan.next() is None
    plan.prepared({"rome": None})
    assert [(t.variant.name, t.record.case_id) for t in (plan.next(), plan.next())] == [("rome", 0), ("rome", 1)]
    plan.again(first)
    assert plan.next() is first and plan.retried == 1 and not plan.done()


def test_plan_without_a_plain_variant_adds_a_pre_only_pass():
    records = RecordSelection(limit=1).load()
    plan = _Plan(records, (VARIANTS["rome"], VARIANTS["memit"]), {"rome": _Done(), "memit": _Done()}, {})
    assert plan.lines == 2 and plan.tasks == 4
    prepare = plan.next()
    assert prepare.prepare and prepare.method == "prepare"
    pre = plan.next()
    assert not pre.write and pre.gives_pre and not pre.variant.edits
    assert plan.next() is None
    plan.finished(prepare, {"rome": None, "memit": None})
    plan.finished(pre, {"pre": {"groups": {}}})
    last = [plan.next(), plan.next()]
    assert {t.variant.name for t in last} == {"rome", "memit"} and plan.next() is None
    assert all(t.method == "evaluate" and t.kwargs["pre"] == {"groups": {}} for t in last)
    assert not plan.done()
    for task in last:
        plan.finished(task, {})
    assert plan.done()


def test_plan_of_a_finished_sweep_starts_nothing():
    records = RecordSelection(limit=2).load()
    plan = _Plan(records, (VARIANTS["rome"],), {"rome": _Done({0, 1})}, {})
    assert plan.lines == 0 and plan.done() and plan.next() is None  # not even the statistics step


def test_config_checks():
    with pytest.raises(SweepError, match="at least one variant"):
        SweepConfig((), "out")
    with pytest.raises(SweepError, match="^max_retries must be >= 0, got -1$"):
        SweepConfig((Variant("none"),), "out", max_retries=-1)
    with pytest.raises(SweepError, match="^batch_size must be >= 1, got 0$"):
        SweepConfig((Variant("none"),), "out", batch_size=0)


def test_an_address_where_nothing_listens_fails_at_once():
    from attention_drift.runs.executor import _check_reachable

    with pytest.raises(PlacementError, match="nothing answers at address 127.0.0.1:1"):
        _check_reachable("127.0.0.1:1")
    _check_reachable("auto")  # Ray itself says when no cluster runs

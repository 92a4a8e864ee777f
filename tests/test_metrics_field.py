"""The field's metrics beside the paper's: CounterFact+'s NKL and EasyEdit's token-level accuracies
(attention_drift.measure.field_metrics), through evaluate_record, run files, summarize and compare."""

import json
import math

import pytest
import torch

from attention_drift import cli
from attention_drift.core import tokens
from attention_drift.core.data import load_example
from attention_drift.core.jsonl import Run
from attention_drift.core.scores import score_continuations
from attention_drift.measure import evaluate as E
from attention_drift.measure import field_metrics as F
from attention_drift.reports import evaluation as report
from handmade_edit import push_subject

# --- per-prompt arithmetic, by hand ------------------------------------------------------------


def test_kl_is_post_given_pre_as_counterfact_plus_computes_it():
    pre = torch.tensor([0.7, 0.2, 0.1]).log()
    post = torch.tensor([0.1, 0.3, 0.6]).log()
    by_hand = 0.1 * math.log(0.1 / 0.7) + 0.3 * math.log(0.3 / 0.2) + 0.6 * math.log(0.6 / 0.1)
    assert F.kl_divergence(post, pre) == pytest.approx(by_hand, rel=1e-6)
    # CounterFact+ (experiments/e2e_analyze.py): kl_div(pre, post, log_target=True, reduction="batchmean")
    # on a 1-D vocabulary tensor, i.e. ours divided by the vocabulary size
    theirs = torch.nn.functional.kl_div(pre, post, log_target=True, reduction="batchmean")
    assert float(theirs) * 3 == pytest.approx(by_hand, rel=1e-5)
    reverse = 0.7 * math.log(0.7 / 0.1) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.6)
    assert F.kl_divergence(pre, post) == pytest.approx(reverse, rel=1e-6)
    assert abs(by_hand - reverse) > 0.05  # the direction matters


def test_kl_of_a_distribution_with_itself_is_exactly_zero():
    lp = torch.randn(1000).log_softmax(-1)
    assert F.kl_divergence(lp, lp.clone()) == 0.0
    with pytest.raises(ValueError, match="vocabularies"):
        F.kl_divergence(lp, lp[:10])


def test_token_accuracy_counts_argmax_hits():
    assert F.token_accuracy([5, 6, 7], [5, 9, 7]) == pytest.approx(2 / 3)
    assert F.token_accuracy([4], [4]) == 1.0 and F.token_accuracy([4], [3]) == 0.0
    with pytest.raises(ValueError):
        F.token_accuracy([1, 2], [1])


def test_record_metrics_on_a_constructed_pass():
    # pairs: 0 efficacy, 1-2 paraphrase, 3-4 neighbourhood; one distract prompt
    slices = {"efficacy": range(0, 1), "paraphrase": range(1, 3), "neighborhood": range(3, 5)}
    right_ids = ((10, 11), (10, 11), (10, 11), (20,), (30, 31, 32))
    argmax = ((10, 11), (10, 99), (98, 99), (21,), (30, 0, 32))
    pre = torch.tensor([0.5, 0.5]).log()
    post = torch.tensor([0.25, 0.75]).log()
    got = F.record_metrics(slices, right_ids, argmax, {"d": post}, ["d"], pre_argmax=[[21], [30, 31, 32]],
                           pre_next_token={"d": pre})
    assert got["rewrite_token_acc"].values == (1.0,)
    assert got["paraphrase_token_acc"].values == (0.5, 0.0)
    assert got["locality_token_acc"].values == (1.0, pytest.approx(2 / 3))  # vs the pre-edit argmax
    assert got["nkl"].values == (pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5)),)
    alone = F.record_metrics(slices, right_ids, argmax, {"d": post}, ["d"])
    assert set(alone) == {"rewrite_token_acc", "paraphrase_token_acc"}  # nothing to compare with
    assert F.record_reference(slices, argmax) == {"argmax": [[21], [30, 0, 32]]}


def test_every_metric_says_how_it_is_computed():
    for name, metric in F.METRICS.items():
        assert metric.name == name and len(metric.description) > 100
    assert F.METRICS["nkl"].lower_is_better and F.METRICS["nkl"].needs_pre
    assert "KL(P_post || P_pre)" in F.NKL.description


# --- real forwards on the tiny model -----------------------------------------------------------


def test_argmax_tokens_are_the_teacher_forced_ones(tiny_llama):
    prompts = ["The Eiffel Tower is located in", "The Eiffel Tower is located in", "Danielle Darrieux's mother tongue is"]
    targets = ["Rome", "the city of Paris", "English"]
    got = score_continuations(tiny_llama, prompts, targets, next_token=[prompts[2]])
    for prompt, target, ids, argmax in zip(prompts, targets, got.target_ids, got.argmax_ids):
        p_ids, t_ids = tokens.continuation_ids(tiny_llama, prompt, target)
        logits = tiny_llama(torch.tensor([p_ids + t_ids]))[0]
        assert list(ids) == t_ids
        assert list(argmax) == logits[len(p_ids) - 1 : len(p_ids) - 1 + len(t_ids)].argmax(-1).tolist()
    alone = tiny_llama(torch.tensor([tokens.encode(tiny_llama, prompts[2])]))[0, -1].float().log_softmax(-1)
    assert torch.allclose(got.next_token[prompts[2]], alone, atol=1e-5)
    assert set(got.next_token) == {prompts[2]}


def test_without_an_edit_nkl_is_zero_and_locality_one(tiny_llama):
    record = load_example()[0]
    pre = E.evaluate_record(tiny_llama, record)
    assert set(pre.metrics) == {"rewrite_token_acc", "paraphrase_token_acc"}  # pre: no self-comparison
    assert len(pre.reference["argmax"]) == len(record.neighborhood)
    assert "next_token" not in json.dumps(pre.to_json())  # the distributions stay in memory
    post = E.evaluate_record(tiny_llama, record, pre=pre)
    assert post.metrics["nkl"].values == (0.0,) * len(record.neighborhood)
    assert post.metrics["locality_token_acc"].values == (1.0,) * len(record.neighborhood)
    assert post.metrics["rewrite_token_acc"] == pre.metrics["rewrite_token_acc"]
    assert post.reference is None and not post.next_token
    # from JSON (reused pre-edit scores): locality only, until the distributions are read again
    assert set(E.evaluate_record(tiny_llama, record, pre=pre.to_json()).metrics) == set(F.METRICS) - {"nkl"}
    reread = E.pre_edit_distributions(tiny_llama, record, pre.to_json())
    again = E.evaluate_record(tiny_llama, record, pre=reread)
    assert again.metrics["nkl"].values == pytest.approx([0.0] * len(record.neighborhood), abs=1e-9)


def test_an_edit_gives_the_kl_of_the_full_distributions(tiny_llama):
    record = load_example()[0]
    pre = E.evaluate_record(tiny_llama, record)
    distract = [p.prompt for p in E.record_pairs(record)[0]["distract_neighborhood"]]
    with push_subject(tiny_llama, record.rewrite, scale=50.0):
        post = E.evaluate_record(tiny_llama, record, pre=pre)
        after = score_continuations(tiny_llama, distract, ["x"] * len(distract), next_token=distract).next_token
    nkl = post.metrics["nkl"].values
    assert all(v > 0 for v in nkl)
    for prompt, value in zip(distract, nkl):
        lq, lp = after[prompt].double(), pre.next_token[prompt].double()
        assert value == pytest.approx(float((lq.exp() * (lq - lp)).sum()), rel=1e-4)
    assert all(0 <= v <= 1 for v in post.metrics["locality_token_acc"].values)


def test_metrics_can_be_switched_off(tiny_llama):
    scores = E.evaluate_record(tiny_llama, load_example()[0], metrics=False)
    assert scores.metrics == {} and scores.reference is None and "metrics" not in scores.to_json()


# --- reports -----------------------------------------------------------------------------------


def _line(case_id, nkl, acc, *, pre_acc=(0.0,)):
    def phase(values):
        return {"groups": {"efficacy": {"scores": [[0.6, 0.1, True]], "skipped": 0}}, "fluency": None,
                "metrics": values}

    return {"case_id": case_id, "method": "rome", "edit_seconds": 1.0,
            "pre": phase({"rewrite_token_acc": {"values": list(pre_acc)}}),
            "post": phase({"rewrite_token_acc": {"values": list(acc)}, "nkl": {"values": list(nkl)}})}


def _run(lines) -> Run:
    return Run({"model": "m", "method": "rome"}, list(lines))


def test_summary_has_metric_means_with_both_intervals():
    run = _run(_line(i, [0.1 * i, 0.1 * i + 0.2], [1.0]) for i in range(6))
    result = report.summary(run)
    nkl = result["metrics"]["nkl"]
    assert set(nkl) == {"post"}  # NKL compares with the unedited model: no pre-edit value
    values = [0.1 * i + d for i in range(6) for d in (0, 0.2)]
    mean = sum(values) / 12
    assert nkl["post"]["mean"] == pytest.approx(mean) and nkl["post"]["n"] == 12
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 12)
    assert nkl["post"]["half_width"] == pytest.approx(1.96 * sd / math.sqrt(12))
    lo, hi = nkl["post"]["ci95_bootstrap"]
    assert lo < mean < hi and nkl["post"]["n_records"] == 6
    acc = result["metrics"]["rewrite_token_acc"]
    assert acc["pre"]["mean"] == 0.0 and acc["post"]["mean"] == 1.0
    text = report.markdown(result)
    assert "nkl (NKL) ↓" in text and "rewrite_token_acc" in text and f"{mean:.3g}" in text
    json.dumps(result)


def test_compare_shows_metrics_and_pairs_them():
    a = _run(_line(i, [0.5, 0.7], [1.0]) for i in range(8))
    b = _run(_line(i, [0.1 + 0.01 * i, 0.2], [0.5]) for i in range(8))
    result = report.compare({"rome": a, "rome-plus": b})
    d = result["paired"]["rome -> rome-plus"]["nkl"]
    assert d["diff"] == pytest.approx(sum(0.1 + 0.01 * i + 0.2 - 1.2 for i in range(8)) / 16)
    assert d["ci95"][0] <= d["diff"] <= d["ci95"][1] < 0 and d["mcnemar_p"] is None
    assert result["paired"]["rome -> rome-plus"]["rewrite_token_acc"]["diff"] == pytest.approx(-0.5)
    text = report.compare_markdown(result)
    assert "nkl (NKL) ↓" in text.splitlines()[0] and "rewrite_token_acc" in text.splitlines()[0]
    assert "| rome -> rome-plus | nkl (NKL) ↓ |" in text
    json.dumps(result)


def test_old_run_files_without_metrics_still_summarize_and_compare():
    def old(case_id):
        return {"case_id": case_id, "method": "rome", "edit_seconds": 1.0,
                "pre": {"groups": {"efficacy": {"scores": [[0.1, 0.6, False]], "skipped": 0}}, "fluency": None},
                "post": {"groups": {"efficacy": {"scores": [[0.6, 0.1, True]], "skipped": 0}}, "fluency": None}}

    run = _run(old(i) for i in range(4))
    result = report.summary(run)
    assert result["metrics"] == {} and result["groups"]["efficacy"]["post"]["accuracy"] == 1.0
    assert "field metric" not in report.markdown(result)
    both = report.compare({"old": run, "new": _run(_line(i, [0.3], [1.0]) for i in range(4))})
    assert "nkl" not in both["paired"]["old -> new"]  # nothing to pair with
    report.compare_markdown(both)
    scores = E.RecordScores.from_json(0, old(0)["post"])
    assert scores.metrics == {} and scores.reference is None


# --- run files: evaluate, --reuse-pre ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder():
    """A saved tiny Llama folder (load_model records the folder it was loaded from)."""
    from attention_drift.core.models import tiny_model

    return tiny_model("llama").model_name


def _evaluate(folder, out, *extra):
    return cli.main(["evaluate", "--model", folder, "--out", str(out), "--no-progress", *extra])


def test_run_file_has_metrics_and_reuse_pre_gives_the_same_nkl(tiny_folder, tmp_path, capsys):
    direct, plain, reused = tmp_path / "rome.jsonl", tmp_path / "none.jsonl", tmp_path / "reused.jsonl"
    some = ("--limit", "2", "--kinds", "counterfact")  # records with neighbourhood prompts
    assert _evaluate(tiny_folder, direct, "--method", "rome", *some) == 0
    assert _evaluate(tiny_folder, plain, *some) == 0
    assert _evaluate(tiny_folder, reused, "--method", "rome", *some, "--reuse-pre", str(plain)) == 0
    lines = {p: [json.loads(x) for x in p.read_text().splitlines()[1:]] for p in (direct, reused)}
    assert len(lines[direct]) == len(lines[reused]) == 2
    for a, b in zip(lines[direct], lines[reused]):
        assert "argmax" in a["pre"]["reference"] and set(a["post"]["metrics"]) == set(F.METRICS)
        assert set(a["pre"]["metrics"]) == {"rewrite_token_acc", "paraphrase_token_acc"}
        assert "reference" not in a["post"]
        assert b["post"]["metrics"]["nkl"]["values"] == pytest.approx(a["post"]["metrics"]["nkl"]["values"],
                                                                      rel=1e-4, abs=1e-9)
        assert b["post"]["metrics"]["locality_token_acc"] == a["post"]["metrics"]["locality_token_acc"]
    capsys.readouterr()
    assert cli.main(["summarize", str(direct), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"groups", "metrics", "meta"} and set(result["metrics"]) == set(F.METRICS)
    assert result["metrics"]["nkl"]["post"]["mean"] > 0 and "ci95_bootstrap" in result["metrics"]["nkl"]["post"]

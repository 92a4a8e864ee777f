"""The drift and patch analyses (attention_drift.runs.analysis) and their commands, on tiny models."""

import contextlib
import json
import math

import numpy as np

import pytest
import torch

from attention_drift.runs import analysis

from attention_drift import cli
from attention_drift.core.data import load_example
from attention_drift.measure.patching import Patch
from attention_drift.measure import patch_record as protocol
from attention_drift.measure.patch_record import topk_variant
from attention_drift.reports.drift import drift_from_lines
from attention_drift.reports.drift import drift_markdown
from attention_drift.views import report_figures
from attention_drift.views import plots

from handmade_edit import push_subject  # noqa: E402
from synthetic_drift import synthetic_run  # noqa: E402

RECORDS = load_example()
CF = [r for r in RECORDS if r.kind == "counterfact"]   # neighbourhood prompts (distract neighbourhood)
WD = [r for r in RECORDS if r.kind == "wikidata"]      # relation prompts mentioning the subject


class Counter:
    """An editor factory (the hand-made rank-one edit) that counts the edits it makes."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, record):
        self.calls.append(record.case_id)
        return push_subject(self.model, record.rewrite)


def test_drift_report_resume_and_keys(tiny_llama, tmp_path):
    edits = Counter(tiny_llama)
    records = [CF[0], WD[-1]]
    result = analysis.run_drift(tiny_llama, records[:1], edits, tmp_path, {"model": "tiny"}, figures=False)
    assert edits.calls == [CF[0].case_id]
    result = analysis.run_drift(tiny_llama, records, edits, tmp_path, {"model": "tiny"}, figures=False, top_k=5)
    assert edits.calls == [CF[0].case_id, WD[-1].case_id], "the done record must not be edited again"
    on_disk = json.loads((tmp_path / "drift.json").read_text())
    for key in ("top_heads", "head_stats", "correlations", "auroc", "curves", "samples", "headline",
                "subject_last_attention", "failure_rate"):
        assert key in on_disk
    assert on_disk["records"] == 2 and len(on_disk["top_heads"]) == 5
    top = on_disk["top_heads"][0]
    assert top["after"] - top["before"] == pytest.approx(top["drift"], abs=1e-5)
    assert top["drift"] >= on_disk["top_heads"][-1]["drift"]
    groups = {s["group"] for s in on_disk["samples"]}
    assert groups == {"distract_neighborhood", "distract_relation"}
    pearson = on_disk["headline"]["all"]["max_drift_subject_last"]["pearson_fails"]
    assert pearson["n"] == len(on_disk["samples"]) and {"r", "ci_low", "ci_high", "p_value"} <= set(pearson)
    assert "| layer | head |" in result["markdown"]
    # a third run does nothing but rebuild the same report
    again = analysis.run_drift(tiny_llama, records, edits, tmp_path, {"model": "tiny"}, figures=False, top_k=5)
    assert len(edits.calls) == 2 and again["top_heads"] == on_disk["top_heads"]


def test_drift_without_edit_is_zero_and_a_changed_setting_is_refused(tiny_llama, tmp_path):
    result = analysis.run_drift(tiny_llama, CF[:1], lambda r: contextlib.nullcontext(), tmp_path,
                                {"model": "tiny"}, figures=False)
    assert all(t["drift"] == 0 for t in result["top_heads"])
    with pytest.raises(ValueError, match="was written by a run with"):
        analysis.run_drift(tiny_llama, CF[:1], lambda r: contextlib.nullcontext(), tmp_path,
                           {"model": "other"}, figures=False)


def test_patch_restores_and_reports_accuracy(tiny_gpt2, tmp_path, monkeypatch):
    edits = Counter(tiny_gpt2)
    result = analysis.run_patch(tiny_gpt2, CF[:2], edits, tmp_path, {"model": "tiny"}, k=3, figures=False,
                                sweep_prompts=1, contamination_prompts=1)
    n = sum(len(r.neighborhood) for r in CF[:2])
    assert result["n_prompts"] == n and len(edits.calls) == 2
    v = result["variants"]
    assert set(v) == set(protocol.SUMMARY_VARIANTS) | {protocol.RANDOM_VARIANT}
    names = list(v)
    assert names.index(protocol.RANDOM_VARIANT) == names.index("attn_pattern_topk") + 1  # reported beside top-k
    # the edit changes MLP weights only: restoring every MLP output is the unedited run
    assert v["mlp_out_all"]["recovery_pooled"] == pytest.approx(1.0, abs=1e-4)
    assert v["mlp_out_all"]["accuracy"] == result["pre"]["accuracy"]
    assert v["none"]["accuracy"] == result["post"]["accuracy"]
    assert v["none"]["recovery_pooled"] == pytest.approx(0.0, abs=1e-6)
    assert result["pre"]["accuracy"] != result["post"]["accuracy"] or \
        result["pre"]["mean_logodds"] != pytest.approx(result["post"]["mean_logodds"])
    for stats in v.values():
        assert {"accuracy", "ci95", "n", "mean_p_true", "mean_logodds", "recovery_pooled",
                "recovery_median"} <= set(stats)
    lines = [json.loads(x) for x in (tmp_path / "patch_records.jsonl").read_text().splitlines()[1:]]
    assert all(len(line["top_heads"]) == 3 for line in lines)
    # the random-heads control: the mean over its draws, each draw k heads in the top-k heads' layers
    control = v[protocol.RANDOM_VARIANT]
    assert control["draws"] == protocol.RANDOM_DRAWS and control["n"] == n and control["n_records"] == 2
    assert control["accuracy"] == pytest.approx(np.mean(control["per_draw"]["accuracy"]))
    assert control["recovery_pooled"] == pytest.approx(np.mean(control["per_draw"]["recovery_pooled"]))
    for line in lines:
        assert len(line["random_heads"]) == protocol.RANDOM_DRAWS
        assert all(sorted(l for l, _ in d) == sorted(l for l, _, _ in line["top_heads"]) for d in line["random_heads"])
    cases = [c for line in lines for c in line["cases"]]
    logodds = lambda pair: pair[0] - pair[1]  # noqa: E731
    diff = [logodds(c["variants"]["attn_pattern_topk"]) -
            np.mean([logodds(c["variants"][f"attn_pattern_random/{d}"]) for d in range(protocol.RANDOM_DRAWS)])
            for c in cases]
    t = result["topk_vs_random"]
    assert t["logodds_diff"]["value"] == pytest.approx(np.mean(diff)) and t["n_prompts"] == n and t["n_records"] == 2
    assert t["logodds_diff"]["method"] == "cluster bootstrap" and t["logodds_diff"]["n_clusters"] == 2
    gap = [logodds(c["pre"]) - logodds(c["post"]) for c in cases]
    assert t["recovery_diff"]["value"] == pytest.approx(np.mean(diff) / np.mean(gap))
    assert "Top-k drifting heads vs k random heads in the same layers" in result["markdown"]
    assert "(b, control) attention patterns, k random heads in the same layers (mean of 5 draws)" in result["markdown"]
    pooled = v["attn_pattern_topk"]
    assert pooled["recovery_pooled_ci95"][0] <= pooled["recovery_pooled"] <= pooled["recovery_pooled_ci95"][1]
    # sweep: the last layer's residual stream at the last token is the clean output
    sweep = result["sweep"]
    rec = torch.tensor(sweep["recovery_pooled"])
    assert rec.shape == (tiny_gpt2.cfg.n_layers, len(protocol.SWEEP_COMPONENTS))
    edited_mlp = rec[0, protocol.SWEEP_COMPONENTS.index("mlp_out")]
    assert float(edited_mlp) == pytest.approx(1.0, abs=1e-4), "layer 0's MLP output carries the whole edit"
    assert len(result["windows"]["recovery_pooled"]) == tiny_gpt2.cfg.n_layers
    c = result["contamination"]
    assert set(c["components"]) == set(protocol.CONTAMINATION_COMPONENTS)
    # contamination as log-odds damage: share of the edit's log-odds drop, pooled over prompts
    damage = c["damage"]
    entries = [e for line in lines for e in line["contamination"]]
    assert damage["n_prompts"] == len(entries) == 2 and damage["n_records"] == 2
    edit_drop = np.array([logodds(e["pre"]) - logodds(e["post"]) for e in entries])
    assert damage["edit_logodds_drop"]["value"] == pytest.approx(edit_drop.mean())
    for component in protocol.CONTAMINATION_COMPONENTS:
        by = damage["components"][component]["by_position"]
        assert set(by) == set(protocol.KEY_POSITIONS)
        j = entries[0]["labels"].index("subject_last")
        drop = np.array([logodds(e["pre"]) - (np.array(e["components"][component]["lp_true"][j])
                                              - np.array(e["components"][component]["lp_new"][j])) for e in entries])
        assert by["subject_last"]["share"] == pytest.approx((drop.mean(0) / edit_drop.mean()).tolist())
        assert by["subject_last"]["logodds_drop"] == pytest.approx(drop.mean(0).tolist())
        assert len(by["subject_last"]["share_ci95"]) == tiny_gpt2.cfg.n_layers
    assert damage["p_true_before"] == pytest.approx(np.mean([math.exp(e["pre"][0]) for e in entries]))
    assert "Contamination (2 prompts, 2 records" in result["markdown"]
    assert "By P(true): the full edit lowers mean P(true) by" in result["markdown"]
    by = damage["components"]["mlp_out"]["by_position"]["subject_last"]
    assert len(by["p_true_drop"]) == len(by["p_true_drop_ci95"]) == tiny_gpt2.cfg.n_layers
    # substituting the edited MLP outputs over a window holding layer 0 at the subject reproduces damage
    assert c["components"]["mlp_out"]["max_drop"]["drop"] >= 0
    # resume: nothing is edited again
    analysis.run_patch(tiny_gpt2, CF[:2], edits, tmp_path, {"model": "tiny"}, k=3, figures=False,
                       sweep_prompts=1, contamination_prompts=1)
    assert len(edits.calls) == 2
    # every figure says its n (prompts and records) and draws its 95% CIs
    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, png: drawn.update({path.name: fig}) or [])
    report_figures.patch_figures(result, tmp_path, png=False)
    assert set(drawn) == {"patch_accuracy", "patch_layer_component", "patch_windows", "patch_contamination"}
    for fig in drawn.values():
        assert "prompts" in fig.layout.title.text and "2 records" in fig.layout.title.text
    bars = {t.name: t for t in drawn["patch_accuracy"].data}
    control = bars["(b, control) attention patterns, k random heads in the same layers (mean of 5 draws)"]
    assert list(control.x) == ["accuracy on the distract prompts", "log-odds gap recovered"]
    assert control.y[1] == pytest.approx(100 * v[protocol.RANDOM_VARIANT]["recovery_pooled"])
    assert control.error_y.array[1] == pytest.approx(
        100 * (v[protocol.RANDOM_VARIANT]["recovery_pooled_ci95"][1] - v[protocol.RANDOM_VARIANT]["recovery_pooled"]))
    assert "95% CI" in drawn["patch_layer_component"].data[0].hovertemplate
    contamination = drawn["patch_contamination"]
    assert "log-odds" in contamination.layout.yaxis.title.text and "P(true)" in contamination.layout.yaxis2.title.text
    assert sum(t.fill == "toself" for t in contamination.data) == 2 * len(protocol.CONTAMINATION_COMPONENTS) * 3


def test_patch_skips_records_without_distract_prompts(tiny_llama, tmp_path):
    import dataclasses

    from attention_drift.core.data import PromptGroup

    bare = dataclasses.replace(WD[0], relation=PromptGroup((), ()))
    edits = Counter(tiny_llama)
    with pytest.raises(ValueError, match="no record"):
        analysis.run_patch(tiny_llama, [bare], edits, tmp_path, {"model": "tiny"}, figures=False)
    assert edits.calls == []


def test_patch_covers_distract_relation_prompts(tiny_llama, tmp_path):
    result = analysis.run_patch(tiny_llama, [CF[0], WD[0]], Counter(tiny_llama), tmp_path, {"model": "tiny"},
                                figures=False, sweep_prompts=0, contamination_prompts=0, random_draws=0)
    assert result["n_prompts_by_group"] == {"distract_neighborhood": len(CF[0].neighborhood.prompts),
                                            "distract_relation": len(WD[0].relation.prompts)}
    assert result["records_by_group"] == {"distract_neighborhood": 1, "distract_relation": 1}
    assert "distract-relation" in result["markdown"]


def test_given_heads_are_the_ones_patched(tiny_llama, tmp_path):
    heads = [(1, 2), (0, 1)]
    assert topk_variant(heads) == (Patch("pattern", (0,), (1,)), Patch("pattern", (1,), (2,)))
    result = analysis.run_patch(tiny_llama, CF[:1], Counter(tiny_llama), tmp_path, {"model": "tiny"}, k=2,
                                heads=heads, figures=False, sweep_prompts=0, contamination_prompts=0)
    line = json.loads((tmp_path / "patch_records.jsonl").read_text().splitlines()[1])
    assert [t[:2] for t in line["top_heads"]] == [[1, 2], [0, 1]] and line["head_source"] == "given"
    assert "sweep" not in result and "contamination" not in result


# --- the commands -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder():
    from attention_drift.core.models import tiny_model

    return tiny_model("llama").model_name


def test_drift_and_patch_commands(tiny_folder, tmp_path, capsys, monkeypatch):
    """The real CLI -> Variant -> ROME wiring on the tiny model's preset, with the edit cache."""
    monkeypatch.setattr(analysis, "png_ok", lambda: False)
    out, cache = tmp_path / "drift", tmp_path / "edits"
    argv = ["drift", "--model", tiny_folder, "--limit", "2", "--balanced", "--no-progress", "--top-k", "4",
            "--edit-cache", str(cache)]
    assert cli.main([*argv, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "## attention drift" in text and "Pearson" in text and "Spearman" in text
    data = json.loads((out / "drift.json").read_text())
    assert len(data["top_heads"]) == 4 and data["meta"]["edit"]["method"] == "rome"
    for name in ("drift_heatmap.html", "explorer.html", "drift_patterns.jsonl"):
        assert (out / name).is_file()
    # the drift-vs-failure figure needs 2 prompts the unedited (random, tiny) model got right
    assert (out / "drift_vs_failure.html").is_file() == (data["failure"]["all"]["n_kept"] >= 2)
    if data["failure"]["all"]["n_kept"] < 2:
        assert "no drift_vs_failure figure" in captured.err
    assert len(list(cache.rglob("*.pt"))) == 2  # one stored edit per record
    assert cli.main([*argv, "--out", str(tmp_path / "again")]) == 0  # replayed from the cache
    again = json.loads((tmp_path / "again" / "drift.json").read_text())
    assert again["top_heads"] == data["top_heads"]

    patch = tmp_path / "patch"
    assert cli.main(["patch", "--model", tiny_folder, "--limit", "1", "--out", str(patch), "--no-progress",
                     "--heads-from", str(out / "drift.json"), "--top-k", "2", "--no-figures"]) == 0
    text = capsys.readouterr().out
    assert "(a) attention patterns, all layers" in text and "pre-edit" in text
    assert "k random heads in the same layers" in text
    result = json.loads((patch / "patch.json").read_text())
    line = json.loads((patch / "patch_records.jsonl").read_text().splitlines()[1])
    assert [t[:2] for t in line["top_heads"]] == [[t["layer"], t["head"]] for t in data["top_heads"][:2]]
    assert result["variants"]["mlp_out_all"]["accuracy"] == result["pre"]["accuracy"]


@pytest.mark.parametrize("args, needle", [
    (["drift", "--sadr-weight", "0.1"], "--sadr"),
    (["patch", "--top-k", "0"], "--top-k"),
    (["patch", "--sweep-prompts", "-1"], "--sweep-prompts"),
    (["drift", "--balanced"], "--limit"),
])
def test_bad_options_are_one_clear_line(tmp_path, capsys, args, needle):
    assert cli.main([*args, "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attention-drift: error: ") and needle in err[0]




def _synthetic_lines(prompts_per_record=(4,), n_records=6):
    """Synthetic drift-run lines whose every third prompt the unedited model got wrong already."""
    lines, _ = synthetic_run(n_records=n_records, prompts_per_record=prompts_per_record, seed=2, n_layers=4,
                             n_heads=3, drifting=((2, 1), (3, 0)), pattern_heads=1)
    i = 0
    for line in lines[1:]:
        for s in line["samples"]:
            if i % 3 == 0:
                s["lp_true_before"], s["lp_new_before"] = s["lp_new_before"], s["lp_true_before"]
            i += 1
    return lines[1:]


def test_drift_markdown_reports_failure_on_prompts_right_before():
    result = drift_from_lines(_synthetic_lines())
    f = result["failure"]["all"]
    assert (f["n_prompts"], f["n_kept"], f["n_excluded_wrong_before"]) == (24, 16, 8)
    text = drift_markdown(result)
    assert "kept 16 of 24 prompts (8 excluded), from 6 of 6 records" in text
    assert f"all {f['rate']:.2f} [{f['ci95'][0]:.2f}, {f['ci95'][1]:.2f}] ({f['n_failed']} / 16)" in text
    assert "Pearson r vs failure | Spearman ρ vs failure | AUROC for failure" in text
    h = result["headline_right_before"]["all"]["max_kl"]
    row = next(line for line in text.splitlines() if line.startswith("| all | max_kl |"))
    assert f"{h['auroc']['value']:.3f} [{h['auroc']['ci_low']:.2f}, {h['auroc']['ci_high']:.2f}]" in row
    assert f"{h['spearman_logodds_drop']['r']:.3f}" in row and row.endswith(f"| {h['n_prompts']} / 6 |")
    assert h["n_prompts"] == 16


def test_drift_markdown_leaves_out_groups_without_prompts():
    result = drift_from_lines(_synthetic_lines(prompts_per_record=(1,)))
    text = drift_markdown(result)
    assert "| all | max_drift_subject_last |" in text and "| distract_relation |" not in text
    assert "distract_relation nan" not in text


def test_drift_failure_figure_shows_kl_beside_attention_mass():
    result = drift_from_lines(_synthetic_lines())
    fig = report_figures.drift_failure_figure(result)
    assert [a.xref for a in fig.layout.annotations] == ["x domain", "x2 domain"]
    assert fig.layout.xaxis.title.text.startswith("max_drift_subject_last")
    assert fig.layout.xaxis2.title.text.startswith("max_kl")
    kept = [s for s in result["samples"] if s["right_before"]]
    held, failed = fig.data[0], fig.data[1]
    assert len(held.x) + len(failed.x) == len(kept) and len(failed.x) == sum(s["flipped"] for s in kept)
    for text, factor in zip((a.text for a in fig.layout.annotations), report_figures.FIGURE_FACTORS):
        c = result["correlations_right_before"]["all"][factor]["logodds_drop"]
        assert f"Pearson r = {c['pearson']['r']:.3f}" in text and f"Spearman ρ = {c['spearman']['r']:.3f}" in text
        assert "AUROC = " in text and "(cluster bootstrap) for failure" in text and "n = 16 cases, 6 records" in text
    assert "16 prompts right before the edit, 6 records (8 wrong before the edit excluded)" in \
        fig.layout.title.text


def test_saved_figures_carry_the_papers_value_where_it_gives_one(tmp_path):
    import html

    import plotly.graph_objects as go

    from attention_drift.reports.paper import REPORTED

    referenced, plain = go.Figure(), go.Figure()
    plots.save_figure(referenced, tmp_path / "drift_vs_failure", png=False)
    plots.save_figure(plain, tmp_path / "drift_heatmap", png=False)
    assert html.escape(REPORTED["drift_vs_failure"][:60]) in referenced.layout.title.text
    assert "0.49-0.62" in (tmp_path / "drift_vs_failure.html").read_text()
    assert "Paper" not in (plain.layout.title.text or "")

"""How the gallery's figures read: titles that fit, sanity checks apart, and HTML small enough to
commit that still opens offline (in headless Chromium, as ``test_explorer.py`` drives it)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import torch

from attention_drift.views import plots, report_figures

from synthetic_drift import synthetic_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PX_PER_CHAR = 7 / 16
"""Width of a title character in px per px of font size (~7 px at 16 px, Arial-like text)."""
LONG = ("Restoring pre-edit activations of every kind over all layers and positions · 503 prompts, "
        "100 records (95% CIs, record-clustered bootstrap; hover for the exact values of every bar)")


# ---------------------------------------------------------------------------------------------
# titles


def _clipped(fig) -> list[str]:
    """The title lines of ``fig`` wider than the room right of the title's left edge, and a line
    count its top margin cannot hold (estimated at :data:`PX_PER_CHAR`)."""
    width = fig.layout.width or plots.DEFAULT_WIDTH
    room = width * (1 - (fig.layout.title.x or 0.0))
    lines = plots.title_lines(fig)
    problems = [f"{text!r} ({len(text) * PX_PER_CHAR * size:.0f} px > {room:.0f} px)"
                for text, size in lines if len(text) * PX_PER_CHAR * size > room]
    size = fig.layout.title.font.size
    if (fig.layout.margin.t or 100) < fig.layout.title.pad.t + len(lines) * plots.LINE_HEIGHT * size:
        problems.append(f"{len(lines)} lines in a top margin of {fig.layout.margin.t} px")
    return problems


def _patch_json(layers: int = 4, windows: int = 3) -> dict:
    """A small ``patch.json`` content with every part the patch figures draw."""
    def stats(acc, rec):
        return {"accuracy": acc, "ci95": [acc - 0.05, acc + 0.05], "half_width": 0.05, "n": 20,
                "recovery_pooled": rec, "recovery_pooled_ci95": [rec - 0.1, rec + 0.1]}

    variants = {"none": stats(0.15, 0.0), "attn_pattern_all": stats(0.3, 0.65), "attn_pattern_topk": stats(0.29, 0.57),
                "attn_pattern_random": {**stats(0.14, 0.0), "draws": 5}, "attn_out_all": stats(0.4, 1.0),
                "mlp_out_all": stats(0.4, 1.0), "mlp_out_last": stats(0.28, 0.53), "resid_subject": stats(0.33, 0.66)}
    curve = [0.1 * i for i in range(windows)]
    band = [[v - 0.05, v + 0.05] for v in curve]
    return {"records": 5, "n_prompts": 20, "pre": stats(0.4, 1.0), "variants": variants,
            "sweep": {"recovery_pooled": [[0.1, 0.2, 0.3, 0.4]] * layers, "components": ["attn_pattern", "attn_out",
                      "mlp_out", "resid_pre_last"], "n_prompts": 20, "n_records": 5,
                      "recovery_pooled_ci95": [[[0.0, 0.2]] * 4] * layers},
            "windows": {"recovery_pooled": curve, "recovery_pooled_ci95": band, "n_prompts": 20, "n_records": 5},
            "contamination": {**_contamination(), "window": 6}}


def _contamination() -> dict:
    """The ``contamination`` part of a ``patch.json`` made by the report code from synthetic lines."""
    from attention_drift.reports.patch import PatchReport
    from synthetic_patch import synthetic_patch_lines

    return PatchReport.from_lines(synthetic_patch_lines(range(5))).to_dict()["contamination"]


def _tradeoff_points() -> dict:
    entry = {"variant": "rome-sadr-plus", "n_records": 41, "recovered": 0.8, "recovered_ci95": [0.6, 1.0],
             "cost_diff": -0.03, "cost_ci95": [-0.08, 0.0], "efficacy": 1.0}
    return {"tuning half (ROME)": [entry, {**entry, "variant": "rome-plus-c1", "recovered": 0.82}],
            "report half (MEMIT)": [{**entry, "variant": "memit-sadr-plus", "n_records": 8}]}


def _every_figure(tmp_path, monkeypatch) -> dict:
    """Every figure type on small synthetic inputs, long titles, through the real saving path
    (:func:`plots.save_figure`, HTML only): ``{name: figure as saved}``."""
    from attention_drift.measure.case_study import CaseStudy
    from attention_drift.reports.drift import drift_from_lines
    from attention_drift.views.case_study import case_study_figure
    from attention_drift.views.sequence_plot import sequence_figure

    saved, save_figure = {}, plots.save_figure

    def keep(fig, path, png):
        written = save_figure(fig, path, png)
        saved[path.name] = fig
        return written

    monkeypatch.setattr(plots, "save_figure", keep)
    before, after = torch.rand(6, 4), torch.rand(6, 4)
    figures = {
        "drift_heatmap_primitive": plots.drift_heatmap(before, after, title=LONG),
        "patching_heatmap": plots.patching_heatmap(after, list(range(6)), list("abcd"), LONG),
        "recovery_curves": plots.recovery_curves({"attn": after[:, 0]}, LONG),
        "drift_vs_failure_primitive": plots.drift_vs_failure(torch.rand(12), torch.rand(12), title=LONG, bins=3),
        "metric_bars": plots.metric_bars({"rome": {"efficacy": {"accuracy": 0.9, "ci95": [0.8, 1.0]}}}, LONG),
        "metric_bar_panels": plots.metric_bar_panels(
            {"a": {"rome": {"efficacy": {"accuracy": 0.9}}}, "b": {"x": {"efficacy": {"accuracy": 0.5}}}}, LONG),
        "tradeoff_curve": plots.tradeoff_curve(["0 (ROME)", "0.01"], {"e": [1, 2]}, title=LONG + "\n30 records"),
        "recovery_tradeoff": plots.recovery_tradeoff(_tradeoff_points(), LONG),
        "case_study": case_study_figure(CaseStudy.from_json(json.loads((ROOT / "figures/case_study.json").read_text())),
                                        title=LONG),
    }
    summary = {"meta": {"model": "m", "probes": [1, 2], "monitor": {"drift_records": 5}}, "edits": [0, 20],
               "series": {"efficacy": {"value": [None, 1.0], "ci95": [None, [0.9, 1.0]]}}, "fluency": [5.0, 4.9],
               "drift": {w: {"max_delta": [None, 0.1], "heads_above": [None, 2]} for w in ("first", "latest")}}
    figures["sequence"] = sequence_figure({"rome": summary, "alphaedit": summary}, title=LONG)
    lines, _ = synthetic_run()
    report = drift_from_lines(lines[1:])
    figures["editor_drift_heatmaps"] = report_figures.editor_drift_heatmaps({"rome": report, "memit": report})
    figures["editor_drift_heatmaps"].update_layout(title_text=LONG)
    figures["recovery_tradeoff"].update_layout(width=1300)  # widened after it was drawn, as tune_sadr does
    for name, fig in figures.items():
        plots.save_figure(fig, tmp_path / name, png=False)
    lines, _ = synthetic_run()
    report_figures.drift_figures(drift_from_lines(lines[1:]), tmp_path / "drift", png=False)
    report_figures.patch_figures(_patch_json(), tmp_path / "patch", png=False)
    return saved


def test_every_figure_title_fits_its_width(tmp_path, monkeypatch):
    saved = _every_figure(tmp_path, monkeypatch)
    assert {"drift_heatmap", "drift_vs_failure", "patch_accuracy", "patch_layer_component", "patch_windows",
            "patch_contamination", "case_study", "recovery_tradeoff", "sequence", "editor_drift_heatmaps"} <= set(saved)
    assert {name: _clipped(fig) for name, fig in saved.items() if _clipped(fig)} == {}
    # the long title really was wrapped (several lines), the paper's reference line too
    assert len(plots.title_lines(saved["metric_bars"])) > 1
    assert [size for _, size in plots.title_lines(saved["patch_contamination"])][-1] == plots.REFERENCE_SIZE
    # the widened figure was re-wrapped to its new width, and its margin follows
    wide = saved["recovery_tradeoff"]
    assert len(plots.title_lines(wide)) == 2 and wide.layout.margin.t == plots.title_margin(2)
    # the case study's own margin (it sets one for its wrapped title) holds its lines
    case = saved["case_study"]
    assert case.layout.margin.t >= plots.title_margin(len(plots.title_lines(case)))


def test_the_title_check_can_fail():
    fig = plots.metric_bars({"rome": {"efficacy": {"accuracy": 0.9}}}, "short")
    assert _clipped(fig) == []
    fig.update_layout(title_text=LONG)  # set around style / fit_title: one line, far too wide
    assert _clipped(fig) and "px >" in _clipped(fig)[0]
    plots.fit_title(fig)
    assert _clipped(fig) == []
    fig.update_layout(margin_t=30)  # a margin too small for the lines: caught
    assert "top margin" in _clipped(fig)[-1]


def test_fit_title_keeps_explicit_breaks_and_escapes():
    fig = plots.tradeoff_curve([0.1, 1.0], {"e": [1, 1]}, "γ", "a <b> " + "word " * 40 + "\nsecond line")
    lines = [text for text, _ in plots.title_lines(fig)]
    assert lines[0].startswith("a <b> word") and lines[-1] == "second line" and len(lines) > 2
    assert "&lt;b&gt;" in fig.layout.title.text and "<b>" not in fig.layout.title.text
    text = fig.layout.title.text
    fig.update_layout(width=2000)
    plots.fit_title(fig)
    assert [t for t, _ in plots.title_lines(fig)] == [("a <b> " + "word " * 40).strip(), "second line"]
    fig.update_layout(width=None)
    plots.fit_title(fig)
    assert fig.layout.title.text == text  # idempotent: back to what the default width gives


# ---------------------------------------------------------------------------------------------
# the patch accuracy figure


def test_sanity_checks_are_drawn_in_their_own_panel():
    fig = report_figures.patch_accuracy_figure(_patch_json())
    axis = {t.name: t.xaxis for t in fig.data}
    sanity = {"attention outputs, all layers", "(c) MLP outputs, all layers, all positions"}
    assert {axis[name] for name in sanity} == {"x2"}
    assert {a for name, a in axis.items() if name not in sanity | {"pre-edit"}} == {"x"}
    panels = [a.text for a in fig.layout.annotations]
    assert panels[0] == "restoring pre-edit activations" and panels[1].startswith("sanity checks")
    # pre-edit is the reference in both panels, one legend entry, one colour
    pre = [t for t in fig.data if t.name == "pre-edit"]
    assert [t.xaxis for t in pre] == ["x", "x2"] and [t.showlegend for t in pre] == [True, False]
    assert pre[0].marker.color == pre[1].marker.color
    assert fig.layout.xaxis.domain[1] < fig.layout.xaxis2.domain[0]  # side by side, restoration first
    without = _patch_json()
    for name in report_figures.SANITY_CHECKS:
        del without["variants"][name]
    assert {t.xaxis for t in report_figures.patch_accuracy_figure(without).data} == {"x"}


# ---------------------------------------------------------------------------------------------
# HTML: small, offline, committed


def test_directory_html_is_small_and_shares_one_bundle(tmp_path):
    fig = plots.metric_bars({"rome": {"efficacy": {"accuracy": 0.9}}}, "t")
    a, b = plots.save_figure(fig, tmp_path / "a", png=False), plots.save_figure(fig, tmp_path / "b", png=False)
    bundle = tmp_path / plots.PLOTLY_BUNDLE
    assert [Path(p).name for p in a + b] == ["a.html", "b.html"] and bundle.stat().st_size > 1_000_000
    for page in (tmp_path / "a.html", tmp_path / "b.html"):
        text = page.read_text()
        assert page.stat().st_size < 100_000 and '<script charset="utf-8" src="plotly.min.js"></script>' in text
    bundle.write_text("/* plotly.js of another version */")
    plots.save_figure(fig, tmp_path / "a", png=False)
    from plotly.offline import get_plotlyjs

    assert bundle.read_text() == get_plotlyjs()  # a stale bundle is replaced (plotly itself would keep it)


def _open(browser, page_path: Path) -> tuple[str | None, list[str], list[str]]:
    """(the drawn title's text or None, aborted non-file requests, errors) of a page opened offline."""
    page = browser.new_page()
    requests, errors = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.route("**/*", lambda r: r.continue_() if r.request.url.startswith("file:")
               else (requests.append(r.request.url), r.abort()))
    page.goto(page_path.resolve().as_uri())
    try:
        page.wait_for_selector(".gtitle", timeout=10_000)
        title = page.text_content(".gtitle")
    except Exception:
        title = None
    page.close()
    return title, requests, errors


def test_directory_html_renders_offline_in_chromium(browser, tmp_path):
    fig = plots.metric_bars({"rome": {"efficacy": {"accuracy": 0.9}}}, "Offline " + "figure " * 20)
    plots.save_figure(fig, tmp_path / "made" / "figure", png=False)
    moved = tmp_path / "checkout"  # a fresh copy of the folder: the page and its bundle, nothing else
    shutil.copytree(tmp_path / "made", moved)
    title, requests, errors = _open(browser, moved / "figure.html")
    assert title is not None and title.replace("\u200b", "").startswith("Offline figure")
    assert requests == [] and errors == []
    (moved / plots.PLOTLY_BUNDLE).unlink()  # the check can fail: without its bundle the page draws nothing
    title, _, errors = _open(browser, moved / "figure.html")
    assert title is None and any("Plotly" in e for e in errors)


GALLERIES = ("figures/figures.md", "figures/ablations/figures.md")


def _tracked() -> set[str] | None:
    """The repository's tracked files, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return set(out.splitlines())


def test_every_file_a_gallery_names_is_committed():
    """figures.md names only files in the repository, and a plotly page's bundle is committed beside it
    (fails until the gallery is regenerated with ``plotly.min.js`` per folder and its HTML committed)."""
    tracked = _tracked()
    missing = []
    for gallery in GALLERIES:
        for line in (ROOT / gallery).read_text().splitlines():
            if not line.startswith("Files: "):
                continue
            for name in re.findall(r"`([^`]+)`", line):
                path = ROOT / name
                if not (name in tracked if tracked is not None else path.is_file()):
                    missing.append(f"{gallery}: {name}")
                elif path.suffix == ".html" and "Plotly.newPlot" in path.read_text(errors="replace"):
                    bundle = (Path(name).parent / plots.PLOTLY_BUNDLE).as_posix()
                    if 'src="plotly.min.js"' not in path.read_text(errors="replace"):
                        missing.append(f"{gallery}: {name} inlines plotly.js (save it with plotlyjs='directory')")
                    elif not (bundle in tracked if tracked is not None else (ROOT / bundle).is_file()):
                        missing.append(f"{gallery}: {bundle} (loaded by {name})")
    assert missing == []

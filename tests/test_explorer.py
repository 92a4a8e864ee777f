"""The drift explorer (attention_drift.views.explorer): its data, its files, and the page in a real browser.

The browser tests open the page in headless Chromium (Debian's ``chromium`` package, driven by
``playwright`` through ``executable_path``; playwright never downloads a browser here) with every
non-file request aborted and recorded, and are skipped with the reason when either is missing.
``ATTENTION_DRIFT_EXPLORER_RUN=<drift run folder>`` adds a screenshot of that run's explorer,
written to ``ATTENTION_DRIFT_EXPLORER_PNG`` (e.g. ``figures/explorer.png``).
"""

import base64
import json
import os
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from attention_drift.measure.drift import drift_record
import torch

from attention_drift.runs import analysis

from attention_drift.views import explorer, viz
from attention_drift.core.data import load_example
from attention_drift.measure.drift import Regions, record_prompts
from attention_drift.views.explorer import ExplorerData, ExplorerError, ExplorerRun, PromptPatterns
from attention_drift.core.jsonl import RunFile
from attention_drift.reports.drift import drift_from_lines

from handmade_edit import push_subject  # noqa: E402
from synthetic_drift import synthetic_run, write_run  # noqa: E402


# ---------------------------------------------------------------------------------------------
# helpers


def _page_parts(text: str) -> tuple[dict, bytes]:
    """(payload, decompressed binary block) of a written explorer page or fragment."""
    payload = json.loads(re.search(r'<script type="application/json" id="[\w-]+">(.*?)</script>', text, re.S).group(1))
    raw = base64.b64decode(re.search(r'<script type="application/octet-stream" id="[\w-]+">(.*?)</script>', text, re.S).group(1))
    return payload, zlib.decompress(raw) if payload["blob"]["deflate"] else raw


def _read(blob: bytes, ref: dict) -> np.ndarray:
    dtype = {"f4": "<f4", "f2": "<f2", "q8": "u1"}[ref["t"]]
    size = np.dtype(dtype).itemsize
    values = np.frombuffer(blob[ref["o"]: ref["o"] + ref["n"] * size], dtype=dtype).astype(np.float64)
    return (values / 255) ** 2 if ref["t"] == "q8" else values


def _row(run: ExplorerRun, case_id, index: int) -> int:
    return next(i for i, r in enumerate(run.prompts) if r.case_id == case_id and r.index == index)


@pytest.fixture
def synthetic():
    lines, patterns = synthetic_run()
    return lines, patterns


# ---------------------------------------------------------------------------------------------
# data


def test_metrics_match_the_drift_report(synthetic):
    lines, _ = synthetic
    run = ExplorerRun.from_lines(lines)
    assert run.label == "ROME" and (run.n_layers, run.n_heads) == (30, 9) and len(run.prompts) == 8
    report = drift_from_lines(lines[1:], top_k=5, threshold=0.05)
    metrics = run.head_metrics(0.05)
    stats = report["head_stats"]
    np.testing.assert_allclose(metrics["mean_drift"], stats["delta_subject_last"]["mean"], atol=1e-6)
    np.testing.assert_allclose(metrics["frac_above"], stats["delta_subject_last"]["frac_above"], atol=1e-6)
    np.testing.assert_allclose(metrics["kl"], stats["kl"]["mean"], atol=1e-6)
    assert run.top_heads(5) == [(t["layer"], t["head"]) for t in report["top_heads"]]
    assert run.top_heads(1) == [(17, 3)]
    fails = np.array([s["fails"] for line in lines[1:] for s in line["samples"]], dtype=float)
    assert 0 < fails.sum() < fails.size
    drift = np.concatenate([np.array(l["heads"]["subject_last_after"]) - np.array(l["heads"]["subject_last_before"])
                            for l in lines[1:]])
    right = np.array([s["lp_true_before"] >= s["lp_new_before"] for line in lines[1:] for s in line["samples"]])
    flipped = fails[right]
    assert metrics["corr_fails"][17, 3] == pytest.approx(np.corrcoef(drift[right, 17, 3], flipped)[0, 1], abs=1e-6)
    assert run.failure_rate()["all"] == pytest.approx(flipped.mean())


def test_from_run_reads_a_folder_with_its_patterns_file(tmp_path, synthetic):
    lines, patterns = synthetic
    write_run(tmp_path, lines)
    explorer.write_patterns(tmp_path / explorer.PATTERNS_FILE, patterns, {"heads": "top"}, method="rome")
    data = ExplorerData.from_run(tmp_path)
    assert data.title == "Drift explorer · smollm2-135m · ROME" and data.comparison is None
    assert len(data.run.patterns) == len(patterns) == 8
    for (case_id, index), given in patterns.items():
        stored = data.run.patterns[(json.dumps(case_id), index)]
        assert stored.tokens == tuple(given["tokens"]) and stored.subject_last == given["subject_last"]
        row = _row(data.run, case_id, index)
        for (l, h), pair in given["heads"].items():
            before, after = stored.heads[(l, h)]
            np.testing.assert_array_equal(before, pair["before"])
            np.testing.assert_array_equal(after, pair["after"])
            # the pattern's measured cell is the value the run measured for that head and prompt
            assert float(before[stored.query, stored.subject_last]) == pytest.approx(data.run.before[row, l, h], abs=1e-3)
            assert float(after[stored.query, stored.subject_last]) == pytest.approx(data.run.after[row, l, h], abs=1e-3)
    assert not ExplorerData.from_run(tmp_path, patterns=False).run.patterns
    assert ExplorerData.from_run(tmp_path / explorer.RUN_FILE).run.patterns.keys() == data.run.patterns.keys()


def test_explore_command_writes_the_page_of_a_run_and_its_comparison(tmp_path, synthetic):
    from attention_drift import cli

    lines, _ = synthetic
    first, second = tmp_path / "rome", tmp_path / "rome-sadr"
    write_run(first, lines)
    write_run(second, synthetic_run(sadr=True, shift=0.7, seed=1)[0])
    out = tmp_path / "page.html"
    assert cli.main(["explore", str(first), "--comparison", str(second), "--out", str(out), "--no-open"]) == 0
    payload, _ = _page_parts(out.read_text())
    assert len(payload["runs"]) == 2 and payload["runs"][1]["match"] == list(range(8))
    assert cli.main(["explore", str(first), "--no-open"]) == 0
    assert (first / "explorer.html").exists()


def test_patterns_file_round_trip_and_layouts(tmp_path):
    rng = np.random.default_rng(1)
    causal = np.tril(rng.uniform(0, 1, (5, 5)))
    causal /= causal.sum(-1, keepdims=True)
    full = rng.uniform(0, 1, (5, 5))
    p = PromptPatterns.from_dict({"tokens": list("abcde"), "query": 4, "subject_last": 1,
                                  "heads": {"3,2": {"before": torch.tensor(causal), "after": full}, (1, 0): (full, causal)}})
    assert set(p.heads) == {(3, 2), (1, 0)}
    entry = p.to_json(2)
    assert [e["before"]["layout"] for e in entry["heads"]] == ["full", "tril"]
    assert len(base64.b64decode(entry["heads"][1]["before"]["f16"])) == 2 * 15
    path = explorer.write_patterns(tmp_path / "p.jsonl", {("case-a", 2): p})
    back = explorer.read_patterns(path)[("case-a", 2)]
    for key in p.heads:
        for a, b in zip(p.heads[key], back.heads[key]):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(back.heads[(3, 2)][0].astype(float), causal, atol=1e-3)


def test_patterns_line_through_a_resumable_run_file(tmp_path, synthetic):
    """How a drift run writes patterns record by record: RunFile lines of patterns_line."""
    lines, patterns = synthetic
    path = tmp_path / explorer.PATTERNS_FILE
    meta = {"format": explorer.PATTERNS_FORMAT, "heads": [[17, 3]]}
    by_case = {}
    for (case_id, index), p in patterns.items():
        by_case.setdefault(case_id, {})[index] = p
    cases = list(by_case)
    with RunFile(path, meta) as run:
        run.write(explorer.patterns_line(cases[0], by_case[cases[0]], "rome"))
    with RunFile(path, meta) as run:
        assert run.done(cases[0], "rome")
        for case_id in cases[1:]:
            run.write(explorer.patterns_line(case_id, by_case[case_id], "rome"))
    read = explorer.read_patterns(path)
    assert set(read) == set(patterns)
    assert explorer.read_patterns(path, method="memit") == {}


def test_bad_input_gets_clear_errors(tmp_path, synthetic):
    lines, patterns = synthetic
    with pytest.raises(ExplorerError, match="drift_records.jsonl"):
        ExplorerData.from_run(tmp_path / "nowhere")
    with pytest.raises(ExplorerError, match="match no prompt"):
        ExplorerData.from_run(lines, patterns={(424242, 0): patterns[(1000, 0)]})
    bad = dict(patterns[(1000, 0)])
    bad["tokens"] = bad["tokens"][:-1]
    with pytest.raises(ExplorerError, match="tokens"):
        ExplorerData.from_run(lines, patterns={(1000, 0): bad})
    with pytest.raises(ExplorerError, match="subject_last"):
        ExplorerData.from_run(lines, patterns={(1000, 0): {**patterns[(1000, 0)], "subject_last": 99}})
    other, _ = synthetic_run(method="memit", seed=3)
    with pytest.raises(ExplorerError, match="method="):
        ExplorerData.from_run(lines + other[1:])
    assert ExplorerData.from_run(lines + other[1:], method="memit").run.label == "MEMIT"
    small, _ = synthetic_run(n_layers=4, n_heads=2, drifting=((1, 1),), pattern_heads=1)
    with pytest.raises(ExplorerError, match="same model"):
        ExplorerData.from_run(lines, comparison=small)
    broken = [dict(line) for line in lines]
    broken[1] = {**broken[1], "heads": {**broken[1]["heads"], "kl": broken[1]["heads"]["kl"][:1]}}
    with pytest.raises(ExplorerError, match="prompts, layer, head"):
        ExplorerData.from_run(broken)
    write_run(tmp_path / "run", lines)
    with pytest.raises(ExplorerError, match="not a patterns file"):
        explorer.read_patterns(tmp_path / "run" / explorer.RUN_FILE)
    with pytest.raises(ExplorerError, match="no record"):
        ExplorerData.from_run([lines[0]])


def test_sadr_selected_fractions():
    mask = torch.zeros(4, 2, 2, 3, dtype=torch.bool)   # [step, row, layer, head]
    mask[:, :, 0, 1] = True
    mask[:2, 0, 1, 2] = True
    out = explorer.sadr_selected([{"layers": (3, 4), "mask": list(mask)}, {"layers": (3, 4), "mask": []}], 5, 3)
    expected = np.zeros((5, 3))
    expected[3, 1], expected[4, 2] = 1.0, 0.25
    np.testing.assert_allclose(out, expected)


def test_page_payload_round_trips_the_numbers(synthetic):
    lines, patterns = synthetic
    second, _ = synthetic_run(sadr=True, shift=0.7, seed=1)
    data = ExplorerData.from_run(lines, patterns=patterns, comparison=second)
    assert data.comparison.label == "ROME + SADR"
    payload, blob = _page_parts(explorer.explorer_html(data))
    assert payload["format"] == explorer.FORMAT and payload["n_layers"] == 30
    run = payload["runs"][0]
    np.testing.assert_allclose(_read(blob, run["before"]).reshape(8, 30, 9), data.run.before, atol=1e-3)
    np.testing.assert_allclose(_read(blob, run["metrics"]["mean_drift"]).reshape(30, 9),
                               data.run.head_metrics()["mean_drift"], atol=1e-6)
    lp = _read(blob, run["lp"]).reshape(-1, 4)
    assert lp[3, 2] == pytest.approx(data.run.prompts[3].lp_true_after, abs=1e-5)
    row = _row(data.run, 1001, 1)
    stored = run["patterns"][str(row)]
    q = len(stored["tokens"])
    before = _read(blob, stored["heads"]["17,3"][0])
    assert before.size == q * (q + 1) // 2   # causal: the lower triangle only
    full = np.zeros((q, q))
    full[np.tril_indices(q)] = before
    np.testing.assert_allclose(full, data.run.patterns[("1001", 1)].heads[(17, 3)][0].astype(float), atol=0.01)
    assert payload["runs"][1]["match"] == list(range(8))
    sadr = _read(blob, payload["runs"][1]["sadr"]["mean"]).reshape(30, 9)
    assert sadr[17, 3] == pytest.approx(0.9) and run["sadr"] is None


def test_page_is_self_contained_with_one_copy_of_the_script(tmp_path, synthetic):
    lines, patterns = synthetic
    path = explorer.write_explorer(tmp_path / "explorer", ExplorerData.from_run(lines, patterns=patterns))
    assert path.suffix == ".html"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert text.count("window.ADExplorer = {") == 1 and text.count("<style>") == 1
    assert not re.search(r"""\b(?:src|href)\s*=\s*["']?(?:https?:)?//""", text)
    assert "@import" not in text and "url(http" not in text


HOSTILE = {
    "comment": "<!--<script>",
    "close": "</script>",
    "close-upper": "</SCRIPT >",
    "img": '<img src=x onerror="window.__pwned = 1">',
    "quotes": "\"double\" 'single' & &amp; \\ back`tick`",
    "separators": "line\u2028para\u2029end",
}
"""Strings a prompt, subject, target or token may hold that must not end or change the page's
script elements: an HTML comment opener followed by ``<script>`` (the "double-escaped" state, in
which the real ``</script>`` no longer ends the data block), closing tags, markup, quotes, an
ampersand and the JavaScript line / paragraph separators."""


def hostile_run() -> tuple[list, dict]:
    """A synthetic run whose first record carries :data:`HOSTILE` strings in its case_id,
    subject, targets, prompts, model name and pattern tokens."""
    lines, patterns = synthetic_run(n_records=2, prompts_per_record=(2,), pattern_heads=2)
    lines[0]["meta"]["model"] = "model " + HOSTILE["comment"]
    record = lines[1]
    old_id = record["case_id"]
    record["case_id"] = "case " + HOSTILE["close"]
    record["subject"] = "Acme " + HOSTILE["comment"] + " Corp"
    record["target_new"] = HOSTILE["img"]
    for i, sample in enumerate(record["samples"]):
        sample["case_id"] = record["case_id"]
        sample["target_true"] = HOSTILE["separators"]
        sample["prompt"] = (f"{record['subject']} {HOSTILE['close']} {HOSTILE['close-upper']} {HOSTILE['quotes']} "
                            f"{HOSTILE['separators']} #{i}")
    out = {}
    for (case_id, i), p in patterns.items():
        if case_id == old_id:
            p = {**p, "tokens": ["<|endoftext|>", *HOSTILE.values(), *p["tokens"][len(HOSTILE) + 1:]]}
            case_id = record["case_id"]
        out[(case_id, i)] = p
    return lines, out


def _data_block(fragment: str) -> str:
    return re.search(r'<script type="application/json" id="[\w-]+">(.*?)</script>', fragment, re.S).group(1)


def test_embedded_json_cannot_end_or_change_its_script_element():
    """The payload's JSON holds no ``<``, ``>`` or ``&`` (nor U+2028 / U+2029) at all: they are
    written as \\u escapes, which JSON reads back as the same characters; so the fragment has
    exactly its four script elements and the data block parses to the original strings."""
    strings = list(HOSTILE.values())
    payload = {"strings": strings, "nested": {HOSTILE["comment"]: [HOSTILE["close"], {"k": HOSTILE["img"]}]}}
    fragment = explorer.render("patterns", payload, b"\x00\x01")
    block = _data_block(fragment)
    assert not set(block) & set("<>&\u2028\u2029"), block
    assert block.isascii()
    decoded = json.loads(block)
    assert decoded["strings"] == strings and decoded["nested"] == payload["nested"]
    assert len(re.findall(r"<script\b", fragment, re.I)) == len(re.findall(r"</script", fragment, re.I)) == 4


def test_hostile_strings_of_a_run_reach_the_page_payload_unchanged():
    lines, patterns = hostile_run()
    data = ExplorerData.from_run(lines, patterns=patterns)
    text = explorer.document(data.title, explorer.explorer_html(data))
    assert not set(_data_block(text)) & set("<>&")
    payload, _ = _page_parts(text)
    run = payload["runs"][0]
    assert run["records"][0]["case_id"] == lines[1]["case_id"]
    assert run["records"][0]["subject"] == lines[1]["subject"] and run["records"][0]["target_new"] == HOSTILE["img"]
    assert [p["p"] for p in run["prompts"][:2]] == [s["prompt"] for s in lines[1]["samples"]]
    assert run["meta"]["model"] == lines[0]["meta"]["model"]
    tokens = [p["tokens"] for p in run["patterns"].values()]
    assert ["<|endoftext|>", *HOSTILE.values()] in [t[: len(HOSTILE) + 1] for t in tokens]


def test_a_100_record_run_stays_a_few_megabytes(tmp_path):
    lines, patterns = synthetic_run(n_records=100, prompts_per_record=(7,), pattern_heads=5)
    data = ExplorerData.from_run(lines, patterns=patterns)
    assert len(data.run.prompts) == 700 and len(patterns) == 700
    size = explorer.write_explorer(tmp_path / "big.html", data).stat().st_size
    assert size < 4_000_000, f"{size / 1e6:.1f} MB"
    bare = explorer.write_explorer(tmp_path / "bare.html", ExplorerData.from_run(lines, patterns=False)).stat().st_size
    assert bare < 2_000_000


def test_real_drift_lines_and_patterns_of_a_tiny_model(tiny_llama):
    """Lines of drift.drift_record and patterns read with viz.head_patterns inside the same
    edit agree on the measured cell (prediction row -> subject's last token)."""
    record = next(r for r in load_example() if r.kind == "counterfact")
    edit = lambda r: push_subject(tiny_llama, r.rewrite)  # noqa: E731
    line = drift_record(tiny_llama, record, edit).to_line()
    run = ExplorerRun.from_lines([{"meta": {"model": "tiny", "method": "handmade"}}, {**line, "method": "handmade"}])
    heads = run.top_heads(2)
    prompts, _, _ = record_prompts(record, analysis.DRIFT_GROUPS)
    patterns = {}
    for index, prompt in enumerate(prompts[:2]):
        entry = {}
        for l, h in heads:
            before, toks = viz.head_patterns(tiny_llama, prompt, l, [h])
            with edit(record):
                after, _ = viz.head_patterns(tiny_llama, prompt, l, [h])
            entry[(l, h)] = {"before": before[0], "after": after[0]}
        subject_last = Regions.of(tiny_llama, record.rewrite, prompt).subject[1]
        patterns[(record.case_id, index)] = {"tokens": toks, "query": len(toks) - 1, "subject_last": subject_last,
                                             "heads": entry}
    data = ExplorerData.from_run([{"meta": {"model": "tiny", "method": "handmade"}}, {**line, "method": "handmade"}],
                                 patterns=patterns)
    for (case_key, index), p in data.run.patterns.items():
        row = _row(data.run, json.loads(case_key), index)
        for (l, h), (before, after) in p.heads.items():
            assert float(before[p.query, p.subject_last]) == pytest.approx(float(data.run.before[row, l, h]), abs=2e-3)
            assert float(after[p.query, p.subject_last]) == pytest.approx(float(data.run.after[row, l, h]), abs=2e-3)
    assert explorer.explorer_html(data).count('<div class="ad-explorer"') == 1


def test_viz_explorer_view(tmp_path, synthetic):
    lines, patterns = synthetic
    view = viz.explorer(lines, patterns=patterns, top_k=3, title="run A")
    assert isinstance(view, viz.PageView) and view.title == "run A"
    assert view._repr_html_() == view.html() and 'data-kind="explorer"' in view.html()
    payload, _ = _page_parts(view.html())
    assert payload["top_k"] == 3 and len(payload["runs"][0]["top"]) == 3
    saved = view.save(tmp_path / "x")
    assert saved.name == "x.html" and saved.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    data = ExplorerData.from_run(lines)
    assert viz.explorer(data).title == data.title
    with pytest.raises(viz.VizError, match="from_run"):
        viz.explorer(data, top_k=3)


# ---------------------------------------------------------------------------------------------
# in a real browser


# the `browser` fixture (headless Chromium, or a skip / CI failure with the reason) is in conftest.py


class Opened:
    """A page opened offline: every non-file request is aborted and recorded."""

    def __init__(self, browser, path: Path, width: int = 1600):
        self.page = browser.new_page(viewport={"width": width, "height": 1100})
        self.requests, self.errors = [], []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.route("**/*", self._route)
        self.page.goto(path.resolve().as_uri())
        self.page.wait_for_selector(".ad-explorer[data-ready], .ad-explorer[data-error]", state="attached",
                                    timeout=20_000)

    def _route(self, route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            self.requests.append(route.request.url)
            route.abort()

    def check(self):
        assert self.page.get_attribute(".ad-explorer", "data-error") is None
        assert self.errors == [] and self.requests == []


def test_network_blocking_catches_requests(browser, tmp_path):
    """The offline check can fail: a page that loads a remote image is caught."""
    path = tmp_path / "remote.html"
    path.write_text('<div class="ad-explorer" data-ready="1"></div><img src="https://example.com/x.png">')
    opened = Opened(browser, path)
    opened.page.wait_for_timeout(200)
    assert opened.requests == ["https://example.com/x.png"]
    opened.page.close()


def test_explorer_in_the_browser(browser, tmp_path, synthetic):
    lines, patterns = synthetic
    second, second_patterns = synthetic_run(sadr=True, shift=0.7, seed=1, pattern_heads=1)
    data = ExplorerData.from_run(lines, patterns=patterns, comparison=second, comparison_patterns=second_patterns)
    path = explorer.write_explorer(tmp_path / "explorer.html", data)
    opened = Opened(browser, path)
    page = opened.page
    panel = page.locator("[data-role=head-panel]")
    # starts on the top head and the prompt where it drifts most among those with a pattern
    assert (panel.get_attribute("data-layer"), panel.get_attribute("data-head")) == ("17", "3")
    assert page.locator("figure.ad-heatmap").count() == 2

    # clicking a heatmap cell shows that head: before / after / diff with the measured cell
    page.click('figure.ad-heatmap[data-run="0"] rect[data-layer="20"][data-head="5"]')
    assert (panel.get_attribute("data-layer"), panel.get_attribute("data-head")) == ("20", "5")
    assert "L20H5" in panel.locator("[data-role=head-title]").inner_text()
    prompt = int(panel.get_attribute("data-prompt"))
    info = data.run.prompts[prompt]
    stored = data.run.patterns[(json.dumps(info.case_id), info.index)]
    panels = panel.locator("figure.ad-matrix")
    assert [panels.nth(i).get_attribute("data-panel") for i in range(panels.count())] == ["before", "after", "diff"]
    measured = panel.locator("figure.ad-matrix[data-panel=before] rect.ad-measured")
    assert measured.get_attribute("data-measured") == f"{stored.query},{stored.subject_last}"
    labels = panel.locator("figure.ad-matrix[data-panel=before] text.ad-tok").all_text_contents()
    assert [t.replace("␣", " ") for t in labels[: len(stored.tokens)]] == list(stored.tokens)
    assert "blue = attention lost" in panel.inner_text() and "leaves out the first token" in panel.inner_text()
    before, after = data.run.before[prompt, 20, 5], data.run.after[prompt, 20, 5]
    assert f"{before:.3f} → {after:.3f}" in panel.locator("[data-role=measured]").first.inner_text()

    # the comparison run's pattern of the top head is drawn next to it
    page.click('[data-role=top-table] tr[data-layer="17"][data-head="3"]')
    kinds = [panels.nth(i).get_attribute("data-panel") for i in range(panels.count())]
    assert kinds == ["before", "after", "diff", "after-1", "diff-1"]

    # switching prompts
    page.click('tr[data-prompt="4"]')
    assert panel.get_attribute("data-prompt") == "4"
    assert data.run.prompts[4].prompt in panel.inner_text()
    assert page.locator('tr[data-prompt="4"]').get_attribute("class") == "ad-selected-row"

    # heatmap metrics: the cells carry the numbers the run computes
    page.select_option("[data-role=metric]", "kl")
    cell = page.locator('figure.ad-heatmap[data-run="0"] rect[data-layer="17"][data-head="3"]')
    assert float(cell.get_attribute("data-value")) == pytest.approx(data.run.head_metrics()["kl"][17, 3], rel=1e-4)
    page.select_option("[data-role=metric]", "prompt")
    assert float(cell.get_attribute("data-value")) == pytest.approx(float(data.run.drift[4, 17, 3]), abs=2e-3)
    page.select_option("[data-role=view]", "diff")
    diff = page.locator('figure.ad-heatmap[data-run="diff"] rect[data-layer="17"][data-head="3"]')
    expected = float(data.comparison.drift[4, 17, 3] - data.run.drift[4, 17, 3])
    assert float(diff.get_attribute("data-value")) == pytest.approx(expected, abs=3e-3)
    page.select_option("[data-role=view]", "runs")
    page.select_option("[data-role=metric]", "mean_drift")

    # a head without a stored pattern shows the measured values and says so
    page.click('figure.ad-heatmap[data-run="1"] rect[data-layer="29"][data-head="8"]')
    missing = panel.locator("[data-role=no-pattern]")
    assert "No full attention pattern of L29H8" in missing.inner_text()
    assert panel.locator("figure.ad-matrix").count() == 0
    assert f"{data.run.before[4, 29, 8]:.3f} → {data.run.after[4, 29, 8]:.3f}" in panel.inner_text()
    missing.locator("button.ad-chip", has_text="L17H3").click()
    assert panel.get_attribute("data-head") == "3" and panel.locator("figure.ad-matrix").count() == 5

    # SADR: the heads it selected with the drift of both runs; markers on its heatmap
    sadr = page.locator("[data-role=sadr-table] tbody tr")
    assert sadr.count() == 15 and sadr.first.locator("td").first.inner_text() in {"L17H3", "L20H5", "L12H1"}
    assert page.locator('figure.ad-heatmap[data-run="1"] circle.ad-sadr-mark').count() > 0
    assert page.locator('figure.ad-heatmap[data-run="0"] circle.ad-sadr-mark').count() == 0

    # failed-only filter
    page.check("[data-role=failed-only]")
    visible = page.locator("[data-role=prompt-table] tbody tr:visible").count()
    assert visible == sum(r.fails for r in data.run.prompts)
    page.uncheck("[data-role=failed-only]")

    shot = tmp_path / "explorer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    opened.check()
    page.close()


def test_before_after_view_in_the_browser(browser, tmp_path):
    tokens = ["<s>", "The", " Eiffel", " Tower", " is", " in"]
    scores = torch.randn(2, 6, 6)
    scores[..., 0] += 4
    scores = scores.masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    before = scores.softmax(-1)
    after = (scores + torch.randn(2, 6, 6)).softmax(-1)
    path = viz.save_html(viz.before_after_view(before, after, tokens, heads=[3, 5], layer=12, subject_last=3), tmp_path / "ba")
    opened = Opened(browser, path, width=1300)
    page = opened.page
    heads = page.locator("section.ad-head")
    assert heads.count() == 2 and heads.nth(1).get_attribute("data-head-label") == "L12H5"
    assert heads.nth(0).locator("figure.ad-matrix").count() == 3
    assert page.locator("rect.ad-measured").first.get_attribute("data-measured") == "5,3"
    legend = heads.nth(0).inner_text()
    assert "leaves out the first token" in legend and "blue = attention lost after the edit, red = attention gained" in legend
    top = float(heads.nth(0).locator(".ad-hi").first.inner_text())
    assert top == pytest.approx(max(float(before[0, :, 1:].max()), float(after[0, :, 1:].max())), abs=1e-3)
    page.check("[data-role=include-first]")
    top_all = float(page.locator("section.ad-head").nth(0).locator(".ad-hi").first.inner_text())
    assert top_all == pytest.approx(max(float(before[0].max()), float(after[0].max())), abs=1e-3)
    opened.check()
    page.close()


def test_hostile_strings_show_as_text_in_the_browser(browser, tmp_path):
    """Prompts, subjects, targets, case ids, the model name and tokens holding ``<!--<script>``,
    ``</script>``, markup, quotes and U+2028: the page finishes loading, shows each string as
    text and runs nothing from it."""
    lines, patterns = hostile_run()
    data = ExplorerData.from_run(lines, patterns=patterns)
    opened = Opened(browser, explorer.write_explorer(tmp_path / "hostile.html", data))
    page = opened.page
    assert page.get_attribute(".ad-explorer", "data-ready") == "1"
    assert page.evaluate("window.__pwned") is None and page.locator("img").count() == 0
    table = page.locator("[data-role=prompt-table] tbody")
    texts = table.locator("td.ad-ptext").all_text_contents()
    assert texts[:2] == [s["prompt"] for s in lines[1]["samples"]]
    first = table.locator("tr").first.locator("td").all_text_contents()
    assert first[1] == lines[1]["case_id"] and first[4] == f"{HOSTILE['separators']} / {HOSTILE['img']}"
    assert lines[0]["meta"]["model"] in page.locator(".ad-explorer").text_content()
    # the tokens of the first prompt's stored pattern label the matrix, as text
    page.click('tr[data-prompt="0"]')
    page.click('[data-role=top-table] tr[data-layer="17"][data-head="3"]')
    panel = page.locator("[data-role=head-panel]")
    labels = panel.locator("figure.ad-matrix[data-panel=before] text.ad-tok").all_text_contents()
    assert [t.replace("\u2423", " ") for t in labels[1: len(HOSTILE) + 1]] == list(HOSTILE.values())
    assert page.evaluate("window.__pwned") is None and page.locator("img").count() == 0
    opened.check()
    page.close()


@pytest.mark.skipif(not os.environ.get("ATTENTION_DRIFT_EXPLORER_RUN"),
                    reason="set ATTENTION_DRIFT_EXPLORER_RUN=<drift run folder> (and ATTENTION_DRIFT_EXPLORER_PNG) "
                           "to screenshot a real run's explorer")
def test_screenshot_of_a_run(browser, tmp_path):
    comparison = os.environ.get("ATTENTION_DRIFT_EXPLORER_COMPARISON") or None
    data = ExplorerData.from_run(os.environ["ATTENTION_DRIFT_EXPLORER_RUN"], comparison=comparison)
    opened = Opened(browser, explorer.write_explorer(tmp_path / "run.html", data))
    out = Path(os.environ.get("ATTENTION_DRIFT_EXPLORER_PNG") or tmp_path / "explorer.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    opened.page.screenshot(path=str(out), full_page=False)
    opened.check()
    assert out.stat().st_size > 20_000

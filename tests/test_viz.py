import base64
import json
import re
import zlib

import numpy as np
import pytest
import torch
from circuitsvis.attention import attention_heads

from attention_drift.views import viz
from attention_drift.views.viz import (
    AttentionView,
    PageView,
    VizError,
    attention_heads_view,
    before_after_view,
    difference_view,
    head_patterns,
    save_html,
)

BUNDLE_START = "var CircuitsVis="
TOKENS = ["The", " Eiffel", " Tower", " is"]


def _pattern(heads=2, seq=4):
    scores = torch.randn(heads, seq, seq).masked_fill(torch.ones(seq, seq).triu(1).bool(), float("-inf"))
    return scores.softmax(-1)


def _render_props(page: str) -> list[dict]:
    calls = re.findall(r"CircuitsVis\.render\(\s*\"[\w-]+\",\s*CircuitsVis\.AttentionHeads,\s*(\{.*?\})\s*\)", page, re.S)
    return [json.loads(c) for c in calls]


def _assert_offline(text: str) -> None:
    assert "unpkg.com" not in text and "esm.js" not in text
    assert not re.search(r"<script[^>]*\bsrc=", text)
    assert BUNDLE_START in text


def test_head_patterns_tiny_llama(tiny_llama):
    prompt = "The Eiffel Tower is located in"
    pattern, tokens = head_patterns(tiny_llama, prompt, 1, [3, 1])
    q = len(tokens)
    assert pattern.shape == (2, q, q) and pattern.dtype == torch.float32
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, q))
    assert torch.all(pattern.triu(1) == 0)
    full, _ = head_patterns(tiny_llama, prompt, 1)
    assert full.shape == (4, q, q)
    torch.testing.assert_close(pattern, full[[3, 1]])
    assert "".join(tokens) == prompt


def test_head_patterns_tiny_gpt2(tiny_gpt2):
    pattern, tokens = head_patterns(tiny_gpt2, "Toyota is in Japan", 0, [0])
    assert pattern.shape == (1, len(tokens), len(tokens))
    torch.testing.assert_close(pattern.sum(-1), torch.ones(1, len(tokens)))


def test_head_patterns_bad_layer_or_head(tiny_llama):
    with pytest.raises(VizError, match="layers 0..1"):
        head_patterns(tiny_llama, "The Louvre", 2, [0])
    with pytest.raises(VizError, match="heads 0..3"):
        head_patterns(tiny_llama, "The Louvre", 0, [0, 4])


def test_attention_heads_view_renders_offline():
    view = attention_heads_view(_pattern(), TOKENS, ["a", "b"], title="heads")
    text = view._repr_html_()
    _assert_offline(text)
    (props,) = _render_props(text)
    assert props["tokens"] == TOKENS and props["attentionHeadNames"] == ["a", "b"]
    assert torch.tensor(props["attention"]).shape == (2, 4, 4)
    with pytest.raises(VizError, match="2 heads"):
        attention_heads_view(_pattern(), TOKENS, ["a"])
    with pytest.raises(VizError, match="3 tokens"):
        attention_heads_view(_pattern(), TOKENS[:3])


def _two_panel_view() -> AttentionView:
    panels = tuple((name, attention_heads(_pattern(), TOKENS, attention_head_names=["x", "y"])) for name in ("a", "b"))
    return AttentionView("two panels", panels, side_by_side=True)


def test_attention_view_two_panels_one_bundle(tmp_path):
    page = _two_panel_view().page()
    assert page.count(BUNDLE_START) == 1
    ids = re.findall(r'CircuitsVis\.render\(\s*"([\w-]+)"', page)
    assert len(set(ids)) == 2 and all(f'<div id="{i}"' in page for i in ids)
    path = save_html(_two_panel_view(), tmp_path / "two")
    assert path == tmp_path / "two.html"
    saved = path.read_text(encoding="utf-8")
    assert saved.startswith("<!DOCTYPE html>") and path.stat().st_size > 1_000_000
    _assert_offline(saved)


def test_view_falls_back_to_one_bundle_per_panel(monkeypatch):
    monkeypatch.setattr(viz, "_bundle", lambda: "")
    page = _two_panel_view().page()
    assert page.count(BUNDLE_START) == 2
    assert page.count("<section") == 2 and page.count("</section>") == 2


def _pattern_payload(view: PageView) -> tuple[dict, list[torch.Tensor]]:
    """The payload of a pattern view and its matrices (before, after per head, in order)."""
    payload = json.loads(re.search(r'<script type="application/json" id="[\w-]+">(.*?)</script>', view.html(), re.S).group(1))
    raw = re.search(r'<script type="application/octet-stream" id="[\w-]+">(.*?)</script>', view.html(), re.S).group(1)
    blob = zlib.decompress(base64.b64decode(raw))
    q = len(payload["tokens"])

    def read(ref):
        return torch.from_numpy(np.frombuffer(blob[ref["o"]: ref["o"] + 4 * ref["n"]], dtype="<f4").copy()).view(q, q)

    return payload, [read(h[k]) for h in payload["heads"] for k in ("before", "after") if h[k] is not None]


def test_before_after_view_marks_the_measured_cell(tmp_path):
    before, after = _pattern(), _pattern()
    view = before_after_view(before, after, TOKENS, heads=[3, 5], layer=12, subject_last=2)
    assert isinstance(view, PageView) and view.title == "layer 12: before vs after the edit"
    payload, matrices = _pattern_payload(view)
    assert [h["label"] for h in payload["heads"]] == ["L12H3", "L12H5"]
    assert payload["tokens"] == TOKENS and payload["query"] == 3 and payload["subject"] == 2
    assert payload["labels"] == ["before the edit", "after the edit"] and payload["signed"] is False
    for got, want in zip(matrices, [before[0], after[0], before[1], after[1]]):
        torch.testing.assert_close(got, want)
    page = view.page()
    assert page.count("window.ADExplorer = {") == 1 and BUNDLE_START not in page
    assert not re.search(r"<script[^>]*\bsrc=", page)
    path = save_html(view, tmp_path / "ba")
    saved = path.read_text(encoding="utf-8")
    assert path == tmp_path / "ba.html" and saved.startswith("<!DOCTYPE html>") and view.html() in saved
    assert view.save(tmp_path / "again.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert _pattern_payload(before_after_view(before, after, TOKENS, query=2))[0]["query"] == 2


def test_before_after_view_rejects_mismatches():
    with pytest.raises(VizError, match="labels the 2 rows"):
        before_after_view(_pattern(), _pattern(), TOKENS, heads=[3], layer=1)
    with pytest.raises(VizError, match="5 tokens"):
        before_after_view(_pattern(), _pattern(), TOKENS + ["x"])
    with pytest.raises(VizError, match="subject_last 3 must lie in 0..2"):
        before_after_view(_pattern(), _pattern(), TOKENS, query=2, subject_last=3)
    with pytest.raises(VizError, match="outside the 4 tokens"):
        before_after_view(_pattern(), _pattern(), TOKENS, query=4)


def test_difference_view_is_signed():
    before, after = _pattern(), _pattern()
    view = difference_view(before, after, TOKENS, heads=[0, 1], layer=2, subject_last=1)
    payload, matrices = _pattern_payload(view)
    assert payload["signed"] is True and payload["labels"] == ["after − before"] and payload["subject"] == 1
    assert len(matrices) == 2
    torch.testing.assert_close(matrices[0], after[0] - before[0])
    assert matrices[0].min() < 0 < matrices[0].max()


def test_save_html_of_raw_circuitsvis_render(tmp_path):
    path = save_html(attention_heads(_pattern(), TOKENS), tmp_path / "raw.html")
    _assert_offline(path.read_text(encoding="utf-8"))


def test_attention_view_is_a_frozen_record():
    view = attention_heads_view(_pattern(), TOKENS)
    assert isinstance(view, AttentionView) and len(view.panels) == 1
    with pytest.raises(AttributeError):
        view.title = "other"


@pytest.mark.slow
def test_head_patterns_smollm2(smollm2):
    prompt = "The Eiffel Tower is located in"
    pattern, tokens = head_patterns(smollm2, prompt, 12, [3, 5])
    assert pattern.shape == (2, len(tokens), len(tokens))
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, len(tokens)))
    assert "".join(tokens) == prompt

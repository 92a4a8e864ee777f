"""Interactive attention views, before and after an edit, and the drift explorer.

Typical notebook use::

    before, tokens = head_patterns(model, prompt, layer=12, heads=[3, 5])
    with edit(model, rewrite):
        after, _ = head_patterns(model, prompt, layer=12, heads=[3, 5])
    view = before_after_view(before, after, tokens, heads=[3, 5], layer=12, subject_last=4)
    view                      # renders in Jupyter
    save_html(view, "figures/eiffel_l12.html")
    explorer("runs/drift")    # a drift run's explorer (attention_drift.views.explorer), inline

Two kinds of views, both self-contained (their JavaScript inlined once per view, never a
CDN), so the notebook output and the saved file work offline:

* :class:`PageView`: drawn by the package's own JavaScript (``templates/explorer.js``): the
  drift explorer (:func:`explorer`) and the per-head before / after / difference panels
  (:func:`before_after_view`, :func:`difference_view`) with the measured cell outlined, colour
  scales that leave out the first-token attention sink, signed colours with a legend and
  token labels;
* :class:`AttentionView`: circuitsvis panels under headings (:func:`attention_heads_view`),
  circuitsvis's bundle included once however many panels the view has.
"""

import functools
import html
import os
import re
from dataclasses import dataclass
from pathlib import Path

import circuitsvis
import torch
from circuitsvis.attention import attention_heads
from circuitsvis.utils.render import RenderedHTML
from jaxtyping import Float
from torch import Tensor

from attention_drift.views import explorer as explorer_mod
from attention_drift.core.errors import AttentionDriftError
from attention_drift.core.hooks import act_name
from attention_drift.core.tokens import batch_prompts, token_strings


class VizError(AttentionDriftError):
    """Input an attention view cannot be drawn from; the message says what is wrong."""


@functools.cache
def _bundle() -> str:
    """circuitsvis's JS bundle exactly as ``render_local`` inlines it ('' if not found)."""
    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return path.read_text(encoding="utf-8").replace("</script>", "") if path.is_file() else ""


def _split(rendered: RenderedHTML) -> tuple[str, str] | None:
    """(element id, render call) of a circuitsvis ``local_src``; None for an unknown layout."""
    src, bundle = rendered.local_src, _bundle()
    found = re.match(r'\s*<div id="([\w-]+)"', src)
    start = src.find(bundle) if bundle else -1
    if found is None or start < 0:
        return None
    call = src[start + len(bundle):]
    end = call.rfind("</script>")
    return (found.group(1), call[:end].strip()) if end >= 0 else None


@dataclass(frozen=True)
class AttentionView:
    """A titled page of circuitsvis panels, each under its own heading.

    Args:
        title: page heading.
        panels: (heading, circuitsvis render) pairs, shown in order.
        side_by_side: lay the panels out in a row (wrapping on narrow screens) instead of
            stacking them.
    """

    title: str
    panels: tuple[tuple[str, RenderedHTML], ...]
    side_by_side: bool = False

    def html(self) -> str:
        """The view as an HTML fragment with the JS bundle inlined once."""
        layout = ("display:flex;flex-wrap:wrap;gap:24px;" if self.side_by_side else "")
        width = "flex:1 1 460px;min-width:460px;" if self.side_by_side else ""
        parts = [_split(r) for _, r in self.panels]
        shared = all(p is not None for p in parts)
        sections = []
        for (heading, rendered), part in zip(self.panels, parts):
            body = (f'<div id="{part[0]}" style="margin: 15px 0;"></div>' if shared
                    else rendered.local_src)
            title = f"<h4>{html.escape(heading)}</h4>" if heading else ""
            sections.append(f'<section style="{width}">{title}{body}</section>')
        out = [f"<div><h3>{html.escape(self.title)}</h3>",
               f'<div style="{layout}">', *sections, "</div>"]
        if shared:
            calls = "\n".join(call for _, call in parts)
            out.append(f'<script crossorigin type="module">\n{_bundle()}\n{calls}\n</script>')
        out.append("</div>")
        return "\n".join(out)

    def _repr_html_(self) -> str:
        return self.html()

    def page(self) -> str:
        """A complete HTML document that opens offline."""
        return (
            "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(self.title)}</title>\n"
            "<style>body{font-family:system-ui,sans-serif;margin:24px;}</style>\n</head>\n"
            f"<body>\n{self.html()}\n</body>\n</html>\n"
        )


def _patterns(pattern: Tensor, tokens: list[str], name: str) -> Tensor:
    p = pattern.detach().to("cpu", torch.float32)
    if p.shape[-1] != len(tokens) or p.shape[-2] != len(tokens):
        raise VizError(
            f"{name} is [head, q, k] = {list(p.shape)} but there are {len(tokens)} tokens; "
            "give one token string per query and key position (head_patterns returns both)"
        )
    return p


def _head_names(n: int, heads: list[int] | None, layer: int | None) -> list[str]:
    if heads is None:
        heads = list(range(n))
    if len(heads) != n:
        raise VizError(
            f"heads labels the {n} rows of the patterns, but {len(heads)} heads were given; "
            "pass the patterns of exactly those heads (e.g. pattern[heads]) or heads=None"
        )
    return [f"L{layer}H{h}" if layer is not None else f"H{h}" for h in heads]


def attention_heads_view(
    pattern: Float[Tensor, "head q k"],
    tokens: list[str],
    head_labels: list[str] | None = None,
    *,
    title: str = "Attention patterns",
) -> AttentionView:
    """circuitsvis ``attention_heads`` of one pattern per head (rows: query, columns: key)."""
    p = _patterns(pattern, tokens, "pattern")
    if head_labels is not None and len(head_labels) != p.shape[0]:
        raise VizError(f"got {len(head_labels)} head labels for {p.shape[0]} heads")
    names = head_labels or [f"H{h}" for h in range(p.shape[0])]
    return AttentionView(title, ((title, attention_heads(p, tokens, attention_head_names=names)),))


@dataclass(frozen=True)
class PageView:
    """A view drawn by the package's own JavaScript (``templates/explorer.js``, no dependencies,
    inlined once per view): the drift explorer (:func:`explorer`) or per-head attention panels
    (:func:`before_after_view`, :func:`difference_view`).

    Args:
        title: the page title.
        fragment: the HTML fragment (data, CSS and JavaScript included); it renders in Jupyter
            and inside any page, offline.
    """

    title: str
    fragment: str

    def html(self) -> str:
        return self.fragment

    def _repr_html_(self) -> str:
        return self.fragment

    def page(self) -> str:
        """A complete HTML document that opens offline."""
        return explorer_mod.document(self.title, self.fragment)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`page` (see :func:`save_html`); returns the written path."""
        return save_html(self, path)


def _positions(tokens: list[str], query: int | None, subject_last: int | None) -> tuple[int, int | None]:
    q = len(tokens) - 1 if query is None else int(query)
    if not 0 <= q < len(tokens):
        raise VizError(f"query position {q} is outside the {len(tokens)} tokens")
    if subject_last is not None and not 0 <= subject_last <= q:
        raise VizError(f"subject_last {subject_last} must lie in 0..{q} (the query row sees only earlier keys)")
    return q, subject_last


def _pattern_view(title: str, tokens: list[str], labels: list[str], matrices: list[tuple[Tensor, Tensor | None]],
                  query: int, subject_last: int | None, panel_labels: list[str], signed: bool) -> PageView:
    blob = explorer_mod._Blob()
    heads = [{"label": label, "before": blob.add(b.numpy(), "f4"),
              "after": None if a is None else blob.add(a.numpy(), "f4")}
             for label, (b, a) in zip(labels, matrices)]
    payload = {"title": title, "tokens": list(tokens), "query": query, "subject": subject_last, "heads": heads,
               "labels": panel_labels, "signed": signed}
    return PageView(title, explorer_mod.render("patterns", payload, blob.bytes()))


def before_after_view(
    before: Float[Tensor, "head q k"],
    after: Float[Tensor, "head q k"],
    tokens: list[str],
    heads: list[int] | None = None,
    layer: int | None = None,
    *,
    query: int | None = None,
    subject_last: int | None = None,
    title: str | None = None,
) -> PageView:
    """Each head's attention before the edit, after it, and after - before, side by side.

    ``heads`` names the model head of each row of ``before``/``after`` (labels such as
    ``L12H3``). The measured cell, query row ``query`` (default: the last token, the prediction
    position) -> key ``subject_last`` (the edited subject's last token, when given), is outlined;
    the colour scales leave out the first token's column (the attention sink; a checkbox puts it
    back) and cells beyond them carry a dot; the difference panel is signed (blue: attention lost
    after the edit, red: gained) with a legend; a bar chart shows the query row alone.
    """
    b, a = _patterns(before, tokens, "before"), _patterns(after, tokens, "after")
    if b.shape != a.shape:
        raise VizError(f"before is {list(b.shape)} but after is {list(a.shape)}; use the same prompt and heads")
    names = _head_names(b.shape[0], heads, layer)
    q, s = _positions(tokens, query, subject_last)
    where = f"layer {layer}" if layer is not None else "attention"
    return _pattern_view(title or f"{where}: before vs after the edit", tokens, names, list(zip(b, a)), q, s,
                         ["before the edit", "after the edit"], False)


def difference_view(
    before: Float[Tensor, "head q k"],
    after: Float[Tensor, "head q k"],
    tokens: list[str],
    heads: list[int] | None = None,
    layer: int | None = None,
    *,
    query: int | None = None,
    subject_last: int | None = None,
) -> PageView:
    """Per-head attention change after - before on a signed scale with a legend (blue: attention
    lost after the edit, red: gained), symmetric around 0 and leaving out the first token's
    column; the measured cell outlined as in :func:`before_after_view`."""
    b, a = _patterns(before, tokens, "before"), _patterns(after, tokens, "after")
    if b.shape != a.shape:
        raise VizError(f"before is {list(b.shape)} but after is {list(a.shape)}; use the same prompt and heads")
    names = _head_names(b.shape[0], heads, layer)
    q, s = _positions(tokens, query, subject_last)
    where = f"layer {layer}" if layer is not None else "attention"
    return _pattern_view(f"{where}: after − before", tokens, names, [(d, None) for d in a - b], q, s,
                         ["after − before"], True)


def explorer(run, *, patterns=None, comparison=None, **options) -> PageView:
    """The drift explorer of a drift run, shown inline in Jupyter (``viz.explorer(run)``) or saved
    with ``.save(path)``.

    ``run``: an :class:`~attention_drift.views.explorer.ExplorerData`, or anything
    :meth:`ExplorerData.from_run <attention_drift.views.explorer.ExplorerData.from_run>` reads (a run
    folder, its ``drift_records.jsonl``, a list of drift lines); ``patterns``, ``comparison``
    and ``options`` (``threshold``, ``top_k``, ``title``, labels, methods) go to it.
    """
    if isinstance(run, explorer_mod.ExplorerData):
        if patterns is not None or comparison is not None or options:
            raise VizError("give patterns / comparison / options to ExplorerData.from_run, not with built ExplorerData")
        data = run
    else:
        data = explorer_mod.ExplorerData.from_run(run, patterns=patterns, comparison=comparison, **options)
    return PageView(data.title, explorer_mod.explorer_html(data))


def head_patterns(
    model, prompt: str, layer: int, heads: list[int] | None = None
) -> tuple[Float[Tensor, "head q k"], list[str]]:
    """Attention patterns of ``heads`` (default: all) at ``layer`` on ``prompt``, and its tokens.

    One forward pass caching only ``blocks.{layer}.attn.hook_pattern``; returns the
    [len(heads), q, q] pattern (float32, CPU) and the token strings (BOS included where
    the model uses one), ready for :func:`before_after_view`.
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if not 0 <= layer < n_layers:
        raise VizError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
    heads = list(range(n_heads)) if heads is None else list(heads)
    bad = [h for h in heads if not 0 <= h < n_heads]
    if bad or not heads:
        raise VizError(f"heads {bad or heads} are invalid: the model has heads 0..{n_heads - 1}")
    batch = batch_prompts(model, [prompt])
    name = act_name("pattern", layer)
    with torch.no_grad():
        _, cache = model.run_with_cache(
            batch.input_ids, names_filter=lambda n: n == name, attention_mask=batch.attention_mask
        )
    pattern = cache[name][0, heads].to("cpu", torch.float32)
    return pattern, token_strings(model, batch.input_ids[0])


def save_html(view: "AttentionView | PageView | RenderedHTML", path: str | os.PathLike) -> Path:
    """Write ``view`` as an HTML page with its JavaScript inlined (opens offline).

    A path without a suffix gets ``.html``. Returns the written path.
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_name(path.name + ".html")
    if isinstance(view, RenderedHTML):
        view = AttentionView("Attention", (("", view),))
    if not isinstance(view, (AttentionView, PageView)):
        raise VizError(f"save_html takes a view of this module or a circuitsvis render, not {type(view).__name__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(view.page(), encoding="utf-8")
    return path

"""Interactive per-head attention views (circuitsvis), before and after an edit.

Typical notebook use::

    before, tokens = head_patterns(model, prompt, layer=12, heads=[3, 5])
    with edit(model, rewrite):
        after, _ = head_patterns(model, prompt, layer=12, heads=[3, 5])
    view = before_after_view(before, after, tokens, heads=[3, 5], layer=12)
    view                      # renders in Jupyter
    save_html(view, "figures/eiffel_l12.html")

Every view is an :class:`AttentionView`: circuitsvis panels under headings, rendered with
circuitsvis's inlined JavaScript bundle (never its CDN), included once per page however
many panels it has, so both the notebook output and the saved file work offline.
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

from attention_drift.tokens import batch_prompts, token_strings
from attention_drift.hooks import act_name
from attention_drift.errors import AttentionDriftError


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


def before_after_view(
    before: Float[Tensor, "head q k"],
    after: Float[Tensor, "head q k"],
    tokens: list[str],
    heads: list[int] | None = None,
    layer: int | None = None,
) -> AttentionView:
    """The chosen heads' attention before and after an edit, as two panels side by side.

    ``heads`` names the model head of each row of ``before``/``after`` (labels such as
    ``L12H3``); both panels share the colour range [0, 1] so their shades compare.
    """
    b, a = _patterns(before, tokens, "before"), _patterns(after, tokens, "after")
    if b.shape != a.shape:
        raise VizError(f"before is {list(b.shape)} but after is {list(a.shape)}; use the same prompt and heads")
    names = _head_names(b.shape[0], heads, layer)
    where = f"layer {layer}" if layer is not None else "attention"
    panels = tuple(
        (f"{label} the edit", attention_heads(p, tokens, attention_head_names=names, min_value=0.0, max_value=1.0))
        for label, p in (("before", b), ("after", a))
    )
    return AttentionView(f"{where}: before vs after the edit", panels, side_by_side=True)


def difference_view(
    before: Float[Tensor, "head q k"],
    after: Float[Tensor, "head q k"],
    tokens: list[str],
    heads: list[int] | None = None,
    layer: int | None = None,
) -> AttentionView:
    """Per-head attention change after - before (negative: attention lost after the edit).

    The colour range is symmetric, [-m, m] with m = the largest absolute change, so equal
    shades mean equal changes in either direction.
    """
    b, a = _patterns(before, tokens, "before"), _patterns(after, tokens, "after")
    if b.shape != a.shape:
        raise VizError(f"before is {list(b.shape)} but after is {list(a.shape)}; use the same prompt and heads")
    diff = a - b
    m = float(diff.abs().max()) if diff.numel() else 0.0
    m = m if m > 0 else 1.0
    names = _head_names(b.shape[0], heads, layer)
    where = f"layer {layer}" if layer is not None else "attention"
    rendered = attention_heads(diff, tokens, attention_head_names=names, min_value=-m, max_value=m)
    return AttentionView(f"{where}: after − before (range ±{m:.3g})", (("after − before", rendered),))


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


def save_html(view: AttentionView | RenderedHTML, path: str | os.PathLike) -> Path:
    """Write ``view`` as an HTML page with circuitsvis's JS inlined (opens offline).

    A path without a suffix gets ``.html``. Returns the written path.
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_name(path.name + ".html")
    if isinstance(view, RenderedHTML):
        view = AttentionView("Attention", (("", view),))
    if not isinstance(view, AttentionView):
        raise VizError(f"save_html takes an AttentionView or a circuitsvis render, not {type(view).__name__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(view.page(), encoding="utf-8")
    return path

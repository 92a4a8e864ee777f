"""One data-set record patched: the analysis that ``attention-drift patch`` and the notebooks run.

:func:`patch_record` runs, from one entry into the edit, restoration of named variants
(:func:`summary_variants`: all attention patterns, the top-k drifting heads' patterns and, as their
control, the patterns of k random heads drawn layer-matched (:func:`matched_random_heads`),
attention / MLP outputs, the residual stream at the subject), a layer x component sweep and
10-layer windows of attention patterns, and contamination over 6-layer windows at key positions,
on the engine of :mod:`attention_drift.measure.patching`. The result (:class:`RecordPatch`, CPU
values) gives the run-file line (:meth:`RecordPatch.to_line`).
"""

import json
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from attention_drift.core import tokens
from attention_drift.core.data import Record
from attention_drift.core.hooks import act_name
from attention_drift.core.regions import Regions
from attention_drift.measure.drift import EditFactory, ranked_heads, rounded
from attention_drift.measure.patching import (
    Activations,
    Grid,
    Patch,
    PatchCase,
    PatchingError,
    Variant,
    as_variant,
    check_patchable,
    layer_position_grid,
    record_activations,
    run_patched,
    window_grid,
)

SUMMARY_VARIANTS = ("none", "attn_pattern_all", "attn_pattern_topk", "attn_out_all", "mlp_out_all",
                    "mlp_out_last", "resid_subject")
"""The named restoration variants of :func:`patch_record` (see :func:`summary_variants`)."""
RANDOM_VARIANT = "attn_pattern_random"
"""Prefix of the random-heads control variants of :func:`patch_record`: ``attn_pattern_random/0``,
``attn_pattern_random/1``, ... (one per draw, see :func:`matched_random_heads`)."""
RANDOM_DRAWS = 5
RANDOM_SEED = 0
SWEEP_COMPONENTS = ("attn_pattern", "attn_out", "mlp_out", "resid_pre_last")
CONTAMINATION_COMPONENTS = ("mlp_out", "attn_out")
KEY_POSITIONS = ("subject_last", "target_new_last", "last")
CONTAMINATION_POSITIONS = ("key", "all")


def topk_variant(heads: Sequence[tuple[int, int]]) -> Variant:
    """One variant patching the attention patterns (all query positions) of exactly ``heads``."""
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(int(l), []).append(int(h))
    return tuple(Patch("pattern", (l,), tuple(sorted(hs))) for l, hs in sorted(by_layer.items()))


def random_variant_names(draws: int) -> list[str]:
    """The names of ``draws`` random-heads control variants (``attn_pattern_random/<draw>``)."""
    return [f"{RANDOM_VARIANT}/{d}" for d in range(draws)]


def _control_fits(n_chosen: int, n_layers: int, n_heads: int) -> bool:
    """Whether ``n_chosen`` heads leave at least as many other heads, so that a random control of
    the same size exists."""
    return 2 * n_chosen <= n_layers * n_heads


def matched_random_heads(heads: Sequence[tuple[int, int]], n_layers: int, n_heads: int,
                         rng: np.random.Generator) -> list[tuple[int, int]]:
    """A layer-matched random control for ``heads``: as many heads as ``heads`` has in each layer,
    drawn uniformly without replacement among that layer's heads outside ``heads`` (so the
    control patches the same number of heads in the same layers, and differs only in which
    heads). When a layer has too few heads outside ``heads``, the shortfall is drawn uniformly
    from the heads of every layer outside ``heads`` and not drawn yet. Sorted by (layer, head)."""
    chosen = {(int(l), int(h)) for l, h in heads}
    if not _control_fits(len(chosen), n_layers, n_heads):
        raise PatchingError(f"{len(chosen)} heads leave too few others among {n_layers * n_heads} for a random "
                            "control of the same size; use a smaller k")
    drawn: list[tuple[int, int]] = []
    short = 0
    for layer in sorted({l for l, _ in chosen}):
        want = sum(1 for l, _ in chosen if l == layer)
        pool = [h for h in range(n_heads) if (layer, h) not in chosen]
        take = min(want, len(pool))
        drawn += [(layer, int(h)) for h in rng.choice(pool, size=take, replace=False)] if take else []
        short += want - take
    if short:
        pool = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in chosen and (l, h) not in drawn]
        drawn += [pool[int(i)] for i in rng.choice(len(pool), size=short, replace=False)]
    return sorted(drawn)


def _draw_controls(top: Sequence[tuple[int, int]], model, draws: int, seed: int, case_id) -> list[list[tuple[int, int]]]:
    """``draws`` layer-matched random head sets for a record, seeded by ``seed`` and the case id
    (the same record and seed always draw the same heads). Empty when ``top`` leaves fewer other
    heads than it has (no control of the same size exists)."""
    if not top or draws < 1 or not _control_fits(len(set(top)), model.cfg.n_layers, model.cfg.n_heads):
        return []
    rng = np.random.default_rng([seed, zlib.crc32(json.dumps(case_id).encode())])
    return [matched_random_heads(top, model.cfg.n_layers, model.cfg.n_heads, rng) for _ in range(draws)]


def summary_variants(model, top_heads: Sequence[tuple[int, int]], has_subject: bool = True) -> dict[str, Variant]:
    """The named restoration variants, in :data:`SUMMARY_VARIANTS` order:

    * ``none``: nothing patched (the edited model);
    * ``attn_pattern_all`` (the paper's a): attention patterns of every layer and head, every
      query position;
    * ``attn_pattern_topk`` (b): the patterns of ``top_heads`` only (left out when empty);
    * ``attn_out_all``: attention outputs of every layer at every position;
    * ``mlp_out_all`` (c): MLP outputs of every layer at every position (a check: ROME / MEMIT /
      PMET change MLP weights only, so this is the unedited run and recovers 100%);
    * ``mlp_out_last``: MLP outputs of every layer at the last token only;
    * ``resid_subject`` (d): the residual stream (``hook_resid_post`` of every layer) at the
      edited subject's last token inside the edit sentence, what the edit wrote where ROME
      writes (only with ``has_subject``). The last token's own residual is not offered: restoring
      it at the last layer is the unedited output by construction (the sweep shows it per layer).
    """
    layers = tuple(range(model.cfg.n_layers))
    out = {
        "none": (),
        "attn_pattern_all": (Patch("pattern", layers),),
        "attn_pattern_topk": topk_variant(top_heads),
        "attn_out_all": (Patch("attn_out", layers),),
        "mlp_out_all": (Patch("mlp_out", layers),),
        "mlp_out_last": (Patch("mlp_out", layers, positions=(-1,)),),
    }
    if not out["attn_pattern_topk"]:
        del out["attn_pattern_topk"]
    if has_subject:
        out["resid_subject"] = (Patch("resid_post", layers, positions="subject_last"),)
    return out


def sweep_grid(model) -> Grid:
    """[layer, component]: each layer alone, components of :data:`SWEEP_COMPONENTS` (attention
    pattern, attention output, MLP output at every position; the residual stream entering the
    layer at the last token)."""
    variants = []
    for l in range(model.cfg.n_layers):
        variants += [(Patch("pattern", (l,)),), (Patch("attn_out", (l,)),), (Patch("mlp_out", (l,)),),
                     (Patch("resid_pre", (l,), positions=(-1,)),)]
    return Grid(tuple(variants), ("layer", "component"),
                (tuple(map(str, range(model.cfg.n_layers))), SWEEP_COMPONENTS))


def key_positions(model, case: PatchCase) -> dict[str, int]:
    """Positions of :data:`KEY_POSITIONS` the case's prompt has: the edited subject's last token
    and the new target's last token inside the edit sentence, and the last token."""
    regions = Regions.of(model, case.rewrite, case.prompt)
    found = {"subject_last": regions.positions("subject_last"), "target_new_last": regions.positions("target_new"),
             "last": regions.positions("last")}
    return {name: pos[-1] for name, pos in found.items() if pos}


def _subject_drift(model, case: PatchCase, clean: Activations, edited: Activations) -> Tensor | None:
    """[layer, head] change of the last prompt token's attention to the edited subject's last token."""
    pos = Regions.of(model, case.rewrite, case.prompt).positions("subject_last")
    if not pos:
        return None
    q = int(clean.batch.prompt_lengths[0]) - 1
    names = [act_name("pattern", l) for l in range(model.cfg.n_layers)]
    before = torch.stack([clean.cache[n][0, :, q, pos[0]] for n in names]).float()
    after = torch.stack([edited.cache[n][0, :, q, pos[0]] for n in names]).float()
    return after - before


Pair = tuple[float, float]
"""``(lp_true, lp_new)``: mean per-token log-probabilities of the true answer and the new target."""


def _logodds(pair: Pair) -> float:
    return pair[0] - pair[1]


@dataclass(frozen=True)
class CasePatch:
    """One prompt restored: scores before the edit (``pre``), inside it (``post``) and inside it
    with each named variant patched (``variants``), each an ``(lp_true, lp_new)`` pair; ``group``:
    the evaluation group of the prompt (``distract_neighborhood`` or ``distract_relation``)."""

    prompt: str
    target_true: str
    target_new: str
    pre: Pair
    post: Pair
    variants: dict[str, Pair]
    group: str = "distract_neighborhood"

    def recovery(self, name: str) -> float:
        """Fraction of the pre- to post-edit log-odds gap variant ``name`` closes (NaN without a gap)."""
        gap = _logodds(self.pre) - _logodds(self.post)
        return (_logodds(self.variants[name]) - _logodds(self.post)) / gap if gap else math.nan

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "group": self.group, "target_true": self.target_true,
                "target_new": self.target_new, "pre": list(self.pre), "post": list(self.post),
                "variants": {k: list(v) for k, v in self.variants.items()}}


@dataclass(frozen=True)
class SweepPatch:
    """One prompt restored layer by layer: ``lp_true`` / ``lp_new`` ``[layer, component]`` of
    :func:`sweep_grid`, and ``[window]`` of the attention-pattern windows (:func:`window_grid`)."""

    prompt: str
    pre: Pair
    post: Pair
    components: tuple[str, ...]
    lp_true: Float[Tensor, "layer component"]
    lp_new: Float[Tensor, "layer component"]
    window_labels: tuple[str, ...]
    window_lp_true: Float[Tensor, " window"]
    window_lp_new: Float[Tensor, " window"]

    def recovery(self) -> tuple[Float[Tensor, "layer component"], Float[Tensor, " window"]]:
        """Per-cell fraction of the pre- to post-edit log-odds gap closed: (sweep, windows)."""
        gap = _logodds(self.pre) - _logodds(self.post)
        post = _logodds(self.post)
        return (self.lp_true - self.lp_new - post) / gap, (self.window_lp_true - self.window_lp_new - post) / gap

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "pre": list(self.pre), "post": list(self.post),
                "layer_component": {"components": list(self.components), "lp_true": self.lp_true.tolist(),
                                    "lp_new": self.lp_new.tolist()},
                "windows": {"labels": list(self.window_labels), "lp_true": self.window_lp_true.tolist(),
                            "lp_new": self.window_lp_new.tolist()}}


@dataclass(frozen=True)
class ContaminationPatch:
    """One prompt contaminated: the unedited model run with the edited model's outputs of each
    component of :data:`CONTAMINATION_COMPONENTS` substituted at one position over a window of
    layers centred on each layer (``components[c] = (lp_true, lp_new)``, ``[position, layer]``)."""

    prompt: str
    positions: tuple[int, ...]
    labels: tuple[str, ...]
    tokens: tuple[str, ...]
    components: dict[str, tuple[Tensor, Tensor]]
    pre: Pair
    post: Pair

    def p_true_drop(self, component: str) -> Float[Tensor, "position layer"]:
        """P(true) before the edit minus P(true) with the substitution, per cell."""
        return math.exp(self.pre[0]) - self.components[component][0].exp()

    def damage(self, component: str) -> Float[Tensor, "position layer"]:
        """Per cell, the fraction of the edit's log-odds change the substitution reproduces
        (0: none, 1: all of it; NaN when the edit does not change the log-odds)."""
        lp_true, lp_new = self.components[component]
        change = _logodds(self.post) - _logodds(self.pre)
        return (lp_true - lp_new - _logodds(self.pre)) / change if change else torch.full_like(lp_true, math.nan)

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "positions": list(self.positions), "labels": list(self.labels),
                "tokens": list(self.tokens),
                "components": {c: {"lp_true": t.tolist(), "lp_new": n.tolist()}
                               for c, (t, n) in self.components.items()},
                "pre": list(self.pre), "post": list(self.post)}


@dataclass(frozen=True)
class RecordPatch:
    """One record's patching (CPU values; :meth:`to_line` is its line of the ``attention-drift
    patch`` run file).

    Args:
        case_id, kind, subject, target_new: the record.
        cases: per prompt, the named restoration variants.
        sweeps: the layer x component and window sweeps of the first prompts.
        contamination: the contamination grids of the first prompts.
        top_heads: ``(layer, head, drift)`` of the heads of ``attn_pattern_topk``, with this
            record's mean drift of the last token's attention to the edited subject's last token.
        head_source: ``"record"`` (ranked on this record) or ``"given"``.
        edit_seconds: the editor's own time.
        random_heads: per draw, the (layer, head) pairs of the random-heads control variant
            ``attn_pattern_random/<draw>`` (:func:`matched_random_heads`).
    """

    case_id: int | str
    kind: str
    subject: str
    target_new: str
    cases: tuple[CasePatch, ...]
    sweeps: tuple[SweepPatch, ...]
    contamination: tuple[ContaminationPatch, ...]
    top_heads: tuple[tuple[int, int, float], ...]
    head_source: str
    edit_seconds: float = math.nan
    random_heads: tuple[tuple[tuple[int, int], ...], ...] = ()

    def to_line(self) -> dict:
        return {"case_id": self.case_id, "kind": self.kind, "subject": self.subject, "target_new": self.target_new,
                "cases": [c.to_json() for c in self.cases], "sweeps": [s.to_json() for s in self.sweeps],
                "contamination": [c.to_json() for c in self.contamination], "edit_seconds": self.edit_seconds,
                "head_source": self.head_source, "top_heads": [list(t) for t in self.top_heads],
                "random_heads": [[list(h) for h in draw] for draw in self.random_heads]}


NamedVariants = Mapping[str, Patch | Sequence[Patch]]
ExtraVariants = NamedVariants | Callable[[list[tuple[int, int]]], NamedVariants]
"""Named variants added by :func:`patch_record`: a mapping, or a function of the head ranking."""


def _ranking(model, cases, clean, edited, heads, k) -> tuple[list[tuple[int, int, float]], list[tuple[int, int]], str]:
    """(top-k heads with drift, full head ranking, source) for the record."""
    drifts = [d for d in (_subject_drift(model, c, s, e) for c, s, e in zip(cases, clean, edited)) if d is not None]
    record_drift = torch.stack(drifts).mean(0) if drifts else None
    if heads is None:
        ranked = ranked_heads(record_drift) if record_drift is not None else []
        return ranked[:k], [(l, h) for l, h, _ in ranked], "record"
    given = [(int(l), int(h)) for l, h in heads]
    top = [(l, h, float(record_drift[l, h]) if record_drift is not None else math.nan) for l, h in given[:k]]
    return top, given, "given"


def patch_record(
    model,
    record: Record,
    edit_fn_factory: EditFactory,
    *,
    k: int = 10,
    heads: Sequence[tuple[int, int]] | None = None,
    variants: ExtraVariants | None = None,
    groups: Sequence[str] = ("neighborhood", "relation"),
    cases: Sequence[PatchCase] | None = None,
    window: int = 10,
    sweep_prompts: int = 1,
    contamination_prompts: int = 1,
    contamination_window: int = 6,
    contamination_positions: str = "key",
    batch_size: int = 64,
    random_draws: int = RANDOM_DRAWS,
    random_seed: int = RANDOM_SEED,
) -> RecordPatch | None:
    """Patching of one record between the unedited model and ``edit_fn_factory(record)`` (entered
    once): None, without editing, when it has no prompt to patch.

    The prompts are the distract versions of the record's ``groups`` prompts (neighbourhood and
    relation: its distract-neighbourhood and distract-relation prompts), or ``cases``. Every prompt is
    run once per model state caching every patchable hook (:func:`record_activations`). Inside
    the edit, each prompt gets the named restoration variants (:func:`summary_variants`, then
    ``variants``) and the first ``sweep_prompts`` also the layer x component sweep
    (:func:`sweep_grid`) and the attention-pattern windows of ``window`` layers
    (:func:`window_grid`). After it, the first ``contamination_prompts`` prompts run on the
    unedited model with the edited MLP / attention outputs substituted over windows of
    ``contamination_window`` layers at one position (:func:`layer_position_grid`), at the
    :data:`KEY_POSITIONS` (``contamination_positions="key"``) or every position (``"all"``).

    The top-k heads of ``attn_pattern_topk`` are ``heads`` (e.g. from a drift run) or, when None,
    the k heads whose last-token attention to the edited subject's last token grew most on
    average over this record's prompts. Their control: ``random_draws`` variants
    ``attn_pattern_random/<draw>``, each patching the patterns of as many random heads in the
    same layers (:func:`matched_random_heads`; drawn from a generator seeded by
    ``random_seed`` and the record's case id, so a rerun draws the same heads). ``variants``
    adds named variants to every prompt: a mapping, or a function of the head ranking
    (``heads``, or every head by this record's drift) returning one.
    """
    if contamination_positions not in CONTAMINATION_POSITIONS:
        raise PatchingError(f"contamination_positions must be 'key' or 'all', not {contamination_positions!r}")
    if k < 1:
        raise PatchingError(f"k must be >= 1, got {k}")
    for name, value in (("window", window), ("contamination_window", contamination_window),
                        ("batch_size", batch_size)):
        if value < 1:
            raise PatchingError(f"{name} must be >= 1, got {value}")
    if random_draws < 0:
        raise PatchingError(f"random_draws must be >= 0, got {random_draws}")
    if sweep_prompts < 0 or contamination_prompts < 0:
        raise PatchingError(f"sweep_prompts and contamination_prompts must be >= 0, got {sweep_prompts} and "
                            f"{contamination_prompts}")
    cases = PatchCase.from_record(record, groups) if cases is None else list(cases)
    if not cases:
        return None
    if any(c.rewrite is None for c in cases):
        raise PatchingError("every case needs its rewrite (PatchCase(..., rewrite=record.rewrite)) to find the "
                            "edited subject's positions")
    if not callable(edit_fn_factory):
        raise PatchingError("edit_fn_factory must be a callable returning a context manager for a record, "
                            "e.g. lambda r: edit(model, r.rewrite)")
    check_patchable(model, list(summary_variants(model, [], True).values()))
    sweep = window_grid_ = None
    if sweep_prompts > 0:
        sweep, window_grid_ = sweep_grid(model), window_grid(model, "pattern", window)
    clean = [record_activations(model, case, None) for case in cases]
    patched_cases, sweeps = [], []
    start = time.perf_counter()
    with edit_fn_factory(record) as result:
        seconds = float(getattr(result, "seconds", time.perf_counter() - start))
        edited = [record_activations(model, case, None) for case in cases]
        top, ranking, head_source = _ranking(model, cases, clean, edited, heads, k)
        controls = _draw_controls([(l, h) for l, h, _ in top], model, random_draws, random_seed, record.case_id)
        control_variants = {n: topk_variant(c) for n, c in zip(random_variant_names(len(controls)), controls)}
        extra = variants(ranking) if callable(variants) else dict(variants or {})
        clash = sorted(set(extra) & (set(SUMMARY_VARIANTS) | set(control_variants)))
        if clash:
            raise PatchingError(f"extra variants {clash} reuse names of the summary or control variants; rename them")
        for i, (case, source) in enumerate(zip(cases, clean)):
            has_subject = bool(Regions.of(model, case.rewrite, case.prompt).positions("subject_last"))
            named = {**summary_variants(model, [(l, h) for l, h, _ in top], has_subject), **control_variants,
                     **{n: as_variant(v) for n, v in extra.items()}}
            res = run_patched(model, source, list(named.values()), batch_size=batch_size)
            pre, post = res.source.pair(), res.base.pair()
            patched_cases.append(CasePatch(case.prompt, case.true_target, case.new_target, tuple(pre), tuple(post),
                                           {n: tuple(res.patched.pair(j)) for j, n in enumerate(named)}, case.group))
            if i < sweep_prompts:
                lc = run_patched(model, source, sweep, batch_size=batch_size)
                wr = run_patched(model, source, window_grid_, batch_size=batch_size)
                sweeps.append(SweepPatch(
                    case.prompt, tuple(pre), tuple(post), SWEEP_COMPONENTS,
                    rounded(lc.patched.lp_true.view(*sweep.shape)), rounded(lc.patched.lp_new.view(*sweep.shape)),
                    window_grid_.labels[0], rounded(wr.patched.lp_true), rounded(wr.patched.lp_new)))
    contamination = []
    for case, source in list(zip(cases, edited))[:contamination_prompts]:
        keys = key_positions(model, case)
        n_tokens = int(source.batch.prompt_lengths[0])
        positions = list(keys.values()) if contamination_positions == "key" else list(range(n_tokens))
        names = {p: n for n, p in keys.items()}
        ids = tokens.encode(model, case.prompt)
        grids, pre, post = {}, None, None
        for component in CONTAMINATION_COMPONENTS:
            grid = layer_position_grid(model, positions, component, contamination_window)
            res = run_patched(model, source, grid, batch_size=batch_size)
            pre, post = res.base.pair(), res.source.pair()
            grids[component] = (rounded(res.patched.lp_true.view(*grid.shape)),
                                rounded(res.patched.lp_new.view(*grid.shape)))
        contamination.append(ContaminationPatch(
            case.prompt, tuple(positions), tuple(names.get(p, "") for p in positions),
            tuple(tokens.token_strings(model, [ids[p] for p in positions])), grids, tuple(pre), tuple(post)))
    rw = record.rewrite
    return RecordPatch(record.case_id, record.kind, rw.subject, rw.target_new, tuple(patched_cases), tuple(sweeps),
                       tuple(contamination), tuple(top), head_source, seconds,
                       tuple(tuple(draw) for draw in controls))

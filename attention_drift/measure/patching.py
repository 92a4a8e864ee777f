"""Causal patching between the unedited and the edited model.

*Restoration* (the paper's RQ4): run the edited model on a prompt while writing the unedited
model's activations into chosen hooks, heads and positions, and see how much of the true
answer comes back. *Contamination* (RQ2): the reverse, run the unedited model with the edited
model's activations substituted, and see how much the true answer drops.

Both are one mechanism: a *source* run (:func:`record_activations`, caching exactly the hooks a
set of variants patches) and a *base* run of the other model state (:func:`run_patched`), in which
the prompt is repeated once per variant in a batch and one hook function per hook name writes the
source values into the rows / heads / positions that request them, so many variants share a
forward pass; each variant runs only from the first layer where it changes something, and the
vocabulary is read only where the scores need it. :func:`patch_edit` runs one direction of that
protocol for any cases and variants around an editor given as a context manager factory; the
grid builders (:func:`layer_head_grid`, :func:`layer_component_grid`, :func:`window_grid`,
:func:`layer_position_grid`) produce the usual sweeps.

:func:`patch_record` is the analysis of one data-set record that the ``attention-drift patch``
command and the notebooks run: restoration of named variants (:func:`summary_variants`: all
attention patterns, the top-k drifting heads' patterns and, as their control, the patterns of
k random heads drawn layer-matched (:func:`matched_random_heads`), attention / MLP outputs, the
residual stream at the subject), a layer x component sweep and 10-layer windows of attention patterns,
and contamination over 6-layer windows at key positions, all from one entry into the edit
(:class:`RecordPatch`, whose :meth:`RecordPatch.to_line` is the run-file line).

Tensors made here are on the model's device; :class:`RecordPatch` holds CPU values.

Pattern patching needs an attention whose pattern the bridge computes itself: on GPT-J, GPT-Neo
and OPT, TransformerLens 4.3 lets HF compute attention and discards edits to ``hook_pattern``.
:func:`supports_pattern_patching` probes each model once; patching a pattern on a model that
fails the probe raises :class:`PatchingError`. ``hook_resid_mid`` is not offered: on the 4.3
bridge an edit there reaches the MLP's input but not the residual stream carried past the MLP.
"""

import json
import math
import time
import warnings
import weakref
import zlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from attention_drift.core import tokens
from attention_drift.core.data import Record, Rewrite, distract_prompt
from attention_drift.measure.drift import EditFactory, ranked_heads, rounded
from attention_drift.core.runner import LayerRunner, unembed_rows
from attention_drift.core.errors import AttentionDriftError
from attention_drift.core.hooks import act_name, layer_of
from attention_drift.core.models import model_device
from attention_drift.core.regions import REGIONS, Regions
from attention_drift.core.scores import Scores

COMPONENTS = ("pattern", "z", "attn_out", "mlp_post", "mlp_out", "resid_pre", "resid_post")
"""Patchable activations, named by their :func:`~attention_drift.core.hooks.act_name` kind."""
HEAD_COMPONENTS = ("pattern", "z")
DIRECTIONS = ("restore", "contaminate")
METRICS = ("recovery", "recovery_p", "p_true", "p_new", "lp_true", "lp_new", "logodds",
           "delta_p_true", "delta_logodds")


class PatchingError(AttentionDriftError):
    """A patch that cannot be applied as asked; raised before any forward pass or weight change."""


# ---------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class Patch:
    """One component patched over some layers, heads and positions.

    Args:
        component: one of :data:`COMPONENTS`: ``"pattern"`` (attention probabilities, one row per
            query head), ``"z"`` (per-head attention values before W_O), ``"attn_out"``,
            ``"mlp_post"`` (MLP hidden activation, ROME's key), ``"mlp_out"``, ``"resid_pre"``,
            ``"resid_post"``.
        layers: the layers (an int is one layer). Ints and sequences are stored as tuples.
        heads: query heads to patch (``pattern`` and ``z`` only); None patches all heads.
        positions: token positions (for ``pattern`` the query positions, whole rows); ints, where
            negative ones count from the end of the prompt (-1 is the last prompt token, the
            prediction position); or a region name of :data:`attention_drift.measure.drift.REGIONS`
            resolved per case (``"subject_last"``, ``"edit_sentence"``, ...); None patches every
            position, target tokens included.
    """

    component: str
    layers: int | Sequence[int]
    heads: int | Sequence[int] | None = None
    positions: int | Sequence[int] | str | None = None

    def __post_init__(self):
        if self.component not in COMPONENTS:
            extra = " (hook_resid_mid edits do not reach the residual stream on this bridge)" \
                if self.component == "resid_mid" else ""
            raise PatchingError(f"unknown component {self.component!r}{extra}; choose from {tuple(COMPONENTS)}")
        for name in ("layers", "heads"):
            value = getattr(self, name)
            if isinstance(value, int):
                object.__setattr__(self, name, (value,))
            elif value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in value))
        if isinstance(self.positions, int):
            object.__setattr__(self, "positions", (self.positions,))
        elif self.positions is not None and not isinstance(self.positions, str):
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
        if not self.layers:
            raise PatchingError("a Patch needs at least one layer")
        if self.heads is not None and self.component not in HEAD_COMPONENTS:
            raise PatchingError(
                f"heads only apply to {HEAD_COMPONENTS}; {self.component!r} mixes all heads: drop heads=")
        if isinstance(self.positions, str) and self.positions not in REGIONS:
            raise PatchingError(f"unknown region {self.positions!r} for positions; choose from {REGIONS}")

    def hook_names(self) -> list[str]:
        return [act_name(self.component, layer) for layer in self.layers]


Variant = tuple[Patch, ...]


def _as_variant(v: Patch | Sequence[Patch]) -> Variant:
    return (v,) if isinstance(v, Patch) else tuple(v)


@dataclass(frozen=True)
class PatchCase:
    """A prompt scored on its true answer against the edit's new target.

    Args:
        prompt: the full text run (e.g. a distract prompt).
        true_target: the answer the unedited model should keep.
        new_target: the edit's new target (the wrong answer here).
        rewrite: the edit, needed only to resolve region-name positions.
        group: the evaluation group the prompt comes from (reported per group).
    """

    prompt: str
    true_target: str
    new_target: str
    rewrite: Rewrite | None = None
    group: str = "distract_neighborhood"

    @classmethod
    def distract(cls, rewrite: Rewrite, prompt: str, true_target: str,
                 group: str = "distract_neighborhood") -> "PatchCase":
        """The distract variant of ``prompt``: the edit sentence before it, new target as the wrong answer."""
        return cls(distract_prompt(rewrite, prompt), true_target, rewrite.target_new, rewrite, group)

    @classmethod
    def from_record(cls, record: Record, groups: Sequence[str] = ("neighborhood", "relation")) -> list["PatchCase"]:
        """Distract cases of a record's ``neighborhood`` and/or ``relation`` prompts."""
        bad = [g for g in groups if g not in ("neighborhood", "relation")]
        if bad:
            raise PatchingError(f"unknown groups {bad}; choose from ('neighborhood', 'relation')")
        cases = []
        for group in groups:
            prompts = getattr(record, group)
            cases += [cls.distract(record.rewrite, p, t, f"distract_{group}")
                      for p, t in zip(prompts.prompts, prompts.targets)]
        return cases


@dataclass(frozen=True)
class Grid:
    """Variants laid out on named axes (e.g. ``("layer", "head")``), row-major.

    ``labels[i]`` names the entries of axis ``i``.
    """

    variants: tuple[Variant, ...]
    axes: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(lab) for lab in self.labels)


# ---------------------------------------------------------------------------------------------
# Source activations


@dataclass(frozen=True)
class Activations:
    """Cached activations of one case under one model state, and that state's scores.

    ``batch`` has one row (the prompt alone, both targets single tokens: scored at the last
    prompt position) or two (prompt + true target, prompt + new target). ``cache`` maps hook
    names to ``[rows, ...]`` tensors.
    """

    case: PatchCase
    batch: tokens.Batch
    target_ids: tuple[int, int] | None
    cache: dict[str, Tensor]
    scores: Scores

    def score(self, logits: Float[Tensor, "row pos vocab"]) -> Scores:
        """The scores of full-forward logits of :attr:`batch` (e.g. :func:`run_variant`'s), as
        :attr:`scores` are: one entry."""
        return _scores(logits, self.batch, self.target_ids)


def _layout(model, case: PatchCase) -> tuple[tokens.Batch, tuple[int, int] | None]:
    prompt_ids, true_ids = tokens.continuation_ids(model, case.prompt, case.true_target)
    _, new_ids = tokens.continuation_ids(model, case.prompt, case.new_target)
    if len(true_ids) == 1 and len(new_ids) == 1 and true_ids != new_ids:
        return tokens.batch_prompts(model, [case.prompt]), (true_ids[0], new_ids[0])
    if true_ids == new_ids:
        raise PatchingError(f"true target {case.true_target!r} and new target {case.new_target!r} "
                            "tokenise identically; they cannot be told apart")
    return tokens.batch_with_targets(model, [case.prompt] * 2, [case.true_target, case.new_target]), None


def _scores(logits: Tensor, batch: tokens.Batch, target_ids: tuple[int, int] | None) -> Scores:
    """Scores of one case from the full logits of its batch (one row, or the two-row layout)."""
    if target_ids is not None:
        lp = logits[torch.arange(len(batch), device=logits.device), batch.last_prompt_index].float().log_softmax(-1)
        return Scores(lp[:, target_ids[0]].clone(), lp[:, target_ids[1]].clone())
    lp = tokens.target_log_probs(logits, batch)
    return Scores(lp[:1].clone(), lp[1:].clone())


_MIN_UNEMBED_ROWS = 4


def _log_probs(model, hidden: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_vocab"]:
    """Next-token log-probabilities of residual vectors leaving the last block. Fewer than
    :data:`_MIN_UNEMBED_ROWS` rows are padded up to it: CPU BLAS multiplies so few rows with
    another kernel, whose rounding differs from a full forward pass's (by up to 1e-5 in
    SmolLM2's logits), and the scores are to be those of a full forward pass."""
    n = hidden.shape[0]
    if n < _MIN_UNEMBED_ROWS:
        hidden = torch.cat([hidden, hidden[-1:].expand(_MIN_UNEMBED_ROWS - n, -1)])
    return unembed_rows(model, hidden)[:n].float().log_softmax(-1)


def _read_scores(model, final: Float[Tensor, "row pos d_model"], batch: tokens.Batch,
                 target_ids: tuple[int, int] | None) -> Scores:
    """:func:`_scores` of copies of ``batch`` (copy-major) from the residual leaving the last
    block: the final norm and unembedding are applied at the read positions only (the last
    prompt token, or each target token's predicting position), not at every position."""
    rows, width = batch.input_ids.shape
    copies = final.shape[0] // rows
    hidden = final.view(copies, rows, *final.shape[1:])
    if target_ids is not None:
        lp = _log_probs(model, hidden[:, 0, int(batch.last_prompt_index[0])])
        return Scores(lp[:, target_ids[0]].clone(), lp[:, target_ids[1]].clone())
    row, pos = zip(*[(r, p) for r in range(rows)
                     for p in range(int(batch.prompt_lengths[r]) - 1, int(batch.lengths[r]) - 1)])
    row_t, pos_t = torch.tensor(row, device=final.device), torch.tensor(pos, device=final.device)
    lp = _log_probs(model, hidden[:, row_t, pos_t].flatten(0, 1)).view(copies, len(row), -1)
    read = lp.gather(-1, batch.input_ids[row_t, pos_t + 1].expand(copies, -1)[..., None])[..., 0]
    token_lp = torch.zeros(copies, rows, width - 1, device=final.device)
    token_lp[:, row_t, pos_t] = read  # laid out and summed as tokens.target_log_probs does
    per_row = token_lp.sum(-1) / batch.target_lengths.clamp(min=1)
    return Scores(per_row[:, 0].clone(), per_row[:, 1].clone())


def hook_names(variants: Sequence[Patch | Sequence[Patch]]) -> list[str]:
    """The hook names a set of variants patches, sorted."""
    return sorted({name for v in variants for p in _as_variant(v) for name in p.hook_names()})


def record_activations(
    model, case: PatchCase, variants: Sequence[Patch | Sequence[Patch]] | Grid | None = None
) -> Activations:
    """Run ``case`` once under the model's current state, caching the hooks ``variants`` patch
    (every patchable hook of every layer when None) and scoring both targets from the same pass."""
    if isinstance(variants, Grid):
        variants = variants.variants
    batch, target_ids = _layout(model, case)
    names = set(hook_names(variants)) if variants is not None else {
        act_name(kind, layer) for kind in COMPONENTS for layer in range(model.cfg.n_layers)}
    with torch.no_grad():
        logits, cache = model.run_with_cache(
            batch.input_ids, attention_mask=batch.attention_mask, names_filter=lambda n: n in names)
    return Activations(case, batch, target_ids, {n: cache[n] for n in names},
                       _scores(logits, batch, target_ids))


# ---------------------------------------------------------------------------------------------
# Pattern-patching probe

_PATTERN_SUPPORT: "weakref.WeakKeyDictionary[object, bool]" = weakref.WeakKeyDictionary()


def supports_pattern_patching(model) -> bool:
    """Whether edits to ``hook_pattern`` change the model's output (probed once per model object).

    The probe replaces layer 0's attention by uniform causal attention on a short text and
    compares the logits with an unhooked run: identical logits mean the pattern hook is only an
    observer (the attention is computed inside the wrapped HF module).
    """
    if model in _PATTERN_SUPPORT:
        return _PATTERN_SUPPORT[model]
    ids = torch.tensor([tokens.encode(model, "The probe checks whether attention edits matter")],
                       device=model_device(model))

    def uniform(pattern, hook):
        causal = torch.ones(pattern.shape[-2:], dtype=pattern.dtype, device=pattern.device).tril()
        return (causal / causal.sum(-1, keepdim=True)).expand_as(pattern).clone()

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = model(ids)
        probed = model.run_with_hooks(ids, fwd_hooks=[(act_name("pattern", 0), uniform)])
    supported = bool((plain - probed).abs().max() > 1e-6)
    _PATTERN_SUPPORT[model] = supported
    return supported


# ---------------------------------------------------------------------------------------------
# Running variants


@dataclass(frozen=True)
class PatchResult:
    """Scores of each patched variant, with the unpatched base run and the source run.

    ``base`` is the model state that was run (the edited model when restoring, the unedited one
    when contaminating); ``source`` the state the patched activations came from. Metrics
    (:meth:`metric`): ``p_true``, ``p_new``, ``lp_true``, ``lp_new`` (mean per-token log-prob),
    ``logodds`` = lp_true - lp_new; ``recovery`` = (logodds - base) / (source - base), the
    fraction of the base-to-source log-odds gap the patch closes (1: the source's answer,
    0: no effect; for contamination, the fraction of the edit's damage reproduced);
    ``recovery_p`` the same on p_true; ``delta_p_true`` / ``delta_logodds`` = patched - base.
    """

    case: PatchCase
    variants: tuple[Variant, ...]
    patched: Scores
    base: Scores
    source: Scores
    grid: Grid | None = None

    def metric(self, name: str = "recovery") -> Float[Tensor, " variant"]:
        if name in ("p_true", "p_new", "lp_true", "lp_new", "logodds"):
            return getattr(self.patched, name)
        if name == "recovery":
            return (self.patched.logodds - self.base.logodds) / (self.source.logodds - self.base.logodds)
        if name == "recovery_p":
            return (self.patched.p_true - self.base.p_true) / (self.source.p_true - self.base.p_true)
        if name == "delta_p_true":
            return self.patched.p_true - self.base.p_true
        if name == "delta_logodds":
            return self.patched.logodds - self.base.logodds
        raise PatchingError(f"unknown metric {name!r}; choose from {METRICS}")

    @property
    def recovery(self) -> Float[Tensor, " variant"]:
        return self.metric("recovery")

    def values(self, name: str = "recovery") -> Tensor:
        """:meth:`metric` reshaped to the grid's shape (``[variant]`` without a grid)."""
        values = self.metric(name)
        return values if self.grid is None else values.view(*self.grid.shape)


def _resolve_positions(case: PatchCase, patch: Patch, regions: Callable[[], Regions], prompt_len: int,
                       width: int) -> list[int] | None:
    if patch.positions is None:
        return None
    if isinstance(patch.positions, str):
        if patch.positions == "last":
            return [prompt_len - 1]
        if case.rewrite is None:
            raise PatchingError(f"positions={patch.positions!r} needs the case's rewrite; build cases with "
                                "PatchCase.distract(...) or pass rewrite=")
        found = list(regions().positions(patch.positions))
        if not found:
            raise PatchingError(f"prompt {case.prompt!r} has no {patch.positions!r} region")
        return found
    out = []
    for p in patch.positions:
        q = prompt_len + p if p < 0 else p
        if not 0 <= q < width:
            raise PatchingError(f"position {p} is outside the {prompt_len}-token prompt {case.prompt!r}")
        out.append(q)
    return out


def _masks(model, case: PatchCase, batch: tokens.Batch, variants: Sequence[Variant]) -> dict[str, Tensor]:
    """Per hook name a boolean mask [variant, ...] of what each variant patches:
    pattern [V, head, query], z [V, pos, head], others [V, pos]."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    width, prompt_len = batch.input_ids.shape[1], int(batch.prompt_lengths[0])
    device = batch.input_ids.device
    memo: list[Regions] = []

    def regions() -> Regions:
        if not memo:
            memo.append(Regions.of(model, case.rewrite, case.prompt))
        return memo[0]

    masks: dict[str, Tensor] = {}
    for v, variant in enumerate(variants):
        for patch in variant:
            bad = [l for l in patch.layers if not 0 <= l < n_layers]
            if bad:
                raise PatchingError(f"layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
            if patch.heads is not None and any(not 0 <= h < n_heads for h in patch.heads):
                raise PatchingError(f"heads {list(patch.heads)} out of range: the model has {n_heads} query heads")
            pos = _resolve_positions(case, patch, regions, prompt_len, width)
            pos_sel = torch.zeros(width, dtype=torch.bool, device=device)
            pos_sel[slice(None) if pos is None else pos] = True
            head_sel = torch.zeros(n_heads, dtype=torch.bool, device=device)
            head_sel[slice(None) if patch.heads is None else list(patch.heads)] = True
            for name in patch.hook_names():
                if patch.component == "pattern":
                    shape, sel = (n_heads, width), head_sel[:, None] & pos_sel[None, :]
                elif patch.component == "z":
                    shape, sel = (width, n_heads), pos_sel[:, None] & head_sel[None, :]
                else:
                    shape, sel = (width,), pos_sel
                if name not in masks:
                    masks[name] = torch.zeros((len(variants), *shape), dtype=torch.bool, device=device)
                masks[name][v] |= sel
    return masks


def _patch_hooks(source: Activations, masks: dict[str, Tensor]) -> list:
    """One hook per patched hook name writing the source values where each variant's mask asks
    (``masks[name]`` is ``[variant, ...]``, the variants of one batch in order). A batch may hold
    only its first variants (those running at that layer, see :func:`run_patched`): each hook
    uses the masks of as many variants as its activation has copies of the source rows."""
    rows, hooks = len(source.batch), []
    for name, mask in masks.items():
        if not mask.any():
            continue
        sel = mask.repeat_interleave(rows, 0)[..., None]
        clean = source.cache[name].repeat(len(mask), *([1] * (source.cache[name].dim() - 1)))

        def write(act, hook, sel=sel, clean=clean):
            n = act.shape[0]
            return torch.where(sel[:n], clean[:n].to(act.dtype), act)

        hooks.append((name, write))
    return hooks


def _first_changed_layers(masks: dict[str, Tensor], source: Mapping[str, Tensor], base: Mapping[str, Tensor],
                          n_variants: int, n_layers: int) -> list[int]:
    """Per variant, the lowest layer at which it writes a value that the unpatched run does not
    already hold there (``n_layers`` when it writes none: it is the unpatched run). Below that
    layer the variant's forward pass is the unpatched one."""
    first = torch.full((n_variants,), n_layers, dtype=torch.long, device="cpu")
    for name, mask in masks.items():
        differs = (source[name] != base[name].to(source[name].dtype)).any(0)
        differs = differs.flatten(mask.dim() - 1).any(-1)  # reduced to the mask's per-variant shape
        changes = (mask & differs).flatten(1).any(1).cpu()
        first = torch.where(changes, first.clamp(max=layer_of(name)), first)
    return first.tolist()


def _check(model, variants: Sequence[Variant]) -> None:
    if not variants:
        raise PatchingError("no variants to run: give at least one (an empty tuple () patches nothing)")
    if any(p.component == "pattern" for v in variants for p in v) and not supports_pattern_patching(model):
        raise PatchingError(
            f"pattern patching is not possible on this {model.original_model.config.model_type!r} model: "
            "its attention is computed inside the wrapped Hugging Face module and TransformerLens discards "
            "edits to hook_pattern (GPT-J, GPT-Neo, OPT). Patch 'z' (per-head outputs) or 'attn_out' instead."
        )


def run_patched(
    model,
    source: Activations,
    variants: Sequence[Patch | Sequence[Patch]] | Grid,
    *,
    batch_size: int = 64,
) -> PatchResult:
    """Run the model's current state on ``source.case`` once per variant, each variant patching
    its hooks / heads / positions with the source's values; ``batch_size`` variants share a pass.

    A variant is a Patch or a tuple of Patches (applied together); ``()`` patches nothing.

    Speed, with the scores of a full hooked forward pass per variant (bit for bit on CPU in the
    tests): one unpatched pass of the model's current state records the residual entering every
    block, the arguments HF passes to each
    (:class:`~attention_drift.core.runner.LayerRunner`) and the values at the patched hooks.
    Each variant starts at the first layer where it writes a value the unpatched pass does not
    already hold there; below it, its forward pass is the unpatched one (a variant writing no
    new value, e.g. restoring attention below the edited layer, *is* the unpatched run and gets
    its scores). The variants are batched in the order of their start layers; a batch runs from
    its lowest one, each variant joining it (as a copy of the unpatched residual) at its own, so
    no variant runs a layer below its start. The final norm and unembedding are applied at the
    read positions only, not to the whole vocabulary at every position
    (``benchmarks/bench_patching.py`` times a sweep against a full forward pass per variant).
    """
    grid = variants if isinstance(variants, Grid) else None
    variants = list(grid.variants if grid is not None else (_as_variant(v) for v in variants))
    _check(model, variants)
    if batch_size < 1:
        raise PatchingError(f"batch_size must be >= 1, not {batch_size}")
    missing = sorted(set(hook_names(variants)) - set(source.cache))
    if missing:
        raise PatchingError(f"the source activations lack hooks {missing[:4]}; record them with the same variants")
    batch, n_layers = source.batch, model.cfg.n_layers
    masks = _masks(model, source.case, batch, variants)
    entering = [act_name("resid_pre", layer) for layer in range(n_layers)]
    leaving = act_name("resid_post", n_layers - 1)
    with torch.no_grad():
        runner = LayerRunner(model, batch, 0, [*entering, leaving, *masks])
        base = _read_scores(model, runner.saved[leaving], batch, source.target_ids)
        starts = _first_changed_layers(masks, source.cache, runner.saved, len(variants), n_layers)
        lp_true, lp_new = base.lp_true.repeat(len(variants)), base.lp_new.repeat(len(variants))
        order = sorted((v for v in range(len(variants)) if starts[v] < n_layers), key=starts.__getitem__)
        for chunk in (order[i:i + batch_size] for i in range(0, len(order), batch_size)):
            first = [starts[v] for v in chunk]
            hidden = None
            with model.hooks(fwd_hooks=_patch_hooks(source, {n: m[chunk] for n, m in masks.items()})):
                for layer in range(first[0], n_layers):
                    if layer in first:  # these variants join as copies of the unpatched residual
                        joining = runner.saved[entering[layer]].repeat(first.count(layer), 1, 1)
                        hidden = joining if hidden is None else torch.cat([hidden, joining])
                    hidden = runner.block(layer, hidden)
            scores = _read_scores(model, hidden, batch, source.target_ids)
            lp_true[chunk], lp_new[chunk] = scores.lp_true, scores.lp_new
    patched = Scores(lp_true, lp_new)
    return PatchResult(source.case, tuple(variants), patched, base, source.scores, grid)


def run_variant(
    model,
    source: Activations,
    variant: Patch | Sequence[Patch],
    names_filter: Callable[[str], bool] | None = None,
) -> tuple[Float[Tensor, "row seq vocab"], dict[str, Tensor]]:
    """Logits (and, with ``names_filter``, the cached activations after patching) of ONE variant:
    the model's current state run on ``source.batch`` with the variant's hooks patched."""
    variant = _as_variant(variant)
    _check(model, [variant])
    masks = _masks(model, source.case, source.batch, [variant])
    hooks = _patch_hooks(source, masks)
    batch = source.batch
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        if names_filter is None:
            return model(batch.input_ids, attention_mask=batch.attention_mask), {}
        logits, cache = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                             names_filter=names_filter)
    return logits, {name: cache[name] for name in cache.keys()}


def patch_edit(
    model,
    cases: Sequence[PatchCase],
    edit_fn: Callable[[], AbstractContextManager],
    variants: Sequence[Patch | Sequence[Patch]] | Grid,
    *,
    direction: str = "restore",
    batch_size: int = 64,
) -> list[PatchResult]:
    """Patch between the unedited model and the model inside ``edit_fn()``, for every case.

    ``direction="restore"``: cache the unedited model's activations first, then run the edited
    model with them patched in (how much of the true answer comes back). ``"contaminate"``: cache
    the edited model's activations inside the edit, then run the unedited model with them
    substituted (how much the true answer drops). The edit is entered once for all cases; all
    specs are validated (and the pattern probe run) before it.
    """
    if direction not in DIRECTIONS:
        raise PatchingError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    if not callable(edit_fn):
        raise PatchingError("edit_fn must be a callable returning a context manager, e.g. lambda: edit(model, rw)")
    cases = list(cases)
    if not cases:
        raise PatchingError("patch_edit needs at least one case")
    variant_list = list(variants.variants if isinstance(variants, Grid) else (_as_variant(v) for v in variants))
    runnable = variants if isinstance(variants, Grid) else variant_list
    _check(model, variant_list)
    for case in cases:
        batch, _ = _layout(model, case)
        _masks(model, case, batch, variant_list)

    def record_all() -> list[Activations]:
        return [record_activations(model, case, variant_list) for case in cases]

    if direction == "restore":
        sources = record_all()
        with edit_fn():
            return [run_patched(model, s, runnable, batch_size=batch_size) for s in sources]
    with edit_fn():
        sources = record_all()
    return [run_patched(model, s, runnable, batch_size=batch_size) for s in sources]


def aggregate(results: Sequence[PatchResult], metric: str = "recovery") -> tuple[Tensor, Tensor]:
    """(mean, standard error) of ``metric`` over results of the same variants (e.g. records),
    shaped like their grid; non-finite entries (a recovery over a zero gap) are left out per variant."""
    if not results:
        raise PatchingError("aggregate needs at least one result")
    if len({r.variants for r in results}) != 1:
        raise PatchingError("aggregate needs results of identical variants (the same grid for every case)")
    values = torch.stack([r.values(metric) for r in results])
    valid = values.isfinite()
    n = valid.sum(0)
    mean = torch.where(valid, values, 0.0).sum(0) / n.clamp(min=1)
    var = torch.where(valid, (values - mean) ** 2, 0.0).sum(0) / (n - 1).clamp(min=1)
    sem = (var / n.clamp(min=1)).sqrt()
    return mean.masked_fill(n == 0, math.nan), sem.masked_fill(n < 2, math.nan)


# ---------------------------------------------------------------------------------------------
# Grids


def _window(layer: int, window: int, n_layers: int) -> tuple[int, ...]:
    """Layers of a window of ``window`` layers centred on ``layer`` and clipped to the model
    (ROME's causal-tracing convention: ``layer - window // 2`` up to ``layer + ceil(window / 2)``)."""
    return tuple(range(max(0, layer - window // 2), min(n_layers, layer + math.ceil(window / 2))))


def layer_head_grid(model, component: str = "pattern", positions: int | Sequence[int] | str | None = None) -> Grid:
    """[layer, head]: each single head of each layer patched alone."""
    if component not in HEAD_COMPONENTS:
        raise PatchingError(f"a layer x head grid needs a per-head component {HEAD_COMPONENTS}, not {component!r}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    variants = tuple((Patch(component, (l,), (h,), positions),) for l in range(n_layers) for h in range(n_heads))
    return Grid(variants, ("layer", "head"),
                (tuple(map(str, range(n_layers))), tuple(map(str, range(n_heads)))))


def layer_component_grid(
    model,
    components: Sequence[str] = ("attn_out", "mlp_out"),
    positions: int | Sequence[int] | str | None = None,
    window: int = 1,
) -> Grid:
    """[layer, component]: each component patched over a window of ``window`` layers centred on
    each layer (``window=1``: the layer alone)."""
    if window < 1:
        raise PatchingError(f"window must be >= 1 layer, not {window}")
    n_layers = model.cfg.n_layers
    variants = tuple((Patch(c, _window(l, window, n_layers), None, positions),)
                     for l in range(n_layers) for c in components)
    return Grid(variants, ("layer", "component"), (tuple(map(str, range(n_layers))), tuple(components)))


def window_grid(
    model,
    component: str = "pattern",
    window: int = 10,
    positions: int | Sequence[int] | str | None = None,
) -> Grid:
    """[layer]: ``component`` (all heads) patched over windows of ``window`` layers centred on
    each layer (the paper restores attention weights over windows of 10 layers)."""
    grid = layer_component_grid(model, (component,), positions, window)
    labels = tuple(f"{v[0].layers[0]}-{v[0].layers[-1]}" for v in grid.variants)
    return Grid(grid.variants, ("layer",), (labels,))


def layer_position_grid(
    model,
    positions: Sequence[int],
    component: str = "mlp_out",
    window: int = 6,
) -> Grid:
    """[position, layer]: ``component`` substituted at one token position over a window of layers
    centred on each layer (the paper's contamination: windows of 6 layers)."""
    if window < 1:
        raise PatchingError(f"window must be >= 1 layer, not {window}")
    n_layers = model.cfg.n_layers
    variants = tuple((Patch(component, _window(l, window, n_layers), None, (p,)),)
                     for p in positions for l in range(n_layers))
    return Grid(variants, ("position", "layer"), (tuple(map(str, positions)), tuple(map(str, range(n_layers)))))


# ---------------------------------------------------------------------------------------------
# One record: named restoration variants, sweeps and contamination

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
    _check(model, list(summary_variants(model, [], True).values()))
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
                     **{n: _as_variant(v) for n, v in extra.items()}}
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

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
protocol for any cases and variants around an editor given as a context manager factory
(:func:`patch_states` between any two model states, e.g. two edits of one fact); the
grid builders (:func:`layer_head_grid`, :func:`layer_component_grid`, :func:`window_grid`,
:func:`layer_position_grid`) produce the usual sweeps.

:mod:`attention_drift.measure.patch_record` builds the paper's per-record analysis on this engine.

Tensors made here are on the model's device.

Pattern patching needs an attention whose pattern the bridge computes itself: on GPT-J, GPT-Neo
and OPT, TransformerLens 4.3 lets HF compute attention and discards edits to ``hook_pattern``.
:func:`supports_pattern_patching` probes each model once; patching a pattern on a model that
fails the probe raises :class:`PatchingError`. ``hook_resid_mid`` is not offered: on the 4.3
bridge an edit there reaches the MLP's input but not the residual stream carried past the MLP.
"""

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from attention_drift.core import tokens
from attention_drift.core.data import Record, Rewrite, distract_prompt
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
            prediction position); or a region name of :data:`attention_drift.core.regions.REGIONS`
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


def as_variant(v: Patch | Sequence[Patch]) -> Variant:
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
    return sorted({name for v in variants for p in as_variant(v) for name in p.hook_names()})


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


def check_patchable(model, variants: Sequence[Variant]) -> None:
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
    variants = list(grid.variants if grid is not None else (as_variant(v) for v in variants))
    check_patchable(model, variants)
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
    variant = as_variant(variant)
    check_patchable(model, [variant])
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
    substituted (how much the true answer drops). :func:`patch_states` with one side unedited.
    """
    if direction not in DIRECTIONS:
        raise PatchingError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    if not callable(edit_fn):
        raise PatchingError("edit_fn must be a callable returning a context manager, e.g. lambda: edit(model, rw)")
    if direction == "restore":
        return patch_states(model, cases, None, edit_fn, variants, batch_size=batch_size)
    return patch_states(model, cases, edit_fn, None, variants, batch_size=batch_size)


def patch_states(
    model,
    cases: Sequence[PatchCase],
    source_fn: Callable[[], AbstractContextManager] | None,
    base_fn: Callable[[], AbstractContextManager] | None,
    variants: Sequence[Patch | Sequence[Patch]] | Grid,
    *,
    batch_size: int = 64,
) -> list[PatchResult]:
    """Cache every case inside ``source_fn()``, then run it inside ``base_fn()`` with the source's
    activations patched in; either side None is the model as it is (unedited).

    Two edits of the same request tell where one differs from the other: e.g. source = the edit
    with SADR+, base = plain ROME, patching attention patterns, asks how much of SADR+'s
    protection comes from where heads look (a recovery of 1: all of it). Each state is entered
    once for all cases (an :class:`~attention_drift.editing.EditResult` can be entered again and
    again); all specs are validated (and the pattern probe run) before either.
    """
    for name, fn in (("source_fn", source_fn), ("base_fn", base_fn)):
        if fn is not None and not callable(fn):
            raise PatchingError(f"{name} must be None (the unedited model) or a callable returning a context "
                                "manager, e.g. lambda: edit(model, rw)")
    cases = list(cases)
    if not cases:
        raise PatchingError("patching needs at least one case")
    variant_list = list(variants.variants if isinstance(variants, Grid) else (as_variant(v) for v in variants))
    runnable = variants if isinstance(variants, Grid) else variant_list
    check_patchable(model, variant_list)
    for case in cases:
        batch, _ = _layout(model, case)
        _masks(model, case, batch, variant_list)
    with source_fn() if source_fn is not None else contextlib.nullcontext():
        sources = [record_activations(model, case, variant_list) for case in cases]
    with base_fn() if base_fn is not None else contextlib.nullcontext():
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

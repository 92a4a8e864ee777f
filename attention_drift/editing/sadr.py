"""SADR: Selective Attention Drift Restriction (the paper's regulariser), and our extensions.

While an editor optimises its value vector, SADR compares, at every step and for every layer
at or above the edit layer, the attention row of each rewriting prompt's prediction position
(the last prompt token) with the same row of the unedited model (recorded at step 0, where the
injected delta is zero). A head is *selected* when its current attention to the subject's last
token exceeds the largest attention that any head of that layer paid that token before the
edit ("hinge" selection; recomputed every step, not differentiated). The loss is

    weight * sum_layers (1/N) sum_prompts sum_selected_heads D(before_row || current_row)

with D the KL divergence (eps 1e-8 inside the logs), or JS / squared L2. ``selection="all"``
restricts every head (the paper's non-selective ablation).

:class:`SADRLoss` plugs this into the editors' value optimisation as an extra loss term: it
reads ``blocks.L.attn.hook_pattern`` from the forward pass each step already runs (no second
forward) and records the selected-head masks and per-step values for plotting. Pass a
:class:`SADRConfig` as ``edit(..., sadr=...)``.

Our extension (``distract=True``): the rewriting prompts never show the edited subject in a
context followed by another question, which is where specificity failure happens. With it,
the optimisation batch also holds distract-style rows, ``"{prompt} {target_new}. {prompt with
another subject}"`` for a few fixed subjects (no evaluation data is used), and SADR restricts
their prediction rows as well.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attention_drift.core.data import Rewrite
from attention_drift.core.errors import AttentionDriftError
from attention_drift.core.hooks import OUTPUT_LOG_PROBS as OUTPUT
from attention_drift.core.hooks import act_name
from attention_drift.editing.sadr_rows import (  # noqa: F401  (the rows' lists, also read from here)
    DISTRACT_FORMS, DISTRACT_SUBJECTS, KEEP_STATEMENTS, MENTIONS, NULL_MENTIONS, RELATION_FORMS, RELATION_PROMPTS,
    RELATION_STEMS, RESTATE_PREFIXES, distract_prompts, guard_prompts, relation_prompts)

EPS = 1e-8
SELECTIONS = ("hinge", "all")
DIVERGENCES = ("kl", "js", "l2")
OUTPUTS = ("target", "contrast", "kl", "both")


KEY_NULL_EDITORS = ("rome", "memit", "pmet")
"""The editors whose key-value update takes :attr:`SADRConfig.key_nulls` (ROME moves ``u``; MEMIT and
PMET constrain each layer's least squares)."""


class SADRError(AttentionDriftError):
    """A SADR configuration that cannot be used as given."""


@dataclass(frozen=True)
class SADRConfig:
    """How SADR regularises attention during an edit.

    ``SADRConfig()`` is the published protocol for whichever editor it is used with: the
    editor resolves the unset ``weight`` and ``steps`` with :meth:`resolved` (the model
    family's :data:`PRESETS` entry, else :data:`PUBLISHED`), so ``edit(..., sadr=SADRConfig())``
    and ``SADRConfig.for_model(model, method)`` (what the command line uses) edit alike.

    Args:
        weight: gamma, the loss weight; None: the preset for the model family and editing
            method (published GPT-J values: ROME 0.01, MEMIT 0.005, PMET 0.08; FT 0.01 by our
            choice, :data:`CHOSEN`). It multiplies
            a sum over layers and heads, so its scale depends on model depth.
        layers: the layers regularised; None means every layer at or above the edit layer
            (layers below the injected delta cannot drift).
        selection: "hinge" (the paper's selective variant) or "all" heads.
        divergence: "kl" (published), "js" or "l2".
        steps: optimisation steps to use instead of the editor's own; None: the preset for
            the method (published: ROME 80 against plain ROME's 20, MEMIT 20, PMET 40 against
            plain PMET's 20), or the editor's own steps for a method without one (FT).
        distract: also regularise distract-style prompts (the edit sentence followed by
            unrelated prompts), where specificity failure happens; our extension, off in the
            published variant.
        distract_only: regularise only those distract prompts, not the rewriting prompts
            (where attention to the subject is how the new fact gets recalled); implies
            ``distract``. Our extension.
        output_weight: factor of an output-locality term on the distract prompts, at their last
            position (where the failure shows: another subject's fact pulled toward the new
            target), averaged over them; ``output`` says which. Needs ``distract``; 0: off
            (published). Our extension.
        output: ``"target"``: how far the log-probability of the new target's first token rose
            above the unedited model's, ``relu(log p_now - log p_before)`` (sensitive to the
            small probabilities that decide a distract prompt); ``"contrast"``: how far
            ``log p(new) - log p(true)`` of the first tokens of the new and the old target rose
            (the comparison that decides a distract prompt whose answer is the old target);
            ``"kl"``: KL(unedited || current) of the whole next-token distribution; ``"both"``:
            target + kl.
        output_margin: the rise (nats) a distract row may take before the ``"target"`` /
            ``"contrast"`` term counts it, ``relu(rise - output_margin)``: a small rise rarely
            turns a distract prompt whose answer leads by several nats, and leaving it free leaves
            the edit room on prompts that share the edited subject. 0: every rise counts (``plus``).
            Our extension.
        distract_subjects: the other subjects of the distract prompts (a fixed list, never
            evaluation data).
        distract_forms: the contexts the distract prompts put before the prompt about another
            subject (:func:`distract_prompts`), one row per form and subject: ``"edit"``, the edit
            sentence ``"{prompt} {target_new}."`` (the paper's distract form); ``"mention"``, a
            sentence that only names the edited subject (:data:`MENTIONS`); ``"restate"``, the edit
            sentence after a neutral one (:data:`RESTATE_PREFIXES`). Our extension.
        attention_forms: the distract forms whose rows the attention term reads (None: every form of
            ``distract_forms``); with ``distract_only``, the attention term reads nothing else. A
            subset of ``distract_forms``. Our extension.
        output_forms: the distract forms whose rows the output term reads (None: every form of
            ``distract_forms``). A subset of ``distract_forms``: e.g. the output term on the edit
            sentence's rows and the attention term on the mention rows. Our extension.
        clamp_scale: the editor's ``clamp_norm_factor`` (the radius of the value delta's ball)
            is multiplied by this: room for the edit to reach its target where the preset's
            ball stops it short, while the output term keeps the added room off other subjects.
            1: the editor's own (published). Our extension.
        guard_weight: factor of an efficacy guard on the rewriting prompts (the edit request's
            own prompt in its context templates, no evaluation data): ``relu(guard_margin -
            (log p(new) - log p(true)))`` of the first target tokens at the position predicting
            the target, averaged over the rows, so that an output term cannot buy locality
            with the edit itself. 0: off (published). Our extension.
        guard_margin: the log-odds (nats) by which the new target must beat the old one there.
        guard_mentions: the guard also reads rows that mention the edited subject (each sentence of
            :data:`MENTIONS`) and then ask the request's own prompt, where the new target must win:
            the counterpart of the "mention" distract rows, so that an output term on those cannot
            buy locality by weakening the edit after any context. Needs ``guard_weight``. Our extension.
        guard_others: the guard also reads rows that name another subject first (the i-th of
            :data:`MENTIONS` about the i-th of ``distract_subjects``) and then ask the request's own
            prompt: the mirror image of the "mention" distract rows, where the edit must still be
            read. Needs ``guard_weight``. Our extension.
        key_nulls: sentences naming the edited subject (``"{subject}"``) where the edit must not fire, e.g.
            :data:`NULL_MENTIONS`: ROME's update direction ``u`` is moved the least (in the metric of
            the key covariance ``C``, the one ROME's ``u = C^-1 k*`` minimises) so that the edited layer's
            keys of the subject's last token in these sentences get no change, while each rewriting key
            (the bare prompt's and every context template's) keeps the change it had; MEMIT and PMET
            solve each layer's least squares under the constraint that those keys get no change. A key
            holds only the tokens up to the subject, so this separates contexts that differ *before* the
            subject (a mention, "... about {subject}.") from statements about it; it cannot separate the
            edit sentence restated later. ROME, MEMIT and PMET. Our extension; () changes nothing.
        key_keeps: statements of the edit (``"{prompt}"``, the request's prompt, after other words, e.g.
            :data:`KEEP_STATEMENTS`) whose subject keys keep the response they have without the nulls: more
            rewriting keys for ROME's ``u``, and for MEMIT / PMET each layer's change at those keys held to
            the unconstrained update's. Paraphrases that open with an unrelated sentence lose part of their
            response to the nulls; these keep keys of that shape. Needs ``key_nulls``. Our extension.
        relation_prompts: prompts of other relations about the edited subject (``"{subject}"``, e.g.
            :data:`RELATION_PROMPTS`), where the new target may not gain: ``relu(log p_now(new) -
            log p_before(new))`` of its first token at their end (relation specificity's failure is
            the new target taking over the subject's other facts). A prompt whose relation the
            request's prompt names is left out (:func:`relation_prompts`). Our extension.
        relation_forms: the contexts of those rows: ``"bare"``, the relation prompt alone; ``"edit"``,
            after the edit sentence (the paper's distract relation form). Our extension.
        relation_weight: factor of that term, averaged over the rows; 0: off. Our extension.
        verify: after the edit, check that each request's new target beats its old one on the
            request's own prompt (scored as efficacy is: the geometric-mean token probability
            of each continuation); where it does not, the edit is made again without the SADR
            term, then, if that fails too, with the editor's clamp doubled
            (``EditResult.fallback`` says which edit was kept). Reads nothing but the request.
            Our extension; off in the published variant.
    """

    weight: float | None = None
    layers: tuple[int, ...] | None = None
    selection: str = "hinge"
    divergence: str = "kl"
    steps: int | None = None
    distract: bool = False
    distract_only: bool = False
    output_weight: float = 0.0
    output: str = "target"
    output_margin: float = 0.0
    distract_subjects: tuple[str, ...] = DISTRACT_SUBJECTS
    distract_forms: tuple[str, ...] = ("edit",)
    attention_forms: tuple[str, ...] | None = None
    output_forms: tuple[str, ...] | None = None
    clamp_scale: float = 1.0
    guard_weight: float = 0.0
    guard_margin: float = 1.0
    guard_mentions: bool = False
    guard_others: bool = False
    key_nulls: tuple[str, ...] = ()
    key_keeps: tuple[str, ...] = ()
    relation_prompts: tuple[str, ...] = ()
    relation_forms: tuple[str, ...] = ()
    relation_weight: float = 0.0
    verify: bool = False

    @classmethod
    def for_model(cls, model, method: str = "rome", **overrides) -> "SADRConfig":
        """The preset weight and steps for ``model``'s family and the editing ``method``
        (:data:`PRESETS`; families without a sweep get the published GPT-J values), with
        ``overrides`` applied: ``SADRConfig(**overrides).resolved(model, method)``."""
        return cls(**overrides).resolved(model, method)

    def resolved(self, model, method: str) -> "SADRConfig":
        """This config with an unset ``weight`` / ``steps`` filled in for ``model`` and ``method``.

        ``model`` is a model (its HF ``model_type`` selects :data:`PRESETS`) or a family name.
        ``steps`` stays None for a method without published values (the editor keeps its
        own); ``weight`` must then be given, except for the methods in :data:`CHOSEN` (FT).
        """
        family = str(model.original_model.config.model_type) if hasattr(model, "original_model") else str(model)
        source = INHERITED.get(method, method)
        preset = PRESETS.get((family, method), PRESETS.get((family, source), PUBLISHED.get(source, CHOSEN.get(source))))
        if preset is None and self.weight is None:
            raise SADRError(
                f"no published SADR weight for editing method {method!r} (published: {', '.join(PUBLISHED)}); "
                "give one, e.g. SADRConfig(weight=0.01)"
            )
        weight, steps = preset if preset is not None else (self.weight, self.steps)
        return replace(
            self,
            weight=self.weight if self.weight is not None else weight,
            steps=self.steps if self.steps is not None else steps,
        )

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise SADRError(f"SADR selection must be one of {SELECTIONS}, not {self.selection!r}")
        if self.divergence not in DIVERGENCES:
            raise SADRError(f"SADR divergence must be one of {DIVERGENCES}, not {self.divergence!r}")
        if self.weight is not None and self.weight < 0:
            raise SADRError(f"SADR weight must be >= 0, not {self.weight}")
        if self.distract_only and not self.distract:
            object.__setattr__(self, "distract", True)
        if self.steps is not None and self.steps < 1:
            raise SADRError(f"SADR steps must be a positive number of optimisation steps, not {self.steps}")
        if self.output not in OUTPUTS:
            raise SADRError(f"SADR output must be one of {OUTPUTS}, not {self.output!r}")
        if self.output_weight < 0:
            raise SADRError(f"SADR output_weight must be >= 0, not {self.output_weight}")
        if self.output_weight and not self.distract:
            raise SADRError("SADR output_weight regularises the distract prompts: set distract=True too")
        if self.output_margin < 0 or (self.output_margin and (not self.output_weight or self.output == "kl")):
            raise SADRError(f"SADR output_margin {self.output_margin}: give a margin >= 0, and one > 0 only with an "
                            "output_weight > 0 and output 'target', 'contrast' or 'both'")
        for name in ("distract_subjects", "distract_forms", "attention_forms", "output_forms", "key_nulls", "key_keeps",
                     "relation_prompts", "relation_forms"):
            value = getattr(self, name)  # a list (JSON) or one string: a tuple
            if isinstance(value, (list, str)):
                object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        bad = [f for f in self.distract_forms if f not in DISTRACT_FORMS]
        if bad or not self.distract_forms:
            raise SADRError(f"SADR distract_forms {list(self.distract_forms)}: give one or more of {DISTRACT_FORMS}")
        for name in ("attention_forms", "output_forms"):
            forms = getattr(self, name)
            if forms is not None and (not self.distract or not forms or set(forms) - set(self.distract_forms)):
                raise SADRError(f"SADR {name} {list(forms)}: give one or more of distract_forms "
                                f"{list(self.distract_forms)}, with distract=True")
        if self.guard_weight < 0 or self.guard_margin < 0:
            raise SADRError(f"SADR guard_weight and guard_margin must be >= 0, not {self.guard_weight} and "
                            f"{self.guard_margin}")
        for name in ("guard_mentions", "guard_others"):
            if getattr(self, name) and not self.guard_weight:
                raise SADRError(f"SADR {name} adds rows to the efficacy guard: set guard_weight > 0 too")
        bad = [t for t in self.key_nulls if "{subject}" not in t]
        if bad:
            raise SADRError(f"SADR key_nulls {bad}: each sentence must name the subject as '{{subject}}'")
        bad = [t for t in self.key_keeps if "{prompt}" not in t]
        if bad or (self.key_keeps and not self.key_nulls):
            raise SADRError(f"SADR key_keeps {list(self.key_keeps)}: each statement must hold the request's prompt as "
                            "'{prompt}', and key_keeps only acts with key_nulls set")
        bad = [t for t in self.relation_prompts if "{subject}" not in t]
        if bad or set(self.relation_forms) - set(RELATION_FORMS) or self.relation_weight < 0 or (
                bool(self.relation_weight) != bool(self.relation_prompts and self.relation_forms)):
            raise SADRError(f"SADR relation rows: relation_prompts {list(self.relation_prompts)} must each name the "
                            f"subject as '{{subject}}', relation_forms {list(self.relation_forms)} be among "
                            f"{RELATION_FORMS}, and relation_weight ({self.relation_weight}) > 0 exactly when both "
                            "are given")
        if not self.clamp_scale > 0:
            raise SADRError(f"SADR clamp_scale must be > 0, not {self.clamp_scale}")
        if self.distract and not self.distract_subjects:
            raise SADRError("SADR distract prompts need at least one subject in distract_subjects")


PUBLISHED = {"rome": (0.01, 80), "memit": (0.005, 20), "pmet": (0.08, 40)}
"""(weight, steps) per method: the paper's GPT-J settings (its run scripts ``examples/scripts/
{rome,memit,pmet}.sh``: ``--v_num_grad_steps`` 80 / 20 / 40 with SADR against 20 / 20 / 20
without, ``--attn_W_loss_weight`` 100 / 50 / 800 times 1e-4)."""

INHERITED = {"alphaedit": "memit", "emmet": "memit", "r-rome": "rome"}
"""Editors without published SADR values whose value optimisation is another editor's, verbatim:
they take that editor's (weight, steps). AlphaEdit and EMMET optimise MEMIT's z with MEMIT's
objective (MEMIT's 0.005, 20 steps); r-ROME optimises ROME's v* with ROME's objective (ROME's
0.01, 80 steps). No SADR paper gives values for these three: these are borrowed, not published."""

CHOSEN: dict[str, tuple[float, int | None]] = {"ft": (0.01, None)}
"""(weight, steps) of editors that have no published SADR values, by our stated choice (steps None:
the editor's own). FT (constrained fine-tuning of one MLP output projection,
:mod:`~attention_drift.editing.ft`): ROME's published weight 0.01, because FT-L changes one MLP
layer as ROME does, SADR then regularises the same layers (the edited one and those above it) and
FT's loss is the same kind of per-token target NLL that the weight was set against; and FT's own
25 steps, so that FT+SADR differs from FT only by the term (the extra steps the paper gives ROME+SADR
are for the value optimisation, which stops early; FT runs its steps at a fixed small learning rate
inside its L-infinity ball). Not swept."""

PRESETS: dict[tuple[str, str], tuple[float, int]] = {}
"""(weight, steps) per (HF model_type, method) where a sweep found better values than :data:`PUBLISHED`.

Sweep so far (``benchmarks/eval_grid.py --variants rome,rome-sadr,rome-sadr-w0.1,rome-sadr-w1``,
SmolLM2-135M, 12 shared dev records; ``figures/figures.md`` item 7): weights 0.01 / 0.1 / 1 gave
distract-neighbourhood 21.6 / 21.6 / 35.1 (plain ROME 13.5, pre-edit 43.2) with efficacy
100 / 100 / 91.7 and paraphrase 75.0 / 66.7 / 58.3 (ROME 83.3): only 0.01 keeps efficacy >= 95,
so the published ROME value stays SmolLM2's default and no entry is needed yet."""


def divergence(
    before: Float[Tensor, "*rows key"], now: Float[Tensor, "*rows key"], kind: str = "kl"
) -> Float[Tensor, "*rows"]:
    """D(before || now) per attention row: KL, Jensen-Shannon or squared L2 (eps 1e-8 in logs)."""
    if kind == "kl":
        return (before * ((before + EPS).log() - (now + EPS).log())).sum(-1)
    if kind == "js":
        mid = (before + now) / 2
        kl = lambda p, q: (p * ((p + EPS).log() - (q + EPS).log())).sum(-1)  # noqa: E731
        return (kl(before, mid) + kl(now, mid)) / 2
    if kind == "l2":
        return ((before - now) ** 2).sum(-1)
    raise SADRError(f"divergence must be one of {DIVERGENCES}, not {kind!r}")


def hinge_mask(
    before: Float[Tensor, "prompt layer head key"],
    now: Float[Tensor, "prompt layer head key"],
    subject_last: Int[Tensor, " prompt"],
) -> Bool[Tensor, "prompt layer head"]:
    """Heads whose current attention to the subject's last token exceeds the pre-edit maximum
    over that layer's heads (strict), per prompt and layer."""
    index = subject_last.view(-1, 1, 1, 1).expand(-1, before.shape[1], before.shape[2], 1)
    before_subject = before.gather(-1, index)[..., 0]
    now_subject = now.gather(-1, index)[..., 0]
    return now_subject > before_subject.amax(-1, keepdim=True)


def sadr_loss(
    before: Float[Tensor, "prompt layer head key"],
    now: Float[Tensor, "prompt layer head key"],
    subject_last: Int[Tensor, " prompt"],
    config: SADRConfig,
) -> tuple[Float[Tensor, ""], Bool[Tensor, "prompt layer head"]]:
    """The SADR loss on the prediction-position attention rows, and the selected-head mask.

    ``before`` is the unedited model's rows (detached), ``now`` the current step's (live);
    rows are over right-padded key positions, where both are zero and contribute nothing.
    """
    if config.weight is None:
        raise SADRError("SADRConfig.weight is unset; resolve it first: config.resolved(model, method)")
    if config.selection == "hinge":
        mask = hinge_mask(before, now.detach(), subject_last)
    else:
        mask = torch.ones(before.shape[:3], dtype=torch.bool, device=before.device)
    per_head = divergence(before, now, config.divergence) * mask
    n_prompts = before.shape[0]
    loss = config.weight * per_head.sum() / n_prompts
    return loss, mask


@dataclass
class SADRLoss:
    """SADR as an extra loss term of the editors' value optimisation.

    At step 0 (no delta yet) it stores the unedited attention rows; at each step it returns
    :func:`sadr_loss` of the current rows. ``record`` (copied into each request's trace
    under ``"sadr"``) holds ``layers``, ``mask`` (per step, bool ``[row, layer, head]``),
    ``loss`` (per step), ``subject_before`` and ``subject_after`` (attention of the
    prediction position to the subject's last token, ``[row, layer, head]``, before the
    edit and at the last step), ``divergence_after`` (unweighted divergence of every head's
    row at the last step, ``[row, layer, head]``), ``distract_rows`` (how many rows are
    distract prompts).
    """

    config: SADRConfig
    name: str = "sadr"
    record: dict = field(default_factory=dict)
    _before: Tensor | None = field(default=None, repr=False)
    _before_output: Tensor | None = field(default=None, repr=False)
    _n_guard_rows: int = field(default=0, repr=False)
    _n_relation_rows: int = field(default=0, repr=False)

    def extra_prompts(self, request: Rewrite) -> list[str]:
        """The guard's rows (:func:`guard_prompts`), the distract rows, then the relation rows
        (:func:`relation_prompts`): the batch's output rows go in that order."""
        rows = guard_prompts(request, mentions=self.config.guard_mentions, others=self.config.guard_others,
                             subjects=self.config.distract_subjects)
        self._n_guard_rows = len(rows)
        if self.config.distract:
            rows += distract_prompts(request, self.config.distract_subjects, self.config.distract_forms)
        relations = relation_prompts(request, self.config.relation_prompts, self.config.relation_forms)
        self._n_relation_rows = len(relations)
        return rows + relations

    def null_prompts(self, request: Rewrite) -> list[str]:
        """The :attr:`SADRConfig.key_nulls` sentences about ``request``'s subject: where a ROME, MEMIT or PMET
        update must leave the subject's key unanswered."""
        return [t.format(subject=request.subject) for t in self.config.key_nulls]

    def keep_prompts(self, request: Rewrite) -> list[str]:
        """The :attr:`SADRConfig.key_keeps` statements of ``request``: where the nulls must leave the
        subject's key its response."""
        return [t.format(prompt=request.prompt) for t in self.config.key_keeps]

    def _distract_rows(self, info, forms: tuple[str, ...] | None) -> Tensor:
        """The batch rows of the distract prompts of ``forms`` (None: all): :func:`distract_prompts`
        puts them form by form, the same number of rows per form."""
        rows = self._split_extra(info)[0]
        if forms is None:
            return rows
        per_form = len(rows) // len(self.config.distract_forms)
        keep = [i for i, form in enumerate(self.config.distract_forms) if form in forms]
        return torch.cat([rows[i * per_form:(i + 1) * per_form] for i in keep])

    def _split_extra(self, info) -> tuple[Tensor, Tensor]:
        """(distract rows, the guard's extra rows) of the batch."""
        n_own, n_rel = self._n_guard_rows, self._n_relation_rows
        return info.extra_rows[n_own:len(info.extra_rows) - n_rel], info.extra_rows[:n_own]

    def _relation_rows(self, info) -> Tensor:
        """The batch rows of the relation prompts: the last extra rows."""
        return info.extra_rows[len(info.extra_rows) - self._n_relation_rows:]

    def output_rows(self, info) -> Tensor:
        """The guard's rows (the rewriting rows, then its mention rows), the distract rows, then the
        relation rows (for the output term)."""
        own = self._split_extra(info)[1]
        distract = self._distract_rows(info, self.config.output_forms)
        guarded = torch.cat([torch.arange(info.n_rewriting), own]) if self.config.guard_weight else own[:0]
        return torch.cat([guarded, distract if self.config.output_weight else distract[:0], self._relation_rows(info)])

    def layers(self, info) -> tuple[int, ...]:
        if self.config.layers is None:
            return tuple(range(info.layer, info.n_layers))
        bad = [l for l in self.config.layers if not 0 <= l < info.n_layers]
        if bad:
            raise SADRError(f"SADR layers {bad} are out of range: the model has layers 0..{info.n_layers - 1}")
        return tuple(self.config.layers)

    def hook_names(self, info) -> list[str]:
        return [act_name("pattern", l) for l in self.layers(info)] if self.attends else []

    @property
    def attends(self) -> bool:
        """Whether attention rows are read: not when only the output term is on (weight 0 and an
        output weight); a weight of 0 alone still records the rows (drift without restriction)."""
        return self.config.weight != 0 or not self._reads_output

    @property
    def _reads_output(self) -> bool:
        return bool(self.config.output_weight or self.config.guard_weight or self.config.relation_weight)

    def __call__(self, step: int, acts: Mapping[str, Tensor], info) -> Tensor:
        first = step == 0 or not self.record
        if first:
            self.record = {"layers": self.layers(info) if self.attends else (), "mask": [], "loss": [],
                           "distract_rows": len(self._split_extra(info)[0])}
        loss = torch.zeros(())
        if self.attends:
            loss = loss + self._attention_term(first, acts, info)
        if self._reads_output:
            loss = loss + self._output_term(first, acts, info)
        self.record["loss"].append(loss.item())
        return loss

    def _attention_term(self, first: bool, acts: Mapping[str, Tensor], info) -> Tensor:
        distract = self._distract_rows(info, self.config.attention_forms)
        rows = distract if self.config.distract_only else torch.cat([torch.arange(info.n_rewriting), distract])
        query = info.last_prompt_index[rows]
        now = torch.stack([acts[n][rows, :, query, :] for n in self.hook_names(info)], 1).float()
        subject = info.subject_last_index[rows]
        if first or self._before is None:
            self._before = now.detach().clone()
            self.record["subject_before"] = _at(self._before, subject)
        loss, mask = sadr_loss(self._before, now, subject, self.config)
        self.record["mask"].append(mask)
        self.record["subject_after"] = _at(now.detach(), subject)
        self.record["divergence_after"] = divergence(self._before, now.detach(), self.config.divergence)
        return loss

    def _output_term(self, first: bool, acts: Mapping[str, Tensor], info) -> Tensor:
        """The output term on the distract rows, the efficacy guard on the rewriting rows and the
        relation term on the relation rows."""
        n_guard = info.n_rewriting + len(self._split_extra(info)[1]) if self.config.guard_weight else 0
        n_rel = self._n_relation_rows
        guarded, now = acts[OUTPUT][:n_guard], acts[OUTPUT][n_guard:]
        if first or self._before_output is None:
            self._before_output = now.detach().clone()
            self.record["output_loss"], self.record["guard_loss"], self.record["relation_loss"] = [], [], []
        new, true = info.target_ids
        relation = torch.zeros((), device=now.device)
        if n_rel:
            rise = now[len(now) - n_rel:, new] - self._before_output[len(now) - n_rel:, new]
            relation = torch.relu(rise).mean()
            now = now[:len(now) - n_rel]
        self.record["relation_loss"].append(relation.item())
        before = self._before_output[:len(now)]
        term = torch.zeros((), device=now.device)
        if self.config.output_weight:
            if self.config.output in ("kl", "both"):
                term = term + (before.exp() * (before - now)).sum(-1).mean()
            margin = self.config.output_margin
            if self.config.output in ("target", "both"):
                term = term + torch.relu(now[:, new] - before[:, new] - margin).mean()
            if self.config.output == "contrast":
                gain = (now[:, new] - now[:, true]) - (before[:, new] - before[:, true])
                term = term + torch.relu(gain - margin).mean()
        self.record["output_loss"].append(term.item())
        guard = torch.zeros((), device=now.device)
        if n_guard:
            guard = torch.relu(self.config.guard_margin - (guarded[:, new] - guarded[:, true])).mean()
        self.record["guard_loss"].append(guard.item())
        return self.config.output_weight * term + self.config.guard_weight * guard + self.config.relation_weight * relation


def _at(rows: Float[Tensor, "prompt layer head key"], position: Int[Tensor, " prompt"]) -> Float[Tensor, "prompt layer head"]:
    index = position.view(-1, 1, 1, 1).expand(-1, rows.shape[1], rows.shape[2], 1)
    return rows.gather(-1, index)[..., 0].clone()


def selection_frequency(records: Sequence[Mapping], n_layers: int, n_heads: int) -> Float[Tensor, "layer head"]:
    """Per head, the fraction of optimisation steps x regularised prompts in which SADR selected
    it, averaged over an edit's requests (``EditResult.sadr_records``); 0 on layers SADR did not
    regularise."""
    total = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    used = 0
    for record in records:
        masks = record.get("mask") or []
        if not len(masks):
            continue
        stacked = torch.stack([torch.as_tensor(m) for m in masks]).to("cpu", torch.float64)
        if stacked.ndim != 4 or stacked.shape[-1] != n_heads:
            raise SADRError(f"SADR masks are {list(stacked.shape)}, expected [step, row, layer, {n_heads}]")
        total[list(record["layers"])] += stacked.mean(dim=(0, 1))
        used += 1
    return total / max(used, 1)

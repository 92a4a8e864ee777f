"""Editor configurations (ROME, MEMIT, PMET, AlphaEdit, FT), their per-model presets, and editing errors.

(The configs of r-ROME and EMMET live in their modules, :mod:`~attention_drift.editing.r_rome`
and :mod:`~attention_drift.editing.emmet`; their presets are built here from the same table.)

Every hyper-parameter of an edit lives in one frozen dataclass, so a result records exactly
what produced it. ``XConfig.for_model(model)`` picks the preset of the model's family and
size; :func:`dataclasses.replace` derives variants (``replace(cfg, steps=40)``).

Presets and where their numbers come from:

* Steps: ROME 20, MEMIT 20, PMET 20, the baselines of the over-attention paper's run
  scripts (``examples/scripts/{rome,memit,pmet}.sh`` of its official code, which override
  the step counts of its hparams files: MEMIT 20 there, PMET 30), so that an editor's
  "+SADR" run differs from its baseline only by SADR and the steps the paper gives SADR
  (:data:`attention_drift.editing.sadr.PUBLISHED`). Exceptions: the Llama-2 / TinyLlama presets
  keep EasyEdit's explicit llama-7b values (ROME and MEMIT 25).
* GPT-2 XL / GPT-J-6B: the published hyper-parameters of the ROME, MEMIT and PMET papers'
  code (ROME: layer 17 / 5, clamp 4; MEMIT: layers 13-17 / 3-8, clamp 0.75, lambda 20000 /
  15000; PMET on GPT-J: layers 3-8, lr 0.2, KL factor 1, lambda 15000 as in the
  EasyEdit configuration the over-attention paper used; the PMET repository's own GPT-J
  file has lambda 6000). GPT-2 medium / large: ROME layers 8 / 12 (EasyEdit). GPT-2 small
  and the MEMIT/PMET ranges of GPT-2 small, medium and large have no published values:
  they are the analogous choice (a range of 3-5 layers ending at the ROME layer).
* Llama-2-7B / Llama-3-8B (32 layers, d_model 4096): EasyEdit's llama-7b files (ROME layer
  5, 25 steps, weight decay 1e-3, no covariance adjustment; MEMIT layers 4-8; PMET layers
  4-8, clamp 1). TinyLlama-1.1B (22 layers) has no published values: it borrows Llama-2's.
* SmolLM2-135M (30 layers, d_model 576): ROME at layer 5, the official baseline's choice,
  checked with ``benchmarks/sweep_edit_layer.py`` (ROME at layers 3, 5, 7 on 4 example
  records, covariance from 300 self-sampled sequences; numbers in that script's docstring):
  layers 3 and 5 tie on efficacy, paraphrase and relation, layer 3 kept neighbourhood
  better on these few prompts; too few records to move away from 5. The other
  values are the ones the paper's official code used on this model (lr 0.5, weight decay
  0.5, clamp 2, KL 0.0625, 20 steps). MEMIT / PMET spread over layers 3-7 (ending two
  layers after the ROME layer, as GPT-J's 3-8 around its layer 5) with lambda 1400:
  GPT-J's 15000 scaled by the key dimension (1536 / 16384), because what one edited key
  weighs against the corpus is ``k^T (lambda C)^-1 k`` and ``k^T C^-1 k`` grows with the
  key dimension (on SmolLM2 it is ~1000-10000 at the subject's last token, median ~1800;
  with lambda 15000 each layer wrote only ~10% of its share and MEMIT reached 40% efficacy
  on 10 development records (5 CounterFact-, 5 WikiData-type); with 1400: efficacy 100,
  paraphrase 86.7, neighbourhood 40.7 (44.4 unedited), relation 33.3 (66.7 unedited)).
* Gemma-3-270M (18 layers, d_model 640): the SmolLM2 choice scaled by depth (ROME layer 3
  = 5/30 of the depth; MEMIT / PMET 2-5, lambda scaled to d_mlp 2048), not swept.

* AlphaEdit: MEMIT's preset of the model for every field the two share (layers, value
  optimisation, templates, statistics), so that AlphaEdit and MEMIT differ only by the
  null-space projection and its regulariser (the authors' AlphaEdit files equal their MEMIT
  files in these fields for GPT-2 XL and GPT-J; their Llama3-8B file has lr 0.1, clamp 0.75,
  where our Llama preset keeps EasyEdit's MEMIT values). Null-space threshold 2e-2 and L2 10:
  the authors' values for all three of their models (``hparams/AlphaEdit/*.json``), in the same
  units as ours (see :class:`AlphaEditConfig`). The tiny random models' keys are far smaller
  (the tiny Llama's key second moment has every eigenvalue below 2e-3, trace 0.02; the tiny
  GPT-2's trace is 1.7), so their wiring presets scale both down: Llama threshold 1e-4 (about
  half the directions null) and L2 1e-4, GPT-2 threshold 2e-2 (~85% null) and L2 1e-2; with
  L2 10 the tiny Llama's update was ~1000 times smaller than MEMIT's.

* FT (FT-L): the authors' ``hparams/FT/*_constr.json`` (GPT-2 medium / large / XL, GPT-J: layer 0,
  lr 5e-4, 25 steps, L-infinity constraint 2e-3 / 1e-3 / 5e-4 / 5e-5); SmolLM2-135M / Gemma-3-270M:
  their ROME layer with GPT-2 medium's values, GPT-2 small: layer 0 with them (analogous, not
  swept); Llama-2 / Llama-3 / TinyLlama: none published, build an :class:`FTConfig`.
* r-ROME: ROME's preset of the model, unchanged (the r-ROME hyper-parameter files equal the
  ROME files except for the key flags), so that r-ROME and ROME differ only by the key.
* EMMET: every released file of the authors edits the ROME layer alone (GPT-J 5, GPT-2 XL 17,
  Llama-2-7B 5) with MEMIT's value optimisation; so every model's EMMET preset is its ROME layer
  with its MEMIT value settings, ``mom2_update_weight`` 1, ``emmet_lambda`` 0.1 (SmolLM2: layer 5,
  not MEMIT's 3-7); GPT-J and GPT-2 XL have the authors' own entries.

Statistics: the offline models' presets use 300 sequences of 128 tokens sampled from the
model itself. The official baseline used 1000, but sampling is the slow part on CPU
(300 sequences and the statistics of 10 layers took 15 minutes on the shared 2-core
machine, so 1000 would take about 50) and ROME's scores did not move between 100 and 300
sequences on 10 development records (``benchmarks/sweep_stats_samples.py``; numbers in
:mod:`~attention_drift.editing.stats`). Hub models default to 100000 samples of wikitext-103
(needs internet and the ``datasets`` package), as the original papers (Wikipedia).
"""

import os
from dataclasses import dataclass, field, fields

from attention_drift.core.models import model_family, n_layers
from attention_drift.core.errors import AttentionDriftError


class EditError(AttentionDriftError):
    """An edit that cannot be done as asked; raised before any weight is touched."""


class ConfigError(EditError):
    """A configuration that does not fit the model (or no preset for it)."""


class RequestError(EditError):
    """An edit request (:class:`~attention_drift.core.data.Rewrite`) that cannot be edited."""


@dataclass(frozen=True)
class StatsConfig:
    """Where the second moment C = E[k k^T] of the MLP keys comes from.

    Args:
        corpus: ``"model"``: text sampled from the model itself (seeded; works offline);
            ``"wikitext"`` / ``"wikipedia"``: the Hugging Face datasets the original methods
            used (needs internet and the ``datasets`` package); or a tuple of local text
            file paths (each blank-line separated paragraph is one sample).
        n_samples: number of sequences the moment is averaged over (every non-padding token
            of every sequence counts once); see :mod:`~attention_drift.editing.stats` for how
            edits depend on it.
        seq_len: tokens per sequence; longer texts are truncated.
        batch_size: sequences per forward pass.
        seed: sampling seed of the ``"model"`` corpus.
    """

    corpus: str | tuple[str, ...] = "model"
    n_samples: int = 300
    seq_len: int = 128
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.corpus, str) and self.corpus not in ("model", "wikitext", "wikipedia"):
            raise ConfigError(
                f"unknown stats corpus {self.corpus!r}: use 'model', 'wikitext', 'wikipedia' or a "
                "tuple of local text file paths"
            )
        if isinstance(self.corpus, tuple) and not self.corpus:
            raise ConfigError("stats corpus is an empty tuple of files; give at least one text file")
        for name in ("n_samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"StatsConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def corpus_key(self) -> str:
        """A file-system safe name of the corpus (part of the statistics cache path)."""
        if isinstance(self.corpus, str):
            seed = f"-seed{self.seed}" if self.corpus == "model" else ""
            return f"{self.corpus}{seed}-len{self.seq_len}"
        import hashlib

        digest = hashlib.sha1()
        for path in self.corpus:
            stat = os.stat(path) if os.path.exists(path) else None
            digest.update(f"{os.path.abspath(path)}|{stat and stat.st_size}|{stat and stat.st_mtime_ns};".encode())
        return f"files-{digest.hexdigest()[:12]}-len{self.seq_len}"


OFFLINE_STATS = StatsConfig()
HUB_STATS = StatsConfig(corpus="wikitext", n_samples=100000, seq_len=128)
TINY_STATS = StatsConfig(n_samples=16, seq_len=32)

ROME_TEMPLATES = ((5, 10), (10, 10))
MEMIT_TEMPLATES = ((10, 5),)


def _check_layers(model, layers: tuple[int, ...], loss_layer: int | None, what: str) -> None:
    total = n_layers(model)
    for layer in layers:
        if not 0 <= layer < total:
            raise ConfigError(
                f"{what} edit layer {layer} is out of range: the model has {total} layers "
                f"(0..{total - 1}); pick a layer inside it"
            )
    if loss_layer is not None:
        if not 0 <= loss_layer < total:
            raise ConfigError(
                f"{what} v_loss_layer {loss_layer} is out of range: the model has {total} layers "
                f"(0..{total - 1}); use None for the last layer"
            )
        if loss_layer < max(layers):
            raise ConfigError(
                f"{what} v_loss_layer {loss_layer} lies below the edit layer {max(layers)}; the loss "
                "must be read at or above the layer where the value is injected"
            )


def _check_common(cfg, what: str) -> None:
    if cfg.steps < 1:
        raise ConfigError(f"{what}.steps must be >= 1, got {cfg.steps}")
    if cfg.lr <= 0:
        raise ConfigError(f"{what}.lr must be > 0, got {cfg.lr}")
    if cfg.clamp_norm_factor <= 0:
        raise ConfigError(f"{what}.clamp_norm_factor must be > 0, got {cfg.clamp_norm_factor}")
    if cfg.weight_decay < 0 or cfg.kl_factor < 0:
        raise ConfigError(f"{what}.weight_decay and kl_factor must be >= 0")
    for length, count in cfg.context_templates:
        if length < 1 or count < 0:
            raise ConfigError(
                f"{what}.context_templates holds (length, count) pairs with length >= 1 and count >= 0; "
                f"got {(length, count)}"
            )


@dataclass(frozen=True)
class ROMEConfig:
    """ROME (Meng et al. 2022): a rank-one update of one MLP output projection.

    Args:
        layer: the edited layer (its MLP output projection is rewritten).
        v_loss_layer: layer whose residual output is read through the final norm and
            unembedding for the target NLL; None: the last layer (the model's logits).
        lr: Adam learning rate of the value delta.
        steps: optimisation steps (forward passes; the last one only evaluates).
        weight_decay: factor of ``||delta|| / ||v_init||^2`` in the loss (the ROME code's form).
        clamp_norm_factor: ``||delta||`` is projected back to ``<= clamp_norm_factor * ||v_init||``.
        kl_factor: factor of the essence KL term on ``"{subject} is a"``.
        early_stop_loss: stop when the total loss falls below this (ROME: 0.05).
        context_templates: ``(length, count)`` pairs: ``count`` texts of ``length`` tokens
            generated by the model are used as prefixes, besides the bare prompt.
        mom2_adjustment: use ``u = C^-1 k*`` (True) or ``u = k*`` (False).
        stats: the covariance statistics.
        template_seed: seed of the prefix generation.
    """

    layer: int
    v_loss_layer: int | None = None
    lr: float = 0.5
    steps: int = 20
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    context_templates: tuple[tuple[int, int], ...] = ROME_TEMPLATES
    mom2_adjustment: bool = True
    stats: StatsConfig = field(default_factory=StatsConfig)
    template_seed: int = 0

    method = "rome"

    def __post_init__(self):
        _check_common(self, "ROMEConfig")

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def check(self, model) -> None:
        """Raise a :class:`ConfigError` when the layers do not exist in ``model``."""
        _check_layers(model, self.layers, self.v_loss_layer, "ROME")

    @classmethod
    def for_model(cls, model) -> "ROMEConfig":
        """The preset for ``model``'s family and size (see the module docstring)."""
        return _preset(model, cls)


@dataclass(frozen=True)
class MEMITConfig:
    """MEMIT (Meng et al. 2023): least-squares updates spread over a range of MLP layers.

    Args:
        layers: the edited layers, increasing; the target vectors z are optimised at the
            residual output of the last one.
        v_loss_layer: as :class:`ROMEConfig`.
        steps: optimisation steps; 20, as the over-attention paper's run script
            (``examples/scripts/memit.sh``: 20 with and without SADR; the MEMIT repository's
            GPT-J file has 25), so that a MEMIT+SADR run differs from plain MEMIT only by SADR.
        lr, weight_decay, clamp_norm_factor, kl_factor, early_stop_loss: as
            :class:`ROMEConfig` (the clamp is relative to the residual norm at the z layer).
        mom2_update_weight: lambda in ``(lambda C + K K^T)^-1``; C is a mean over tokens, so
            lambda is the number of corpus tokens one edited key weighs against.
        context_templates: as :class:`ROMEConfig` (MEMIT: 5 texts of 10 tokens); keys are
            the mean of the bare-prompt key and the mean over the prefixed ones.
        stats, template_seed: as :class:`ROMEConfig`.
    """

    layers: tuple[int, ...]
    v_loss_layer: int | None = None
    lr: float = 0.5
    steps: int = 20
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    mom2_update_weight: float = 15000.0
    context_templates: tuple[tuple[int, int], ...] = MEMIT_TEMPLATES
    stats: StatsConfig = field(default_factory=StatsConfig)
    template_seed: int = 0

    method = "memit"

    def __post_init__(self):
        _check_common(self, "MEMITConfig")
        _check_range(self.layers, "MEMITConfig")
        if self.mom2_update_weight <= 0:
            raise ConfigError(f"MEMITConfig.mom2_update_weight must be > 0, got {self.mom2_update_weight}")

    def check(self, model) -> None:
        """Raise a :class:`ConfigError` when the layers do not exist in ``model``."""
        _check_layers(model, self.layers, self.v_loss_layer, "MEMIT")

    @classmethod
    def for_model(cls, model) -> "MEMITConfig":
        """The preset for ``model``'s family and size (see the module docstring)."""
        return _preset(model, cls)


@dataclass(frozen=True)
class PMETConfig:
    """PMET (Li et al. 2024): MEMIT-style updates from jointly optimised attention and MLP values.

    Args:
        layers: the edited MLP layers, increasing; attention and MLP output deltas are
            optimised at the last one.
        steps: optimisation steps; 20, as the over-attention paper's run script for plain
            PMET (``examples/scripts/pmet.sh``: 20, and 40 with SADR, overriding the 30 of its
            GPT-J file, which is EasyEdit's), so that PMET+SADR differs from plain PMET only by
            SADR and the steps the paper gives it.
        v_loss_layer, lr, weight_decay, clamp_norm_factor, kl_factor, early_stop_loss,
            mom2_update_weight, context_templates, stats, template_seed: as
            :class:`MEMITConfig` (the clamp and weight decay apply to each delta relative to
            its own initial value).
        nll_factor: factor of the target NLL; PMET divides it by 10 while the target is the
            argmax at every target position, and stops once the KL term is <= 0.01 then.
    """

    layers: tuple[int, ...]
    v_loss_layer: int | None = None
    lr: float = 0.2
    steps: int = 20
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 1.0
    early_stop_loss: float = 0.05
    nll_factor: float = 1.0
    mom2_update_weight: float = 15000.0
    context_templates: tuple[tuple[int, int], ...] = MEMIT_TEMPLATES
    stats: StatsConfig = field(default_factory=StatsConfig)
    template_seed: int = 0

    method = "pmet"

    def __post_init__(self):
        _check_common(self, "PMETConfig")
        _check_range(self.layers, "PMETConfig")
        if self.mom2_update_weight <= 0:
            raise ConfigError(f"PMETConfig.mom2_update_weight must be > 0, got {self.mom2_update_weight}")

    def check(self, model) -> None:
        """Raise a :class:`ConfigError` when the layers do not exist in ``model``."""
        _check_layers(model, self.layers, self.v_loss_layer, "PMET")

    @classmethod
    def for_model(cls, model) -> "PMETConfig":
        """The preset for ``model``'s family and size (see the module docstring)."""
        return _preset(model, cls)


@dataclass(frozen=True)
class AlphaEditConfig:
    """AlphaEdit (Fang et al. 2025): MEMIT's update projected onto the null space of the preserved keys.

    Args:
        layers, v_loss_layer, lr, steps, weight_decay, clamp_norm_factor, kl_factor,
            early_stop_loss, context_templates, stats, template_seed: as :class:`MEMITConfig`
            (the value optimisation is MEMIT's).
        nullspace_threshold: eigenvalues of the key second moment ``C = E[k k^T]`` below this
            span the null space the update is projected onto (``P = U_hat U_hat^T``). The
            authors threshold the singular values of ``mom2.moment()``, which is the raw sum of
            ``k k^T`` divided by the token count: the same per-token mean as our ``C``, so their
            value applies unchanged (2e-2 in every released AlphaEdit file; it is an absolute
            scale of the model's keys: on SmolLM2-135M with the 300-sequence statistics it
            leaves 1052-1325 of the 1536 directions of layers 3-7 in the null space). On 3
            CounterFact development records of SmolLM2 (single edits, MEMIT's preset otherwise)
            2e-2 and 1e-2 kept efficacy 3/3, 5e-3 dropped it to 1/3; none of them moved the
            statistics' keys' outputs less than MEMIT (lambda 1400) per unit of change on the
            edited key: MEMIT's ``C^-1`` already puts its update in the low-variance directions.
        l2: the ridge term ``L2 * I`` of the update (the authors' ``L2``, 10), in the units of
            ``K K^T`` (a sum over the batch's keys, not a mean).
    """

    layers: tuple[int, ...]
    v_loss_layer: int | None = None
    lr: float = 0.5
    steps: int = 20
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    nullspace_threshold: float = 2e-2
    l2: float = 10.0
    context_templates: tuple[tuple[int, int], ...] = MEMIT_TEMPLATES
    stats: StatsConfig = field(default_factory=StatsConfig)
    template_seed: int = 0

    method = "alphaedit"

    def __post_init__(self):
        _check_common(self, "AlphaEditConfig")
        _check_range(self.layers, "AlphaEditConfig")
        if not self.nullspace_threshold > 0:
            raise ConfigError(
                f"AlphaEditConfig.nullspace_threshold must be > 0, got {self.nullspace_threshold}: it is the "
                "eigenvalue of C = E[k k^T] below which a direction counts as null (the authors use 2e-2)"
            )
        if not self.l2 > 0:
            raise ConfigError(
                f"AlphaEditConfig.l2 must be > 0, got {self.l2}: without the ridge term the projected system "
                "is singular (the authors use 10)"
            )

    def check(self, model) -> None:
        """Raise a :class:`ConfigError` when the layers do not exist in ``model``."""
        _check_layers(model, self.layers, self.v_loss_layer, "AlphaEdit")

    @classmethod
    def for_model(cls, model) -> "AlphaEditConfig":
        """The preset for ``model``'s family and size (see the module docstring)."""
        return _preset(model, cls)


@dataclass(frozen=True)
class FTConfig:
    """FT-L (the ROME paper's constrained fine-tuning baseline): Adam on one MLP output projection.

    Args:
        layer: the layer whose MLP output projection is fine-tuned.
        lr: Adam learning rate (the authors' 5e-4 in every FT file).
        steps: optimisation steps at most, each a forward, a backward and an update (the
            authors' ``num_steps``, 25).
        norm_constraint: after every update each weight is clamped into
            ``[W0 - norm_constraint, W0 + norm_constraint]`` (an L-infinity ball around the
            weights before the edit; the authors' ``norm_constraint``); None: unconstrained
            fine-tuning (their ``*_unconstr.json`` files, ``false`` there).
        early_stop_loss: stop, without updating, as soon as the loss is below this (the
            authors' 1e-2).
    """

    layer: int
    lr: float = 5e-4
    steps: int = 25
    norm_constraint: float | None = 5e-4
    early_stop_loss: float = 1e-2

    method = "ft"
    clamp_field = "norm_constraint"  # what SADR's clamp_scale and the verify fallback's doubled clamp scale

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"FTConfig.steps must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise ConfigError(f"FTConfig.lr must be > 0, got {self.lr}")
        if self.norm_constraint is not None and not self.norm_constraint > 0:
            raise ConfigError(
                f"FTConfig.norm_constraint must be > 0 (the L-infinity radius around the original weights) or "
                f"None (unconstrained), got {self.norm_constraint}"
            )

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def check(self, model) -> None:
        """Raise a :class:`ConfigError` when the layer does not exist in ``model``."""
        _check_layers(model, self.layers, None, "FT")

    @classmethod
    def for_model(cls, model) -> "FTConfig":
        """The preset for ``model``'s family and size (see the module docstring)."""
        return _preset(model, cls)


EditConfig = ROMEConfig | MEMITConfig | PMETConfig | AlphaEditConfig | FTConfig
"""The built-in editors' configs; any registered editor's config follows
:class:`~attention_drift.editing.registry.EditorConfig`."""


def _check_range(layers: tuple[int, ...], what: str) -> None:
    if not layers:
        raise ConfigError(f"{what}.layers is empty; give at least one layer")
    if list(layers) != sorted(set(layers)):
        raise ConfigError(f"{what}.layers must be strictly increasing without repeats, got {layers}")


def _span(first: int, last: int) -> tuple[int, ...]:
    return tuple(range(first, last + 1))


# (family, n_layers, d_model or None) -> per-method keyword arguments.
_PRESETS: dict[tuple[str, int, int | None], dict[str, dict]] = {
    ("llama", 30, 576): {  # SmolLM2-135M
        "rome": dict(layer=5, lr=0.5, steps=20, weight_decay=0.5, clamp_norm_factor=2.0, kl_factor=0.0625),
        "memit": dict(layers=_span(3, 7), mom2_update_weight=1400.0),
        "pmet": dict(layers=_span(3, 7), mom2_update_weight=1400.0),
        "ft": dict(layer=5, norm_constraint=2e-3),
        "stats": OFFLINE_STATS,
    },
    ("llama", 2, 64): {  # models.tiny_model("llama"): cheap settings for tests of the wiring, not of editing
        "rome": dict(layer=0, steps=5),
        "memit": dict(layers=(0, 1), steps=5),
        "pmet": dict(layers=(0, 1), steps=5),
        "alphaedit": dict(layers=(0, 1), steps=5, nullspace_threshold=1e-4, l2=1e-4),
        "ft": dict(layer=0, steps=5, norm_constraint=2e-3),
        "stats": TINY_STATS,
    },
    ("gpt2", 2, 64): {  # models.tiny_model("gpt2")
        "rome": dict(layer=0, steps=5),
        "memit": dict(layers=(0, 1), steps=5),
        "pmet": dict(layers=(0, 1), steps=5),
        "alphaedit": dict(layers=(0, 1), steps=5, l2=1e-2),
        "ft": dict(layer=0, steps=5, norm_constraint=2e-3),
        "stats": TINY_STATS,
    },
    ("gemma3_text", 18, 640): {  # Gemma-3-270M
        "rome": dict(layer=3, lr=0.5, steps=20, weight_decay=0.5, clamp_norm_factor=2.0, kl_factor=0.0625),
        "memit": dict(layers=_span(2, 5), mom2_update_weight=1900.0),
        "pmet": dict(layers=_span(2, 5), mom2_update_weight=1900.0),
        "ft": dict(layer=3, norm_constraint=2e-3),
        "stats": OFFLINE_STATS,
    },
    ("llama", 22, 2048): {  # TinyLlama-1.1B: borrows Llama-2-7B's values
        "rome": dict(layer=5, steps=25, weight_decay=1e-3, clamp_norm_factor=4.0, mom2_adjustment=False),
        "memit": dict(layers=_span(4, 8), steps=25, weight_decay=1e-3, clamp_norm_factor=4.0),
        "pmet": dict(layers=_span(4, 8), steps=20, lr=0.5, clamp_norm_factor=1.0, kl_factor=0.0625),
        "stats": HUB_STATS,
    },
    ("llama", 32, 4096): {  # Llama-2-7B / Llama-3-8B (EasyEdit llama-7b)
        "rome": dict(layer=5, steps=25, weight_decay=1e-3, clamp_norm_factor=4.0, mom2_adjustment=False),
        "memit": dict(layers=_span(4, 8), steps=25, weight_decay=1e-3, clamp_norm_factor=4.0),
        "pmet": dict(layers=_span(4, 8), steps=20, lr=0.5, clamp_norm_factor=1.0, kl_factor=0.0625),
        "stats": HUB_STATS,
    },
    ("gptj", 28, None): {  # GPT-J-6B
        "rome": dict(layer=5, clamp_norm_factor=4.0),
        "memit": dict(layers=_span(3, 8)),
        "pmet": dict(layers=_span(3, 8)),
        "ft": dict(layer=0, norm_constraint=5e-5),
        "emmet": dict(layers=(5,), steps=25),  # the authors' hparams/EMMET/EleutherAI_gpt-j-6B.json
        "stats": HUB_STATS,
    },
    ("gpt2", 12, None): {  # GPT-2 small (analogous choice)
        "rome": dict(layer=5, clamp_norm_factor=4.0),
        "memit": dict(layers=_span(3, 5), steps=20),
        "pmet": dict(layers=_span(3, 5)),
        "ft": dict(layer=0, norm_constraint=2e-3),
        "stats": HUB_STATS,
    },
    ("gpt2", 24, None): {  # GPT-2 medium
        "rome": dict(layer=8, clamp_norm_factor=3.0),
        "memit": dict(layers=_span(4, 8), steps=20, mom2_update_weight=20000.0),
        "pmet": dict(layers=_span(4, 8)),
        "ft": dict(layer=0, norm_constraint=2e-3),
        "stats": HUB_STATS,
    },
    ("gpt2", 36, None): {  # GPT-2 large
        "rome": dict(layer=12, clamp_norm_factor=4.0),
        "memit": dict(layers=_span(8, 12), steps=20, mom2_update_weight=20000.0),
        "pmet": dict(layers=_span(8, 12)),
        "ft": dict(layer=0, norm_constraint=1e-3),
        "stats": HUB_STATS,
    },
    ("gpt2", 48, None): {  # GPT-2 XL
        "rome": dict(layer=17, clamp_norm_factor=4.0),
        "memit": dict(layers=_span(13, 17), steps=20, mom2_update_weight=20000.0),
        "pmet": dict(layers=_span(13, 17)),
        "ft": dict(layer=0, norm_constraint=5e-4),
        "emmet": dict(layers=(17,), steps=20, mom2_update_weight=1000.0),  # the authors' hparams/EMMET/gpt2-xl.json
        "stats": HUB_STATS,
    },
}


def _preset(model, cls):
    method = cls.method
    family, depth = model_family(model), n_layers(model)
    d_model = int(model.cfg.d_model)
    entry = _PRESETS.get((family, depth, d_model)) or _PRESETS.get((family, depth, None))
    if entry is None:
        known = ", ".join(
            f"{fam} ({layers} layers{'' if d is None else f', d_model {d}'})" for fam, layers, d in _PRESETS
        )
        example = "layer=..." if method == "rome" else "layers=(..., ...)"
        raise ConfigError(
            f"no {method.upper()} preset for model family {family!r} with {depth} layers and d_model "
            f"{d_model}. Build a config yourself, e.g. attention_drift.editing.{cls.__name__}({example}) (pick the "
            f"layer with benchmarks/sweep_edit_layer.py, or a causal trace); presets exist for: {known}"
        )
    kwargs = entry[method] if method in entry else _borrowed(method, entry)
    if kwargs is None:
        raise ConfigError(f"no {method.upper()} preset for model family {family!r} with {depth} layers and d_model "
                          f"{d_model} (no published values); build a config yourself, e.g. "
                          f"attention_drift.editing.{cls.__name__}(layer=...)")
    if any(f.name == "stats" for f in fields(cls)):
        kwargs = {**kwargs, "stats": entry["stats"]}
    return cls(**kwargs)


def _borrowed(method: str, entry: dict[str, dict]) -> dict | None:
    """The preset of an editor without an entry of its own, from the editors it builds on (None: none)."""
    if method == "alphaedit":  # MEMIT's preset less its covariance weight
        return {k: v for k, v in entry["memit"].items() if k != "mom2_update_weight"}
    if method == "r-rome":  # ROME's preset
        return dict(entry["rome"])
    if method == "emmet":  # the ROME layer alone, MEMIT's value optimisation (see emmet.py)
        shared = {k: v for k, v in entry["memit"].items() if k not in ("layers", "mom2_update_weight")}
        return {**shared, "layers": (entry["rome"]["layer"],)}
    return None

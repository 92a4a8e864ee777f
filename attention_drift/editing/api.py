"""One entry point for every editor: ``edit`` (a context manager) and ``apply_edit``.

    with attention_drift.edit(model, record.rewrite, method="rome") as result:
        ...  # the model is edited here
    # the original weights are back, bit for bit, also if the block raised

Everything that can be wrong with a request or a configuration is checked before any
weight is touched; the covariance statistics and context templates are prepared before
too. The exact original tensors of every parameter an editor will change are cloned first
and copied back by :meth:`EditResult.restore` (and on any failure during the edit).
"""

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attention_drift import tokens
from attention_drift.data import Rewrite
from attention_drift.editing import memit, pmet, rome
from attention_drift.editing.config import (
    CONFIG_TYPES,
    ConfigError,
    EditConfig,
    EditError,
    RequestError,
)
from attention_drift.editing.optimize import ExtraLoss, OptimizationTrace
from attention_drift.editing.stats import inverse_second_moment, key_second_moments
from attention_drift.editing.templates import context_templates
from attention_drift.models import mlp_out_weight, on_model_device
from attention_drift.sadr import SADRConfig, SADRLoss
from attention_drift.hooks import mlp_weight_name

METHODS = tuple(CONFIG_TYPES)


@dataclass
class EditResult:
    """What an edit did, and the means to undo it.

    Attributes:
        method: ``"rome"``, ``"memit"`` or ``"pmet"``.
        requests: the edited requests.
        config: the configuration used.
        layers: the layers whose MLP output projection changed.
        deltas: ``{"blocks.L.mlp.out.weight": new - original}`` in the parameter's layout.
        traces: one :class:`~attention_drift.editing.optimize.OptimizationTrace` per request.
        seconds: wall time of the edit (statistics and templates included).
        sadr: the SADR configuration used, or None.
        restored: whether :meth:`restore` has put the original weights back.
    """

    method: str
    requests: tuple[Rewrite, ...]
    config: EditConfig
    layers: tuple[int, ...]
    deltas: dict[str, Tensor]
    traces: list[OptimizationTrace]
    seconds: float
    sadr: SADRConfig | None = None
    restored: bool = False
    _params: dict[str, torch.nn.Parameter] = field(default_factory=dict, repr=False)
    _originals: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def loss_trace(self) -> list[list[float]]:
        """Total loss per optimisation step, per request."""
        return [t.loss for t in self.traces]

    @property
    def extra_trace(self) -> dict[str, list[list[float]]]:
        """``{term name: per request, the term's value per step}`` of the extra loss terms."""
        names = dict.fromkeys(n for t in self.traces for n in t.extra)
        return {n: [t.extra.get(n, []) for t in self.traces] for n in names}

    @property
    def sadr_records(self) -> list[dict]:
        """Per request, what SADR recorded (see :class:`~attention_drift.sadr.SADRLoss`):
        selected-head masks and loss per step, subject attention before / after."""
        return [t.records.get("sadr", {}) for t in self.traces]

    def restore(self) -> None:
        """Copy the original weights back (bitwise). Calling it again does nothing."""
        if self.restored:
            return
        with torch.no_grad():
            for name, param in self._params.items():
                param.copy_(self._originals[name])
        self.restored = True

    def __enter__(self) -> "EditResult":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


class EditContext:
    """Context manager returned by :func:`edit`: edits on entry, restores on exit."""

    def __init__(self, model, requests, method: str, config: EditConfig | None, sadr, extra_losses: Sequence[ExtraLoss]):
        self._args = (model, requests, method, config, sadr, tuple(extra_losses))
        self.result: EditResult | None = None

    def __enter__(self) -> EditResult:
        model, requests, method, config, sadr, extra = self._args
        self.result = apply_edit(model, requests, method, config, sadr=sadr, extra_losses=extra)
        return self.result

    def __exit__(self, *exc) -> None:
        if self.result is not None:
            self.result.restore()


def edit(
    model,
    requests: Rewrite | Sequence,
    method: str = "rome",
    config: EditConfig | None = None,
    sadr: SADRConfig | None = None,
    *,
    extra_losses: Sequence[ExtraLoss] = (),
) -> EditContext:
    """``with edit(model, rewrite, method="rome") as result:`` the model is edited inside the block.

    ``config=None`` uses ``XConfig.for_model(model)``. ``sadr`` (a
    :class:`~attention_drift.sadr.SADRConfig`) adds the SADR regulariser to the value
    optimisation, with its step count if it sets one; ``extra_losses`` adds any other
    terms. On exit the original weights are restored exactly, even when the block raises.
    """
    _check_sadr(sadr)
    return EditContext(model, requests, method, config, sadr, tuple(extra_losses))


def _check_sadr(sadr) -> None:
    if sadr is not None and not isinstance(sadr, SADRConfig):
        raise EditError(
            f"sadr must be None or an attention_drift.SADRConfig, got {type(sadr).__name__}; "
            "pass other loss terms through extra_losses="
        )


def apply_edit(
    model,
    requests: Rewrite | Sequence,
    method: str = "rome",
    config: EditConfig | None = None,
    *,
    sadr: SADRConfig | None = None,
    extra_losses: Sequence[ExtraLoss] = (),
    progress: bool = True,
) -> EditResult:
    """Edit ``model`` in place and return the :class:`EditResult` (call ``.restore()`` to undo).

    ROME applies several requests one after the other; MEMIT and PMET insert them as one
    batch. ``sadr`` as in :func:`edit`. ``progress`` shows bars while statistics are
    computed (once per model, layer and corpus; cached on disk). Works on whatever device
    the model is on.
    """
    with on_model_device(model):
        return _apply_edit(model, requests, method, config, sadr, extra_losses, progress)


def _apply_edit(model, requests, method, config, sadr, extra_losses, progress) -> EditResult:
    start = time.perf_counter()
    reqs = _requests(requests)
    _check_sadr(sadr)
    config = _config(model, method, config)
    if sadr is not None:
        if sadr.steps is not None:
            config = dataclasses.replace(config, steps=sadr.steps)
        if sadr.layers is not None and any(not 0 <= l < model.cfg.n_layers for l in sadr.layers):
            raise EditError(f"SADR layers {sadr.layers} are out of range: the model has layers 0..{model.cfg.n_layers - 1}")
        extra_losses = (*extra_losses, SADRLoss(sadr))
    for request in reqs:
        check_request(model, request)
    for term in extra_losses:
        if not isinstance(term, ExtraLoss):
            raise EditError(f"extra_losses must hold ExtraLoss terms (name, hook_names, __call__); got {term!r}")
    names = [t.name for t in extra_losses]
    if len(set(names)) != len(names):
        raise EditError(f"extra loss names must be unique, got {names}")

    groups = context_templates(model, config.context_templates, config.template_seed)
    if method == "rome":
        inverse = None
        if config.mom2_adjustment:
            c_inv = inverse_second_moment(model, config.layer, config.stats, progress=progress)
            inverse = lambda k: c_inv @ k  # noqa: E731
        covs = {}
    else:
        covs = key_second_moments(model, config.layers, config.stats, progress=progress)

    params = {mlp_weight_name(l): mlp_out_weight(model, l) for l in config.layers}
    originals = {name: p.detach().clone() for name, p in params.items()}

    def apply(name: str, upd: Tensor) -> None:
        with torch.no_grad():
            params[name].add_(upd)

    try:
        if method == "rome":
            flat = [t for g in groups for t in g]
            traces = rome.execute(model, reqs, config, flat, inverse, apply, extra_losses)
        elif method == "memit":
            traces = memit.execute(model, reqs, config, groups, covs, apply, extra_losses)
        else:
            traces = pmet.execute(model, reqs, config, groups, covs, apply, extra_losses)
    except BaseException:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(originals[name])
        raise
    deltas = {name: (p.detach() - originals[name]) for name, p in params.items()}
    return EditResult(
        method, reqs, config, tuple(config.layers), deltas, traces, time.perf_counter() - start,
        sadr=sadr, _params=params, _originals=originals,
    )


def _requests(requests) -> tuple[Rewrite, ...]:
    if isinstance(requests, Rewrite):
        return (requests,)
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence):
        raise RequestError(
            f"requests must be a Rewrite or a sequence of Rewrite objects, got {type(requests).__name__}; "
            "use record.rewrite for a loaded Record"
        )
    reqs = tuple(requests)
    if not reqs:
        raise RequestError("no edit requests given; pass a Rewrite or a non-empty list of them")
    for r in reqs:
        if not isinstance(r, Rewrite):
            raise RequestError(f"every request must be a Rewrite, got {type(r).__name__}; use record.rewrite")
    return reqs


def _config(model, method: str, config: EditConfig | None) -> EditConfig:
    if method not in CONFIG_TYPES:
        raise ConfigError(f"unknown editing method {method!r}; choose one of {', '.join(METHODS)}")
    cls = CONFIG_TYPES[method]
    if config is None:
        config = cls.for_model(model)
    elif not isinstance(config, cls):
        raise ConfigError(
            f"method {method!r} needs a {cls.__name__}, got a {type(config).__name__}; pass the matching "
            f"config or method={getattr(config, 'method', '?')!r}"
        )
    config.check(model)
    return config


def check_request(model, request: Rewrite) -> None:
    """Raise a :class:`RequestError` for a request that cannot be edited (no weight is touched)."""
    where = f"edit request {request.prompt!r} -> {request.target_new!r}"
    if not request.subject.strip():
        raise RequestError(f"{where}: the subject is empty; give the subject's text as it appears in the prompt")
    if request.subject not in request.prompt:
        raise RequestError(
            f"{where}: subject {request.subject!r} does not occur in the prompt; the prompt must contain the "
            "subject exactly as written (case and spacing included)"
        )
    try:
        spans = tokens.subject_spans(model, request.prompt, request.subject)
    except ValueError as err:
        raise RequestError(f"{where}: {err}") from None
    if not spans:
        raise RequestError(f"{where}: subject {request.subject!r} tokenises to nothing; give a subject with text")
    if not request.target_new.strip():
        raise RequestError(f"{where}: target_new is empty; give the new answer's text")
    try:
        _, target_ids = tokens.continuation_ids(model, request.prompt, request.target_new)
    except ValueError as err:
        raise RequestError(f"{where}: {err}") from None
    if not target_ids:
        raise RequestError(f"{where}: target_new {request.target_new!r} tokenises to nothing")

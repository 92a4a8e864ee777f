"""One entry point for every editor: ``edit`` (a context manager) and ``apply_edit``.

    with attention_drift.edit(model, record.rewrite, method="rome") as result:
        ...  # the model is edited here
    # the original weights are back, bit for bit, also if the block raised
    with result:
        ...  # the same edit again, bit for bit, without recomputing it

A stateful editor (AlphaEdit: the keys of earlier edits) takes its state as ``state=`` and
hands the state after the edit back as ``EditResult.state``, for the next edit of a sequence.

Everything that can be wrong with a request or a configuration is checked before any
weight is touched; the editor's preparation (covariance statistics, context templates) runs
before too. The editor is looked up in :data:`~attention_drift.editing.registry.EDITORS`.
The exact original tensors of every parameter an editor may change are cloned first, and
every update the editor adds is recorded in order: :meth:`EditResult.restore` copies the
originals back, :meth:`EditResult.apply` replays the updates (the same additions on the
same tensors, so the weights are bitwise those of the first edit), and
:meth:`EditResult.save` / :meth:`EditResult.load` keep them on disk (see
:mod:`~attention_drift.editing.cache`).
"""

import dataclasses
import os
import time
import typing
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from attention_drift.core import tokens
from attention_drift.core.data import Rewrite
from attention_drift.editing.config import EditError, RequestError
from attention_drift.editing.identity import FORMAT_VERSION, model_identity, resolved_key, weights_fingerprint
from attention_drift.editing.optimize import ExtraLoss, OptimizationTrace, step_progress
from attention_drift.editing.registry import CONFIG_TYPES, METHODS, EditorConfig, clamp_field, get_editor, resolve_edit
from attention_drift.core.hooks import mlp_weight_name
from attention_drift.core.models import mlp_out_weight, on_model_device, save_hf_folder
from attention_drift.core.paths import write_atomically
from attention_drift.editing.sadr import SADRConfig, SADRLoss

__all__ = ["CONFIG_TYPES", "METHODS", "EditContext", "EditResult", "apply_edit", "check_request", "edit"]


@dataclass
class EditResult:
    """What an edit did, and the means to undo and redo it.

    ``with result:`` applies the edit if it is restored and restores it on exit, so a result
    can be entered again and again. Re-applying replays the recorded updates on the exact
    original weights, so the edited weights are bitwise those of the first application.

    Attributes:
        method: the editor's name (``"rome"``, ``"memit"``, ``"pmet"``, ``"alphaedit"``, ``"ft"`` or a
            registered one).
        requests: the edited requests.
        config: the configuration used (every default resolved; SADR's steps applied).
        layers: the layers whose MLP output projection the edit may change.
        deltas: ``{"blocks.L.mlp.out.weight": new - original}`` in the parameter's layout.
        traces: one :class:`~attention_drift.editing.optimize.OptimizationTrace` per request.
        seconds: wall time of the edit (preparation included; for a loaded result, of the
            edit that produced it).
        sadr: the SADR configuration used (weight and steps resolved), or None.
        fallback: with ``sadr.verify``, which of :data:`FALLBACKS` was kept because the edit with
            SADR did not make a request's new target win on its prompt; None: the SADR edit.
        restored: whether the original weights are in the model now.
        key: :func:`~attention_drift.editing.identity.edit_key` of the configuration; None
            when extra loss terms or a ``state`` took part (they are not part of a key).
        state: a stateful editor's state after this edit (e.g. AlphaEdit's
            :class:`~attention_drift.editing.alphaedit.PreviousKeys` with this edit's keys
            added), to pass as ``state=`` to the next edit of a sequence; None for the others.
    """

    method: str
    requests: tuple[Rewrite, ...]
    config: EditorConfig
    layers: tuple[int, ...]
    deltas: dict[str, Tensor]
    traces: list[OptimizationTrace]
    seconds: float
    sadr: SADRConfig | None = None
    restored: bool = False
    key: str | None = None
    fallback: str | None = None
    state: typing.Any = None
    _params: dict[str, torch.nn.Parameter] = field(default_factory=dict, repr=False)
    _originals: dict[str, Tensor] = field(default_factory=dict, repr=False)
    _updates: list[tuple[str, Tensor]] = field(default_factory=list, repr=False)
    _model: dict = field(default_factory=dict, repr=False)
    _owner: typing.Any = field(default=None, repr=False, compare=False)

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
        """Per request, what SADR recorded (see :class:`~attention_drift.editing.sadr.SADRLoss`):
        selected-head masks and loss per step, subject attention before / after."""
        return [t.records.get("sadr", {}) for t in self.traces]

    @property
    def updates(self) -> tuple[tuple[str, Tensor], ...]:
        """The ``(parameter name, update)`` additions the editor made, in order."""
        return tuple(self._updates)

    def restore(self) -> None:
        """Copy the original weights back (bitwise). Calling it again does nothing."""
        if self.restored:
            return
        with torch.no_grad():
            for name, param in self._params.items():
                param.copy_(self._originals[name])
        self.restored = True

    def apply(self) -> None:
        """Put the edit back after :meth:`restore`: the weights become bitwise those of the
        first application. Does nothing while applied; raises an :class:`EditError` when the
        parameters no longer hold the original weights (another edit changed them)."""
        if not self.restored:
            return
        changed = [n for n, p in self._params.items() if not torch.equal(p.detach(), self._originals[n])]
        if changed:
            raise EditError(
                f"cannot re-apply the {self.method} edit: {', '.join(changed)} no longer hold the weights it "
                "was made on (restore the other edit first)"
            )
        with torch.no_grad():
            for name, upd in self._updates:
                self._params[name].add_(upd)
        self.restored = False

    def __enter__(self) -> "EditResult":
        self.apply()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the updates and what produced them to ``path`` (a ``torch.save`` file that
        loads with ``weights_only=True``); :meth:`load` replays them. Returns the path."""
        path = Path(path)
        data = {
            "format": FORMAT_VERSION,
            "key": self.key,
            "model": self._model,
            "method": self.method,
            "config": _fields(self.config),
            "sadr": None if self.sadr is None else _fields(self.sadr),
            "requests": [dataclasses.asdict(r) for r in self.requests],
            "layers": list(self.layers),
            "seconds": self.seconds,
            "fallback": self.fallback,
            "originals": weights_fingerprint(self._originals),
            "updates": [(name, upd.detach().cpu().clone()) for name, upd in self._updates],
            "traces": [_portable(dataclasses.asdict(t), f"trace {i}") for i, t in enumerate(self.traces)],
            "state": None if self.state is None else _portable(
                {f.name: getattr(self.state, f.name) for f in dataclasses.fields(self.state)}, "state"),
        }
        return write_atomically(path, lambda tmp: torch.save(data, tmp))

    def save_pretrained(self, path: str | os.PathLike, model=None) -> Path:
        """Write the edited model as a Hugging Face folder (``model.safetensors``, config, tokenizer)
        that ``from_pretrained``, :func:`~attention_drift.core.models.load_model` and
        ``attention-drift drift --edited`` read, to hand the edit to others. Returns the folder.

        ``model``: the bridge the edit was made on or loaded for (default: that one, while it is
        alive). A restored edit is applied for the writing and restored after (bitwise); an
        applied one stays applied.
        """
        model = model if model is not None else (self._owner() if self._owner is not None else None)
        if model is None:
            raise EditError("save_pretrained needs the model the edit was made on: pass model=")
        held = {id(p) for p in model.parameters()}
        if any(id(p) not in held for p in self._params.values()):
            raise EditError(f"the {self.method} edit was made on another model than the one given to save_pretrained")
        applied_here = self.restored
        if applied_here:
            self.apply()
        try:
            return save_hf_folder(model, path)
        finally:
            if applied_here:
                self.restore()

    @classmethod
    def load(cls, path: str | os.PathLike, model) -> "EditResult":
        """The edit saved at ``path``, ready for ``model`` and restored (``with result:`` or
        :meth:`apply` puts it in). Raises an :class:`EditError` when the file was written by
        another format version, for another model, or on other weights than ``model`` holds."""
        path = Path(path)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as err:
            raise EditError(f"cannot read the saved edit {path}: {err}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise EditError(f"{path} holds saved-edit format {found!r}, this version reads {FORMAT_VERSION}; edit again")
        identity = model_identity(model)
        mismatch = {k: (v, identity.get(k)) for k, v in data["model"].items() if k != "device" and identity.get(k) != v}
        if mismatch:
            raise EditError(f"{path} was saved for another model: {', '.join(f'{k} {a!r} != {b!r}' for k, (a, b) in mismatch.items())}")
        editor = get_editor(data["method"])
        config = _rebuild(editor.config_type, data["config"])
        sadr = None if data["sadr"] is None else _rebuild(SADRConfig, data["sadr"])
        layers = tuple(data["layers"])
        with on_model_device(model):
            params = _parameters(model, layers)
            originals = {name: p.detach().clone() for name, p in params.items()}
            if weights_fingerprint(originals) != data["originals"]:
                raise EditError(
                    f"{path} was made on other weights of {', '.join(params)} than the model holds now "
                    "(is another edit applied, or is it another checkpoint?)"
                )
            updates = [(name, upd.to(params[name].device)) for name, upd in data["updates"]]
            edited = {name: o.clone() for name, o in originals.items()}
            for name, upd in updates:
                edited[name].add_(upd)
            deltas = {name: edited[name] - originals[name] for name in params}
        traces = [_trace(t) for t in data["traces"]]
        state = data.get("state")
        if state is not None:
            if editor.state_type is None:
                raise EditError(f"{path} holds a state, but editor {editor.name!r} keeps none")
            state = editor.state_type(**state)
        return cls(
            data["method"], tuple(Rewrite(**r) for r in data["requests"]), config, layers, deltas, traces,
            data["seconds"], sadr=sadr, restored=True, key=data["key"], fallback=data.get("fallback"),
            state=state, _params=params, _originals=originals,
            _updates=updates, _model=identity, _owner=weakref.ref(model),
        )


class EditContext:
    """Context manager returned by :func:`edit`: edits on entry, restores on exit."""

    def __init__(self, model, requests, method: str, config: EditorConfig | None, sadr, extra_losses: Sequence[ExtraLoss],
                 progress: bool = True, state=None):
        self._args = (model, requests, method, config, sadr, tuple(extra_losses), progress, state)
        self.result: EditResult | None = None

    def __enter__(self) -> EditResult:
        model, requests, method, config, sadr, extra, progress, state = self._args
        self.result = apply_edit(model, requests, method, config, sadr=sadr, extra_losses=extra, progress=progress,
                                 state=state)
        return self.result

    def __exit__(self, *exc) -> None:
        if self.result is not None:
            self.result.restore()


def edit(
    model,
    requests: Rewrite | Sequence,
    method: str = "rome",
    config: EditorConfig | None = None,
    sadr: SADRConfig | None = None,
    *,
    extra_losses: Sequence[ExtraLoss] = (),
    progress: bool = True,
    state=None,
) -> EditContext:
    """``with edit(model, rewrite, method="rome") as result:`` the model is edited inside the block.

    ``config=None`` uses the editor's preset, ``XConfig.for_model(model)``. ``sadr`` (a
    :class:`~attention_drift.editing.sadr.SADRConfig`) adds the SADR regulariser to the value
    optimisation; its unset weight and steps are the published ones for ``method``
    (``SADRConfig()`` is the paper's protocol: ROME 80 steps, MEMIT 20, PMET 40).
    ``extra_losses`` adds any other terms; ``progress`` and ``state`` as in :func:`apply_edit`.
    On exit the original weights are restored exactly, even when the block raises.
    """
    _check_sadr(sadr)
    return EditContext(model, requests, method, config, sadr, tuple(extra_losses), progress, state)


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
    config: EditorConfig | None = None,
    *,
    sadr: SADRConfig | None = None,
    extra_losses: Sequence[ExtraLoss] = (),
    progress: bool = True,
    state=None,
) -> EditResult:
    """Edit ``model`` in place and return the :class:`EditResult` (call ``.restore()`` to undo).

    ROME and FT apply several requests one after the other; MEMIT, PMET and AlphaEdit insert
    them as one batch. ``config``, ``sadr`` as in :func:`edit`. ``progress`` shows bars while statistics
    are computed (once per model, layer and corpus; cached on disk) and over each value
    optimisation's steps (a bar that clears when the edit is done). Works on whatever
    device the model is on. ``state``: a stateful editor's state from the previous edit of a
    sequence (``previous_result.state``; AlphaEdit: the keys of earlier edits); None for a first
    edit. The result's ``state`` is the state after this edit; an edit given a state has no key.
    """
    with on_model_device(model):
        return _apply_edit(model, requests, method, config, sadr, extra_losses, progress, state)


def _apply_edit(model, requests, method, config, sadr, extra_losses, progress, state=None) -> EditResult:
    start = time.perf_counter()
    reqs = _requests(requests)
    _check_sadr(sadr)
    editor, config, sadr = resolve_edit(model, method, config, sadr)
    if state is not None and (editor.state_type is None or not isinstance(state, editor.state_type)):
        wanted = "keeps no state between edits" if editor.state_type is None else \
            f"takes a {editor.state_type.__name__} as state"
        raise EditError(f"editor {editor.name!r} {wanted}, got state={type(state).__name__}; pass state=None "
                        "or the .state of this editor's previous EditResult")
    key = None if extra_losses or state is not None else resolved_key(model, editor.name, config, sadr)
    if sadr is not None:
        extra_losses = (*extra_losses, SADRLoss(sadr))
    for request in reqs:
        check_request(model, request)
    for term in extra_losses:
        if not isinstance(term, ExtraLoss):
            raise EditError(f"extra_losses must hold ExtraLoss terms (name, hook_names, __call__); got {term!r}")
    names = [t.name for t in extra_losses]
    if len(set(names)) != len(names):
        raise EditError(f"extra loss names must be unique, got {names}")

    prepared = editor.prepare(model, config, progress=progress)
    layers = tuple(config.layers)
    params = _parameters(model, layers)
    originals = {name: p.detach().clone() for name, p in params.items()}
    updates: list[tuple[str, Tensor]] = []

    def apply(name: str, upd: Tensor) -> None:
        if name not in params:
            raise EditError(f"editor {editor.name!r} wrote {name!r}, which is not among the parameters of its layers {layers}")
        upd = upd.detach().to(params[name].device, params[name].dtype).clone()
        with torch.no_grad():
            params[name].add_(upd)
        updates.append((name, upd))

    def restore() -> None:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(originals[name])

    def execute(run_config, losses):
        if editor.state_type is None:
            return editor.execute(model, reqs, run_config, prepared, apply, losses), None
        return editor.execute(model, reqs, run_config, prepared, apply, losses, state=state)

    fallback = None
    try:
        with step_progress(progress):
            traces, new_state = execute(config, extra_losses)
            if sadr is not None and sadr.verify:
                for stage, stage_config, stage_losses in _fallbacks(config, extra_losses):
                    if _requests_hold(model, reqs):
                        break
                    restore()
                    updates.clear()
                    traces, new_state = execute(stage_config, stage_losses)
                    config, fallback = stage_config, stage
    except BaseException:
        restore()
        raise
    deltas = {name: (p.detach() - originals[name]) for name, p in params.items()}
    return EditResult(
        editor.name, reqs, config, layers, deltas, list(traces), time.perf_counter() - start, sadr=sadr, key=key,
        fallback=fallback, state=new_state, _params=params, _originals=originals, _updates=updates, _model=model_identity(model),
        _owner=weakref.ref(model),
    )


FALLBACKS = ("plain", "plain-clamp2")
"""What a SADR edit with ``verify`` falls back to, in order, while a request's new target does not
win on its prompt: the editor without the SADR term, then also with its clamp doubled."""


def _fallbacks(config, extra_losses: Sequence[ExtraLoss]) -> list[tuple[str, object, tuple]]:
    """The :data:`FALLBACKS` stages this editor has, as (name, config, extra losses): ``plain-clamp2``
    only where its config has a clamp (:func:`~attention_drift.editing.registry.clamp_field`:
    ``clamp_norm_factor``, FT's ``norm_constraint``; an editor without one has ``plain``)."""
    plain = tuple(t for t in extra_losses if not isinstance(t, SADRLoss))
    stages = [("plain", config, plain)]
    name = clamp_field(config)
    if name is not None:
        wider = dataclasses.replace(config, **{name: 2 * getattr(config, name)})
        stages.append(("plain-clamp2", wider, plain))
    return stages


def _requests_hold(model, requests: Sequence[Rewrite]) -> bool:
    """Whether every request's new target beats its old one on its own prompt, scored as
    efficacy is (:func:`attention_drift.core.scores.score_pairs`)."""
    from attention_drift.core.scores import score_pairs

    with torch.no_grad():
        scores = score_pairs(model, [r.prompt for r in requests], [r.target_new for r in requests],
                             [r.target_true for r in requests])
    return bool((scores.log_p_right > scores.log_p_wrong).all())


def _parameters(model, layers: Sequence[int]) -> dict[str, torch.nn.Parameter]:
    return {mlp_weight_name(l): mlp_out_weight(model, l) for l in layers}


def _fields(config) -> dict:
    """A dataclass's fields as torch-loadable plain data (nested dataclasses as dicts)."""
    return {f.name: _fields(v) if dataclasses.is_dataclass(v := getattr(config, f.name)) else v
            for f in dataclasses.fields(config)}


def _rebuild(cls, data: dict):
    """Inverse of :func:`_fields` for ``cls`` (a nested dataclass is rebuilt as the dataclass
    its field's type names, also inside ``X | None``)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints.get(name)
        kinds = [k for k in (hint, *typing.get_args(hint)) if isinstance(k, type) and dataclasses.is_dataclass(k)]
        kwargs[name] = _rebuild(kinds[0], value) if isinstance(value, dict) and kinds else value
    return cls(**kwargs)


_PORTABLE = (str, int, float, bool, type(None))


def _portable(value, where: str):
    """``value`` with tensors moved to the CPU; an :class:`EditError` for anything that
    ``torch.load(weights_only=True)`` cannot read back."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _portable(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_portable(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, _PORTABLE):
        return value
    raise EditError(f"cannot save the edit: {where} holds a {type(value).__name__}; keep trace records to tensors and plain values")


def _trace(data: dict) -> OptimizationTrace:
    return OptimizationTrace(**{**data, "request": Rewrite(**data["request"]), "sites": tuple(data["sites"])})


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

"""The editors :func:`~attention_drift.editing.apply_edit` can run, by method name.

An :class:`Editor` holds a method's name, its config class and two functions:

* ``prepare(model, config, *, progress) -> prepared``: everything the edit needs that does
  not change weights (covariance statistics, context templates), computed before any
  weight is touched;
* ``execute(model, requests, config, prepared, apply, extra_losses) -> traces``: computes
  the weight updates and hands each to ``apply(param_name, update)`` (the parameter's
  layout and dtype), which adds it and records it so that the edit can be undone and
  replayed bitwise; returns one
  :class:`~attention_drift.editing.optimize.OptimizationTrace` per request.

The config class is a frozen dataclass following :class:`EditorConfig`; the parameters an
editor may change are the MLP output projections of ``config.layers``. Its radius of change (the
"clamp" SADR's ``clamp_scale`` and the verify fallback scale) is its ``clamp_norm_factor`` field,
or the field its class attribute ``clamp_field`` names (FT: ``norm_constraint``); see
:func:`clamp_field`.

An editor that carries state from one edit to the next (AlphaEdit's keys of earlier edits)
names its state's type in ``state_type`` (a frozen dataclass of tensors and plain values); its
``execute`` then takes ``state=`` (None for a first edit) and returns ``(traces, new state)``,
which :func:`~attention_drift.editing.apply_edit` takes as ``state=`` and hands back as
``EditResult.state``.

A new editor is one module (its config class, ``prepare`` and ``execute``) and one line in
the tuple at the end of this module (or :func:`register` at run time, e.g. in a notebook).
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Protocol, runtime_checkable

from attention_drift.editing import alphaedit, emmet, ft, memit, pmet, r_rome, rome
from attention_drift.editing.config import (AlphaEditConfig, ConfigError, EditError, FTConfig, MEMITConfig, PMETConfig,
                                            ROMEConfig)
from attention_drift.core.models import n_layers
from attention_drift.editing.sadr import KEY_NULL_EDITORS, SADRConfig


@runtime_checkable
class EditorConfig(Protocol):
    """What :func:`~attention_drift.editing.apply_edit` needs from an editor's config.

    ``method`` (a class attribute) names the editor; ``layers`` are the layers whose MLP
    output projection the edit may change; ``steps`` is the value optimisation's step count
    (SADR may set it); ``check(model)`` raises a
    :class:`~attention_drift.editing.ConfigError` when the config does not fit ``model``;
    ``for_model(model)`` (a classmethod) gives the preset for ``model``.
    """

    method: str
    steps: int
    layers: tuple[int, ...]

    def check(self, model) -> None: ...

    @classmethod
    def for_model(cls, model) -> "EditorConfig": ...


@dataclass(frozen=True)
class Editor:
    """One editing method, as the registry holds it.

    Args:
        name: the method name (``apply_edit(..., method=name)``); equals ``config_type.method``.
        config_type: its config class, a frozen dataclass following :class:`EditorConfig`.
        prepare: ``prepare(model, config, *, progress) -> prepared``.
        execute: ``execute(model, requests, config, prepared, apply, extra_losses) -> traces``;
            with a ``state_type``: ``execute(..., extra_losses, state=state) -> (traces, state)``.
        state_type: the type of the state a stateful editor carries from edit to edit, or None.
        batched: whether the editor inserts several requests as one update (MEMIT, PMET,
            AlphaEdit, EMMET); False: it applies them one after the other (ROME, r-ROME, FT), so
            batch editing (``edit_batch`` > 1: ``evaluate --edit-batch``, ``sequence --edit-batch``)
            refuses it (:func:`check_batch`).
    """

    name: str
    config_type: type
    prepare: Callable[..., Any]
    execute: Callable[..., Any]
    state_type: type | None = None
    batched: bool = False


EDITORS: dict[str, Editor] = {}
"""``{method name: Editor}``, in registration order."""


def register(editor: Editor) -> Editor:
    """Add ``editor`` to :data:`EDITORS` (a name can be registered once; :func:`unregister` first)."""
    if editor.name in EDITORS:
        raise ConfigError(f"an editor named {editor.name!r} is registered already; unregister it first")
    cls = editor.config_type
    if not (isinstance(cls, type) and is_dataclass(cls) and cls.__dataclass_params__.frozen):
        raise ConfigError(f"editor {editor.name!r}: its config type must be a frozen dataclass, got {cls!r}")
    if getattr(cls, "method", None) != editor.name:
        raise ConfigError(
            f"editor {editor.name!r}: {cls.__name__}.method is {getattr(cls, 'method', None)!r}; "
            "set the class attribute method to the editor's name"
        )
    state = editor.state_type
    if state is not None and not (isinstance(state, type) and is_dataclass(state)):
        raise ConfigError(f"editor {editor.name!r}: its state_type must be a dataclass or None, got {state!r}")
    missing = [m for m in ("check", "for_model") if not callable(getattr(cls, m, None))]
    if missing:
        raise ConfigError(f"editor {editor.name!r}: {cls.__name__} lacks {', '.join(missing)} (see EditorConfig)")
    EDITORS[editor.name] = editor
    return editor


def unregister(name: str) -> Editor:
    """Remove and return the editor ``name``."""
    return EDITORS.pop(get_editor(name).name)


def get_editor(method: str) -> Editor:
    """The registered editor ``method``, or a :class:`ConfigError` listing the known ones."""
    try:
        return EDITORS[method]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown editing method {method!r}; choose one of {', '.join(EDITORS)}") from None


def check_batch(method: str, size: int) -> Editor:
    """The editor ``method`` when it can insert ``size`` requests as one update; a
    :class:`ConfigError` for a size below 1, or above 1 for an editor that edits one fact at a time."""
    editor = get_editor(method)
    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"edit_batch must be an integer >= 1, got {size!r}", fields=("edit_batch",))
    if size > 1 and not editor.batched:
        batched = ", ".join(e.name for e in EDITORS.values() if e.batched)
        raise ConfigError(f"{editor.name} edits one fact at a time, so edit_batch {size} does not fit it; use "
                          f"edit_batch 1, or a batch editor: {batched}", fields=("edit_batch",))
    return editor


class _Methods(Sequence):
    """The registered method names, in registration order (follows :data:`EDITORS`)."""

    def __getitem__(self, index):
        return tuple(EDITORS)[index]

    def __len__(self) -> int:
        return len(EDITORS)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(EDITORS))


class _ConfigTypes(Mapping):
    """``{method name: config class}`` of the registered editors (follows :data:`EDITORS`)."""

    def __getitem__(self, method: str) -> type:
        return EDITORS[method].config_type

    def __iter__(self) -> Iterator[str]:
        return iter(EDITORS)

    def __len__(self) -> int:
        return len(EDITORS)

    def __repr__(self) -> str:
        return repr(dict(self))


METHODS: Sequence[str] = _Methods()
"""The registered method names (a live view of :data:`EDITORS`)."""

CONFIG_TYPES: Mapping[str, type] = _ConfigTypes()
"""``{method name: config class}`` (a live view of :data:`EDITORS`)."""


def clamp_field(config) -> str | None:
    """The name of ``config``'s clamp (the radius of change that SADR's ``clamp_scale`` multiplies
    and the verify fallback doubles): ``clamp_norm_factor`` where the config has it, else the field
    its class attribute ``clamp_field`` names; None when it has none or it is unset (None:
    e.g. unconstrained fine-tuning)."""
    names = [f.name for f in fields(config)]
    name = "clamp_norm_factor" if "clamp_norm_factor" in names else getattr(type(config), "clamp_field", None)
    if name not in names or getattr(config, name) is None:
        return None
    return name


def resolve_edit(model, method: str, config=None, sadr: SADRConfig | None = None) -> tuple[Editor, Any, SADRConfig | None]:
    """``(editor, config, sadr)`` exactly as an edit of ``model`` would use them.

    ``config=None`` is the editor's preset for ``model``; a SADR config gets its unset
    weight and steps from the published protocol (:meth:`SADRConfig.resolved`), its
    steps replace the config's and its ``clamp_scale`` multiplies the config's clamp (:func:`clamp_field`). Raises a :class:`ConfigError` (or an ``EditError``) for a
    method, config or SADR config that does not fit; nothing is computed.
    """
    editor = get_editor(method)
    cls = editor.config_type
    if config is None:
        config = cls.for_model(model)
    elif not isinstance(config, cls):
        raise ConfigError(
            f"method {method!r} needs a {cls.__name__}, got a {type(config).__name__}; pass the matching "
            f"config or method={getattr(config, 'method', '?')!r}"
        )
    config.check(model)
    if sadr is not None:
        if not isinstance(sadr, SADRConfig):
            raise EditError(
                f"sadr must be None or an attention_drift.SADRConfig, got {type(sadr).__name__}; "
                "pass other loss terms through extra_losses="
            )
        total = n_layers(model)
        if sadr.layers is not None and any(not 0 <= l < total for l in sadr.layers):
            raise EditError(f"SADR layers {sadr.layers} are out of range: the model has layers 0..{total - 1}")
        if sadr.key_nulls and editor.name not in KEY_NULL_EDITORS:  # key_keeps come only with key_nulls
            raise ConfigError(f"SADR key_nulls constrains the key-value update of {', '.join(KEY_NULL_EDITORS)}; "
                              f"method {editor.name!r} does not take it: leave key_nulls empty or use one of those")
        sadr = sadr.resolved(model, editor.name)
        if sadr.steps is not None:
            config = replace(config, steps=sadr.steps)
        if sadr.clamp_scale != 1.0:
            name = clamp_field(config)
            if name is None:
                raise ConfigError(
                    f"SADR clamp_scale {sadr.clamp_scale} scales the editor's clamp, but this {type(config).__name__} "
                    "has none (e.g. unconstrained fine-tuning); leave clamp_scale at 1"
                )
            config = replace(config, **{name: getattr(config, name) * sadr.clamp_scale})
    return editor, config, sadr


for _editor in (
    Editor("rome", ROMEConfig, rome.prepare, rome.execute),
    Editor("memit", MEMITConfig, memit.prepare, memit.execute, batched=True),
    Editor("pmet", PMETConfig, pmet.prepare, pmet.execute, batched=True),
    Editor("alphaedit", AlphaEditConfig, alphaedit.prepare, alphaedit.execute, state_type=alphaedit.PreviousKeys,
           batched=True),
    Editor("emmet", emmet.EMMETConfig, emmet.prepare, emmet.execute, batched=True),
    Editor("r-rome", r_rome.RROMEConfig, r_rome.prepare, r_rome.execute),
    Editor("ft", FTConfig, ft.prepare, ft.execute),
):
    register(_editor)


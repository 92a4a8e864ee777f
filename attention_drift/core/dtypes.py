"""The weight dtypes the toolkit loads models in, by name: the one table (torch-free).

The command line's ``--dtype`` choices, :class:`~attention_drift.runs.placement.Placement` and
:func:`attention_drift.core.models.resolve_dtype` all read :data:`DTYPE_NAMES`, so a name
accepted in one place is accepted everywhere and means the same torch dtype.
"""

DTYPE_NAMES: dict[str, str] = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}
"""Every accepted name (lower case, without ``torch.``) -> the torch attribute it means."""

DTYPES: tuple[str, ...] = tuple(dict.fromkeys(DTYPE_NAMES.values()))
"""The canonical names, in order of preference: ``("float32", "bfloat16", "float16")``."""


def canonical_dtype(name: str) -> str | None:
    """The canonical name of ``name`` (``"bf16"`` or ``"torch.bfloat16"`` -> ``"bfloat16"``), None when unknown."""
    if not isinstance(name, str):
        return None
    return DTYPE_NAMES.get(name.strip().lower().removeprefix("torch."))

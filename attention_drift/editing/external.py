"""Edits made elsewhere, measured like our own: another model of the same architecture, a Hugging
Face folder, a saved :class:`~attention_drift.editing.api.EditResult` or a PEFT LoRA adapter.

Every source becomes one thing, a :class:`WeightSwap`: the parameters whose tensors differ from
the loaded model's, under their Hugging Face names. Entering the swap copies them into the model;
leaving copies the originals back, bit for bit. It is an edit like :func:`~attention_drift.editing.api.edit`'s
context manager, and also its own edit factory (``swap(record)`` is ``swap``), so a pair of models
goes through exactly the code an in-process edit does::

    swap = load_edited(model, "runs/edited-folder")      # or a saved edit, an adapter, a model
    drift_record(model, record, swap)                    # the same RecordDrift as an in-process edit
    run_drift(model, records, swap, out, meta)           # the same drift.json, figures, explorer

Memory: one model plus the changed tensors. A folder is read tensor by tensor (safetensors);
an adapter is merged by ``peft`` on a skeleton that shares the model's tensors, only the target
modules' weights copied.
"""

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from attention_drift.core.models import hf_parameters
from attention_drift.editing.config import EditError

__all__ = ["ExternalEditError", "WeightSwap", "load_edited"]

SOURCES = "a Hugging Face folder of the same architecture, a saved edit (EditResult.save) or a PEFT adapter folder"


class ExternalEditError(EditError):
    """An edited source that does not fit the model (or cannot be read); raised before any weight
    of the model is touched. ``fields``: ``("edited",)``, the source's argument."""

    def __init__(self, message: str, fields: tuple[str, ...] = ()):
        super().__init__(message, fields=("edited", *fields))


class WeightSwap:
    """The weights of an edit made elsewhere, ready to swap into ``model``.

    Args:
        model: the (unedited) bridge.
        weights: ``{Hugging Face parameter name: edited tensor}`` of the changed parameters
            (:func:`~attention_drift.core.models.hf_parameters`' names); cast to the model's dtype
            and device here.
        source: what the weights came from (shown in messages and run metadata).

    ``with swap:`` copies the weights in and the originals back on exit (bitwise, also when the
    block raises); ``swap(record)`` returns ``swap``, so it is an
    edit factory (``EditFactory`` of :mod:`attention_drift.measure.drift`) too.
    """

    def __init__(self, model, weights: Mapping[str, Tensor], source: str = "edited"):
        params = hf_parameters(model)
        unknown = [n for n in weights if n not in params]
        if unknown:
            raise ExternalEditError(f"edited {source}: the model has no parameters {unknown[:3]}")
        self.source = source
        self._params: dict[str, torch.nn.Parameter] = {}
        self._weights: dict[str, Tensor] = {}
        seen = set()
        for name, tensor in weights.items():
            param = params[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise ExternalEditError(f"edited {source}: {name} has shape {tuple(tensor.shape)}, "
                                        f"the model's {tuple(param.shape)}")
            if id(param) in seen:  # a tied weight listed under both names
                continue
            seen.add(id(param))
            self._params[name] = param
            self._weights[name] = tensor.detach().to(param.device, param.dtype)
        self._originals: dict[str, Tensor] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The Hugging Face names of the parameters the swap changes."""
        return tuple(self._params)

    @property
    def weights(self) -> dict[str, Tensor]:
        """``{name: edited tensor}`` (the model's dtype and device)."""
        return dict(self._weights)

    def __call__(self, record=None) -> "WeightSwap":
        return self

    def __enter__(self) -> "WeightSwap":
        if self._originals is not None:
            raise ExternalEditError(f"edited {self.source}: the swap is already applied (enter it once at a time)")
        self._originals = {n: p.detach().clone() for n, p in self._params.items()}
        with torch.no_grad():
            for name, param in self._params.items():
                param.copy_(self._weights[name])
        return self

    def __exit__(self, *exc) -> None:
        if self._originals is None:
            return
        with torch.no_grad():
            for name, param in self._params.items():
                param.copy_(self._originals[name])
        self._originals = None

    def __repr__(self) -> str:
        return f"WeightSwap({self.source!r}, {len(self._params)} changed parameters)"


# ---------------------------------------------------------------------------------------------
# sources


def _architecture(config) -> dict[str, object]:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {"model_type": getattr(config, "model_type", None),
            "n_layers": getattr(config, "num_hidden_layers", None),
            "d_model": getattr(config, "hidden_size", None),
            "n_heads": getattr(config, "num_attention_heads", None),
            "d_vocab": getattr(config, "vocab_size", None)}


def check_architecture(model, config, source: str) -> None:
    """An :class:`ExternalEditError` unless ``config`` (a Hugging Face config) has the model's
    layer count, width, head count, vocabulary size and model type."""
    ours, theirs = _architecture(model.original_model.config), _architecture(config)
    diff = [f"{k} {theirs[k]} != {ours[k]}" for k in ours if theirs[k] != ours[k]]
    if diff:
        raise ExternalEditError(f"edited {source} is another architecture than the model ({', '.join(diff)}); "
                                "give an edit of the same model")


def _check_vocabulary(model, folder: Path, source: str) -> None:
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        return
    from transformers import AutoTokenizer

    try:
        theirs = AutoTokenizer.from_pretrained(folder).get_vocab()
    except (OSError, ValueError):
        return
    if theirs != model.tokenizer.get_vocab():
        raise ExternalEditError(f"edited {source} has another vocabulary than the model's tokenizer "
                                f"({len(theirs)} vs {len(model.tokenizer.get_vocab())} tokens)")


def _changed(model, tensors: Iterator[tuple[str, Tensor]], source: str) -> dict[str, Tensor] | None:
    """The tensors that differ from the model's (cast to its dtype first); None when the source
    does not hold every parameter under the model's names (then it is read another way)."""
    params = hf_parameters(model)
    changed, found = {}, set()
    for name, tensor in tensors:
        if name not in params:
            continue
        param = params[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ExternalEditError(f"edited {source}: {name} has shape {tuple(tensor.shape)}, "
                                    f"the model's {tuple(param.shape)}")
        found.add(id(param))
        tensor = tensor.to(param.device, param.dtype)
        if not torch.equal(tensor, param.detach()):
            changed[name] = tensor
    if any(id(p) not in found for p in params.values()):
        return None
    return changed


def _state_tensors(state: Mapping[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    yield from ((n.replace("._original_component", ""), t) for n, t in state.items())


def _from_model(model, other, source: str) -> dict[str, Tensor]:
    hf = getattr(other, "original_model", other)
    check_architecture(model, hf.config, source)
    names = hf_parameters(other) if hf is not other else dict(hf.named_parameters(remove_duplicate=False))
    changed = _changed(model, ((n, p.detach()) for n, p in names.items()), source)
    if changed is None:
        raise ExternalEditError(f"edited {source}: its parameters are named unlike the model's; give an edit of the same model")
    return changed


def _folder_tensors(folder: Path) -> Iterator[tuple[str, Tensor]]:
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _from_folder(model, folder: Path, source: str) -> dict[str, Tensor]:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ExternalEditError(f"edited {source}: cannot read its config.json ({err})") from None
    check_architecture(model, config, source)
    _check_vocabulary(model, folder, source)
    changed = _changed(model, _folder_tensors(folder), source) if any(folder.glob("*.safetensors")) else None
    if changed is None:  # other file formats or key names: transformers reads them (a second model, briefly)
        try:
            other = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as err:
            raise ExternalEditError(f"edited {source}: cannot load its weights ({err})") from None
        changed = _changed(model, _state_tensors(other.state_dict()), source)
        if changed is None:
            raise ExternalEditError(f"edited {source}: its weights are named unlike the model's")
    return changed


def _from_saved_edit(model, path: Path, source: str) -> dict[str, Tensor]:
    from attention_drift.editing.api import EditResult

    try:
        result = EditResult.load(path, model)
    except EditError as err:
        text = str(err)
        rest = text.removeprefix(str(path)) if text.startswith(str(path)) else f": {text}"
        raise ExternalEditError(f"edited {source}{rest}") from None
    names = {id(p): n for n, p in hf_parameters(model).items()}
    with result:  # the same additions on the same originals: bitwise the first application's weights
        return {names[id(p)]: p.detach().clone() for p in result._params.values()}


def _known_names(model) -> set[str]:
    """Names the model goes by: what it was loaded as, its hub name, its folder."""
    from attention_drift.core.models import OFFLINE_MODELS, _ALIASES

    names = {str(getattr(model, "model_name", "") or ""), str(model.original_model.config._name_or_path or "")}
    short = _ALIASES.get(str(getattr(model, "model_name", "")).lower(), str(getattr(model, "model_name", "")).lower())
    if short in OFFLINE_MODELS:
        names.add(OFFLINE_MODELS[short].hub_name)
    names.discard("")
    return names | {Path(n.rstrip("/")).name.lower() for n in names}


def _adapter_modules(weights: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{module path: {"A": lora_A weight, "B": lora_B weight}}`` of an adapter's state dict."""
    out: dict[str, dict[str, Tensor]] = {}
    for key, tensor in weights.items():
        for part in ("A", "B"):
            marker = f".lora_{part}."
            if marker in key:
                path = key.split(marker)[0].removeprefix("base_model.model.")
                out.setdefault(path, {})[part] = tensor
    return out


def _check_adapter_shapes(model, modules: Mapping[str, Mapping[str, Tensor]], fan_in_fan_out: bool,
                          source: str) -> None:
    params = hf_parameters(model)
    for path, ab in modules.items():
        weight = params.get(f"{path}.weight")
        if weight is None:
            raise ExternalEditError(f"edited {source} adapts {path}, which the model lacks "
                                    f"({model.cfg.n_layers} layers); it was made for another base model")
        if "A" not in ab or "B" not in ab:
            continue
        out_f, in_f = int(ab["B"].shape[0]), int(ab["A"].shape[-1])
        shape = (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
        if tuple(weight.shape[:2]) != shape:
            raise ExternalEditError(f"edited {source} adapts {path} as {shape}, the model's weight is "
                                    f"{tuple(weight.shape)}; it was made for another base model")


def _from_adapter(model, folder: Path, source: str, allow_other_base: bool) -> dict[str, Tensor]:
    try:
        import peft
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import load_peft_weights
    except ImportError:
        raise ExternalEditError(f"edited {source} is a PEFT adapter; reading it needs the peft package: "
                                "pip install peft (make install has it)") from None
    from transformers import AutoModelForCausalLM

    try:
        config = peft.PeftConfig.from_pretrained(str(folder))
        weights = load_peft_weights(str(folder), device="cpu")
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ExternalEditError(f"edited {source}: cannot read the adapter ({err})") from None
    base = str(getattr(config, "base_model_name_or_path", "") or "")
    known = _known_names(model)
    if base and not allow_other_base and base not in known and Path(base.rstrip("/")).name.lower() not in known:
        raise ExternalEditError(f"edited {source} is an adapter of base model {base!r}, not of the model "
                                f"{getattr(model, 'model_name', None) or model.original_model.config._name_or_path!r}; "
                                "pass allow_other_base if they are the same weights under another name",
                                fields=("allow_other_base",))
    modules = _adapter_modules(weights)
    if not modules:
        raise ExternalEditError(f"edited {source}: the adapter holds no LoRA weights (lora_A / lora_B)")
    _check_adapter_shapes(model, modules, bool(getattr(config, "fan_in_fan_out", False)), source)
    params = hf_parameters(model)
    hf = model.original_model
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(hf.config)
    twin.load_state_dict({n: p.detach() for n, p in params.items()}, assign=True, strict=False)
    twin.eval()
    try:
        wrapped = peft.PeftModel.from_pretrained(twin, str(folder))
        for module in wrapped.modules():  # the merge writes copies, never the model's shared tensors
            if isinstance(module, BaseTunerLayer):
                layer = module.get_base_layer()
                layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        merged = dict(wrapped.merge_and_unload().named_parameters(remove_duplicate=False))
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ExternalEditError(f"edited {source}: peft could not merge the adapter into the model ({err})") from None
    return {n: merged[n].detach() for n, p in params.items()
            if n in merged and merged[n].data_ptr() != p.data_ptr() and not torch.equal(merged[n], p.detach())}


def load_edited(model, source, *, allow_other_base: bool = False) -> WeightSwap:
    """The edit ``source`` holds, as a :class:`WeightSwap` over ``model`` (nothing applied yet).

    ``source`` is another bridge or Hugging Face model of the same architecture, a Hugging Face
    folder (``save_pretrained`` output, e.g. :meth:`EditResult.save_pretrained
    <attention_drift.editing.api.EditResult.save_pretrained>`), a ``.gguf`` file, a saved edit
    (:meth:`EditResult.save <attention_drift.editing.api.EditResult.save>`) or a PEFT LoRA adapter
    folder (merged into the model's weights by ``peft``). ``allow_other_base``: accept an adapter
    whose ``base_model_name_or_path`` names another model (its shapes must still fit).

    Raises an :class:`ExternalEditError` (one line) for a missing path, another architecture or
    vocabulary, an adapter or saved edit made for another model, or a source that changes nothing.
    """
    if isinstance(source, torch.nn.Module):
        label = str(getattr(source, "model_name", None) or type(source).__name__)
        return _swap(model, _from_model(model, source, label), label)
    label = str(source)
    path = Path(os.path.expanduser(label))
    if not path.exists():
        raise ExternalEditError(f"edited {label} does not exist; give {SOURCES}")
    if path.is_dir() and (path / "adapter_config.json").is_file():
        weights = _from_adapter(model, path, label, allow_other_base)
    elif path.is_dir() and (path / "config.json").is_file():
        weights = _from_folder(model, path, label)
    elif path.is_dir():
        raise ExternalEditError(f"edited {label} holds neither config.json nor adapter_config.json; give {SOURCES}")
    elif path.suffix == ".gguf":
        from attention_drift.core.models import load_model

        weights = _from_model(model, load_model(path), label)
    else:
        weights = _from_saved_edit(model, path, label)
    return _swap(model, weights, label)


def _swap(model, weights: dict[str, Tensor], label: str) -> WeightSwap:
    if not weights:
        raise ExternalEditError(f"edited {label} holds the same weights as the model: there is no edit to measure")
    return WeightSwap(model, weights, label)

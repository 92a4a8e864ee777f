"""Second-moment statistics C = E[k k^T] of the MLP keys, computed once and cached on disk.

The key ``k`` at a layer is the input of its MLP output projection (``blocks.L.mlp.hook_post``,
the vector ROME/MEMIT/PMET treat as a key of a linear associative memory). ``C`` is the mean
of ``k k^T`` over every non-padding token of a corpus, accumulated in float64 and stored in
float32, exactly what the original code calls ``mom2`` (uncentred).

Corpora (:class:`~attention_drift.editing.config.StatsConfig.corpus`):

* ``"model"``: ``n_samples`` sequences of ``seq_len`` tokens sampled from the model itself
  (temperature 1, seeded), each started from a common opening word. Works offline; the
  model's own text stands in for Wikipedia.
* local text files: each blank-line separated paragraph is one sample (truncated).
* ``"wikitext"`` / ``"wikipedia"``: the Hugging Face datasets (needs internet and the
  ``datasets`` package), as the original methods.

Cache: ``$ATTENTION_DRIFT_CACHE/stats/<model>/<corpus>/layer{L}_n{N}.safetensors`` (default
root ``~/.cache/attention_drift``) with a JSON of provenance beside it; sampled corpora are
cached there too, so statistics for another layer reuse the same text. A loaded matrix is
also kept in memory for the session.

How many samples (``benchmarks/sweep_stats_samples.py``, ROME on SmolLM2-135M at layer 5,
10 development records, 5 CounterFact- and 5 WikiData-type, pooled over prompts, %):

    N sequences  efficacy  paraphrase  neighbourhood  relation
    (unedited)       30.0        20.0           44.4      66.7
    100             100.0        86.7           37.0       0.0
    300             100.0        86.7           37.0       0.0

Identical at 100 and 300 (1000 was not run: sampling it takes ~50 minutes on the shared
2-core machine); the presets use 300. Sampling ran at ~50 tokens/s and accumulation at
~360-1000 tokens/s there (both depend heavily on the machine's load).
"""

import hashlib
import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from attention_drift import tokens
from attention_drift.editing.config import ConfigError, StatsConfig
from attention_drift.editing.templates import sample_tokens
from attention_drift.models import model_device, n_layers
from attention_drift.hooks import act_name

SAMPLE_CHUNK = 32
OPENERS = ("The", "In", "A", "It", "This", "He", "She", "When", "After", "There", "We", "One")
_MEMORY: dict[str, Tensor] = {}


def cache_root() -> Path:
    root = os.environ.get("ATTENTION_DRIFT_CACHE") or Path.home() / ".cache" / "attention_drift"
    return Path(root) / "stats"


def model_key(model) -> str:
    """A file-system safe name for ``model``: its name plus a fingerprint of its embedding."""
    name = str(getattr(model, "model_name", None) or model.cfg.model_name)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name or name)[:60]
    embed = model.original_model.get_input_embeddings().weight
    digest = hashlib.sha1(f"{name}|{tuple(embed.shape)}|{n_layers(model)}".encode())
    digest.update(embed[:8].detach().float().cpu().numpy().tobytes())
    return f"{safe}-{digest.hexdigest()[:10]}"


def stats_path(model, layer: int, stats: StatsConfig) -> Path:
    return cache_root() / model_key(model) / stats.corpus_key / f"layer{layer}_n{stats.n_samples}.safetensors"


def key_second_moments(
    model, layers: Sequence[int], stats: StatsConfig, *, progress: bool = True
) -> dict[int, Float[Tensor, "d_mlp d_mlp"]]:
    """``{layer: C}`` with ``C = E[k k^T]`` (float32) of ``blocks.{layer}.mlp.hook_post``.

    Loaded from the cache when present; the missing layers are computed in one pass over
    the corpus (built or loaded first) and written to the cache.
    """
    for layer in layers:
        if not 0 <= layer < n_layers(model):
            raise ConfigError(f"statistics layer {layer} is out of range (0..{n_layers(model) - 1})")
    result: dict[int, Tensor] = {}
    missing = []
    for layer in sorted(set(layers)):
        path = stats_path(model, layer, stats)
        if str(path) in _MEMORY:
            result[layer] = _MEMORY[str(path)]
        elif path.exists():
            from safetensors.torch import load_file

            result[layer] = _MEMORY.setdefault(str(path), load_file(path)["mom2"].float().to(model_device(model)))
        else:
            missing.append(layer)
    if missing:
        sequences = corpus_sequences(model, stats, progress=progress)
        start = time.perf_counter()
        moments, count = _accumulate(model, sequences, missing, stats.batch_size, progress)
        seconds = time.perf_counter() - start
        for layer, mom2 in moments.items():
            path = stats_path(model, layer, stats)
            _save(path, mom2, count, {
                "model": str(getattr(model, "model_name", "")),
                "model_key": model_key(model),
                "layer": layer,
                "hook": act_name("mlp_post", layer),
                "corpus": stats.corpus if isinstance(stats.corpus, str) else list(stats.corpus),
                "corpus_key": stats.corpus_key,
                "n_samples_requested": stats.n_samples,
                "n_sequences": len(sequences),
                "seq_len": stats.seq_len,
                "tokens": count,
                "seconds_for_all_layers": round(seconds, 2),
                "layers_in_pass": missing,
                "tokens_per_second": round(count / max(seconds, 1e-9), 1),
            })
            result[layer] = _MEMORY.setdefault(str(path), mom2)
    return result


def _save(path: Path, mom2: Tensor, count: int, provenance: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"mom2": mom2.contiguous().cpu(), "count": torch.tensor([count], device="cpu")}, tmp)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(provenance, indent=1))


@torch.no_grad()
def _accumulate(
    model, sequences: list[list[int]], layers: list[int], batch_size: int, progress: bool
) -> tuple[dict[int, Tensor], int]:
    names = {act_name("mlp_post", layer): layer for layer in layers}
    d_mlp = int(model.cfg.d_mlp)
    sums = {layer: torch.zeros(d_mlp, d_mlp, dtype=torch.float64) for layer in layers}
    count = 0
    pad = model.tokenizer.pad_token_id or 0
    bar = tqdm(total=sum(len(s) for s in sequences), desc="key statistics", unit="tok", disable=not progress)
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i:i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        keep = mask.bool()
        _, cache = model.run_with_cache(
            ids, attention_mask=mask, names_filter=lambda n: n in names, stop_at_layer=max(layers) + 1
        )
        for name, layer in names.items():
            keys = cache[name][keep].double()
            sums[layer] += keys.T @ keys
        count += int(keep.sum())
        bar.update(int(mask.sum()))
    bar.close()
    return {layer: (s / max(count, 1)).float() for layer, s in sums.items()}, count


def corpus_sequences(model, stats: StatsConfig, *, progress: bool = True) -> list[list[int]]:
    """The corpus as token sequences (BOS where the model expects one, at most ``seq_len`` long)."""
    if stats.corpus == "model":
        return sample_corpus(model, stats, progress=progress)
    if isinstance(stats.corpus, tuple):
        return _file_corpus(model, stats)
    return _hf_corpus(model, stats, progress=progress)


def sample_corpus(model, stats: StatsConfig, *, progress: bool = True) -> list[list[int]]:
    """``n_samples`` token sequences of ``seq_len`` tokens sampled from ``model`` (cached on disk).

    Sequences are generated in chunks of ``SAMPLE_CHUNK``; chunk ``c`` starts every row
    with the opening word ``OPENERS[c % len(OPENERS)]`` (through
    :func:`~attention_drift.tokens.encode`) and continues by ancestral sampling at
    temperature 1 with a generator seeded by ``(seed, c)``. So the corpus of N sequences
    is the first N of any larger one, and a cached larger corpus is reused.
    """
    folder = cache_root() / model_key(model) / stats.corpus_key
    cached = sorted(
        (int(p.stem.split("_n")[1]), p) for p in folder.glob("corpus_n*.safetensors") if p.stem.split("_n")[1].isdigit()
    ) if folder.exists() else []
    for n, path in cached:
        if n >= stats.n_samples:
            from safetensors.torch import load_file

            return [row.tolist() for row in load_file(path)["ids"][: stats.n_samples]]
    rows: list[list[int]] = []
    n_chunks = -(-stats.n_samples // SAMPLE_CHUNK)
    bar = tqdm(total=n_chunks * SAMPLE_CHUNK * stats.seq_len, desc="sampling corpus", unit="tok",
               disable=not progress)
    for chunk in range(n_chunks):
        generator = torch.Generator().manual_seed(stats.seed * 1_000_003 + chunk)
        prefix = tokens.encode(model, OPENERS[chunk % len(OPENERS)])[: stats.seq_len]
        rows.extend(sample_tokens(model, prefix, SAMPLE_CHUNK, stats.seq_len, generator))
        bar.update(SAMPLE_CHUNK * stats.seq_len)
    bar.close()
    ids = torch.tensor(rows, dtype=torch.int32)
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"corpus_n{len(rows)}.safetensors"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"ids": ids.contiguous()}, tmp)
    os.replace(tmp, path)
    return [row.tolist() for row in ids[: stats.n_samples]]


def _file_corpus(model, stats: StatsConfig) -> list[list[int]]:
    docs: list[list[int]] = []
    for path in stats.corpus:
        if not os.path.isfile(path):
            raise ConfigError(f"stats corpus file {path!r} does not exist; give paths of plain text files")
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        for paragraph in text.split("\n\n"):
            if paragraph.strip():
                docs.append(tokens.encode(model, paragraph.strip())[: stats.seq_len])
                if len(docs) == stats.n_samples:
                    return docs
    if not docs:
        raise ConfigError(f"the stats corpus files {list(stats.corpus)} hold no text")
    warnings.warn(
        f"the stats corpus files hold {len(docs)} paragraphs, fewer than n_samples={stats.n_samples}; "
        "using all of them", stacklevel=3,
    )
    return docs


def _hf_corpus(model, stats: StatsConfig, *, progress: bool) -> list[list[int]]:
    try:
        import datasets
    except ImportError as err:
        raise ConfigError(
            f"stats corpus {stats.corpus!r} needs the 'datasets' package (pip install datasets) and internet; "
            "offline, use StatsConfig(corpus='model') or local text files"
        ) from err
    name, config = (("wikitext", "wikitext-103-raw-v1") if stats.corpus == "wikitext"
                    else ("wikimedia/wikipedia", "20231101.en"))
    try:
        data = datasets.load_dataset(name, config, split="train", streaming=True)
    except Exception as err:  # noqa: BLE001 - any hub failure means the same to the user
        raise ConfigError(
            f"could not load the {stats.corpus!r} dataset ({err}); it needs internet. Offline, use "
            "StatsConfig(corpus='model') or local text files"
        ) from err
    docs: list[list[int]] = []
    bar = tqdm(total=stats.n_samples, desc=f"reading {stats.corpus}", disable=not progress)
    for item in data:
        text = item["text"].strip()
        if len(text) < 20 or text.startswith("="):
            continue
        docs.append(tokens.encode(model, text)[: stats.seq_len])
        bar.update(1)
        if len(docs) == stats.n_samples:
            break
    bar.close()
    return docs


def clear_memory_cache() -> None:
    """Forget matrices loaded in this session (the disk cache stays)."""
    _MEMORY.clear()
    _INVERSES.clear()




_INVERSES: dict[str, Tensor] = {}


def inverse_second_moment(model, layer: int, stats: StatsConfig, *, progress: bool = True) -> Tensor:
    """``C^-1`` (float64) of :func:`key_second_moments` for one layer, kept in memory."""
    key = str(stats_path(model, layer, stats))
    if key not in _INVERSES:
        mom2 = key_second_moments(model, [layer], stats, progress=progress)[layer]
        _INVERSES[key] = torch.linalg.inv(mom2.double())
    return _INVERSES[key]

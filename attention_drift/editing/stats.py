"""Second-moment statistics C = E[k k^T] of the MLP keys, computed once and cached on disk.

AlphaEdit's null-space projections of ``C`` (:func:`null_space_projection`) are cached beside them.

The key ``k`` at a layer is the input of its MLP output projection (``blocks.L.mlp.hook_post``,
the vector ROME/MEMIT/PMET treat as a key of a linear associative memory). ``C`` is the mean
of ``k k^T`` over every non-padding token of a corpus (:mod:`~attention_drift.editing.corpus`),
stored in float32, exactly what the original code calls ``mom2`` (uncentred). Each batch's
``K^T K`` is a float32 product (keys cast to float32 whatever the model's dtype) added to a
float64 sum: as precise as a float64 product to ~1e-7 relative on these sizes, and many times
faster on hardware with slow float64. The forward pass stops at the highest requested key.

Cache: ``$ATTENTION_DRIFT_CACHE/stats/<model>/<corpus>/layer{L}_n{N}.safetensors`` (default
root ``~/.cache/attention_drift``, see :func:`~attention_drift.core.paths.cache_root`)
with a JSON of provenance beside it; sampled corpora are cached there too, so statistics
for another layer reuse the same text. A loaded matrix is also kept in memory for the session.

How many samples (``benchmarks/sweep_stats_samples.py``, ROME on SmolLM2-135M at layer 5,
10 development records, 5 CounterFact- and 5 WikiData-type, pooled over prompts, %):

    N sequences  efficacy  paraphrase  neighbourhood  relation
    (unedited)       30.0        20.0           44.4      66.7
    100             100.0        86.7           37.0       0.0
    300             100.0        86.7           37.0       0.0

Identical at 100 and 300 (1000 was not run: sampling it takes ~50 minutes on the shared
2-core machine); the presets use 300, whose sampled corpus ships with the package for the
offline models (:data:`~attention_drift.editing.corpus.SHIPPED_DIR`).
"""

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from attention_drift.editing.config import ConfigError, StatsConfig
from attention_drift.editing.corpus import OPENERS, SAMPLE_CHUNK, corpus_sequences, sample_corpus
from attention_drift.editing.fingerprints import model_key
from attention_drift.core.hooks import act_name
from attention_drift.core.models import model_device, n_layers
from attention_drift.core.paths import cache_dir, write_atomically

__all__ = [
    "OPENERS", "SAMPLE_CHUNK", "clear_memory_cache", "corpus_sequences", "inverse_second_moment",
    "key_second_moments", "model_key", "null_space_projection", "projection_path", "sample_corpus", "stats_path",
]
_MEMORY: dict[str, Tensor] = {}


def stats_path(model, layer: int, stats: StatsConfig) -> Path:
    return cache_dir("stats") / model_key(model) / stats.corpus_key / f"layer{layer}_n{stats.n_samples}.safetensors"


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

    write_atomically(path, lambda tmp: save_file(
        {"mom2": mom2.contiguous().cpu(), "count": torch.tensor([count], device="cpu")}, tmp))
    path.with_suffix(".json").write_text(json.dumps(provenance, indent=1))


class _Stop(Exception):
    """Raised by the hook of the highest key needed: nothing after it is computed."""


@torch.no_grad()
def _accumulate(
    model, sequences: list[list[int]], layers: list[int], batch_size: int, progress: bool
) -> tuple[dict[int, Tensor], int]:
    device = model_device(model)
    d_mlp = int(model.cfg.d_mlp)
    sums = {layer: torch.zeros(d_mlp, d_mlp, dtype=torch.float64, device=device) for layer in layers}
    keep = torch.zeros(0, dtype=torch.bool)

    def take(layer):
        def fn(act, hook):
            keys = act[keep].float()
            sums[layer] += (keys.T @ keys).double()
            if layer == max(layers):
                raise _Stop
        return fn

    count = 0
    pad = model.tokenizer.pad_token_id or 0
    bar = tqdm(total=sum(len(s) for s in sequences), desc="key statistics", unit="tok", disable=not progress)
    with model.hooks(fwd_hooks=[(act_name("mlp_post", layer), take(layer)) for layer in layers]):
        for i in range(0, len(sequences), batch_size):
            chunk = sequences[i:i + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            keep = mask.bool().to(device)
            try:
                model(ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except _Stop:
                pass
            count += int(mask.sum())
            bar.update(int(mask.sum()))
    bar.close()
    return {layer: (s / max(count, 1)).float() for layer, s in sums.items()}, count


def clear_memory_cache() -> None:
    """Forget matrices loaded or computed in this session (the disk cache stays)."""
    _MEMORY.clear()
    _INVERSES.clear()
    _PROJECTIONS.clear()


_INVERSES: dict[str, Tensor] = {}


def inverse_second_moment(model, layer: int, stats: StatsConfig, *, progress: bool = True) -> Tensor:
    """``C^-1`` (float64) of :func:`key_second_moments` for one layer, kept in memory."""
    key = str(stats_path(model, layer, stats))
    if key not in _INVERSES:
        mom2 = key_second_moments(model, [layer], stats, progress=progress)[layer]
        _INVERSES[key] = torch.linalg.inv(mom2.double())
    return _INVERSES[key]


_PROJECTIONS: dict[str, Tensor] = {}


def projection_path(model, layer: int, stats: StatsConfig, threshold: float) -> Path:
    """Where :func:`null_space_projection` keeps ``P``: beside the statistics it comes from."""
    path = stats_path(model, layer, stats)
    return path.with_name(f"{path.stem}_null{float(threshold)!r}.safetensors")


def null_space_projection(
    model, layer: int, stats: StatsConfig, threshold: float, *, progress: bool = True
) -> Float[Tensor, "d_mlp d_mlp"]:
    """AlphaEdit's ``P = U_hat U_hat^T`` (float64) for one layer, cached on disk and in memory.

    ``U_hat`` are the eigenvectors of :func:`key_second_moments`'s ``C`` whose eigenvalues are
    below ``threshold`` (``torch.linalg.eigh`` of ``C`` in float64; ``P`` is made exactly
    symmetric). Stored at :func:`projection_path` with the eigenvalues and a sha256 of the ``C``
    it came from; a file made from other statistics is recomputed. A loaded ``P`` is bitwise
    the ``P`` that was computed and saved.
    """
    import hashlib

    if not threshold > 0:
        raise ConfigError(f"the null-space threshold must be > 0, got {threshold}")
    path = projection_path(model, layer, stats, threshold)
    if str(path) in _PROJECTIONS:
        return _PROJECTIONS[str(path)]
    mom2 = key_second_moments(model, [layer], stats, progress=progress)[layer]
    source = hashlib.sha256(mom2.detach().contiguous().cpu().numpy().tobytes()).hexdigest()
    device = model_device(model)
    if path.exists():
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("source") == source:
                return _PROJECTIONS.setdefault(str(path), f.get_tensor("projection").to(device))
    evals, evecs = torch.linalg.eigh(mom2.double().cpu())
    null = evecs[:, evals < threshold]
    proj = null @ null.T
    proj = (proj + proj.T) / 2
    from safetensors.torch import save_file

    write_atomically(path, lambda tmp: save_file(
        {"projection": proj.contiguous(), "eigenvalues": evals.contiguous()}, tmp, metadata={"source": source}))
    path.with_suffix(".json").write_text(json.dumps({
        "model_key": model_key(model), "layer": layer, "threshold": float(threshold),
        "null_dim": int(null.shape[1]), "d_mlp": int(mom2.shape[0]),
        "eigenvalue_min": evals[0].item(), "eigenvalue_max": evals[-1].item(),
        "statistics": str(stats_path(model, layer, stats)), "statistics_sha256": source,
    }, indent=1))
    return _PROJECTIONS.setdefault(str(path), proj.to(device))

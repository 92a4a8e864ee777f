"""The text the key statistics are averaged over, as token sequences.

Corpora (:class:`~attention_drift.editing.config.StatsConfig.corpus`):

* ``"model"``: ``n_samples`` sequences of ``seq_len`` tokens sampled from the model itself
  (:func:`sample_corpus`). Works offline; the model's own text stands in for Wikipedia.
* local text files: each blank-line separated paragraph is one sample (truncated).
* ``"wikitext"`` / ``"wikipedia"``: the Hugging Face datasets (needs internet and the
  ``datasets`` package), as the original methods.

Shipped corpora: sampling 300 x 128 tokens takes minutes on a CPU, so the sampled corpus of
the offline presets is shipped in ``attention_drift/corpora`` (made once by
``benchmarks/make_stats_corpus.py``). It is used only where it holds exactly the ids the
sampler would produce: same weights (:func:`~attention_drift.editing.fingerprints.embedding_fingerprint`,
so the same checkpoint in another dtype samples its own), same tokenizer
(:func:`~attention_drift.editing.fingerprints.tokenizer_fingerprint`), seed, ``seq_len`` and
sampler layout. Corpora of N sequences are prefixes of larger ones (see
:func:`sample_corpus`), so smaller requests take its first N and larger ones sample only the
sequences after it.
"""

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from attention_drift.core import tokens
from attention_drift.editing.fingerprints import embedding_fingerprint, model_key, tokenizer_fingerprint
from attention_drift.core.paths import cache_dir, write_atomically
from attention_drift.editing.config import ConfigError, StatsConfig
from attention_drift.editing.sampling import sample_tokens

SAMPLE_CHUNK = 32
OPENERS = ("The", "In", "A", "It", "This", "He", "She", "When", "After", "There", "We", "One")
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "corpora"
FORMAT = "attention_drift.corpus/1"


def sampler_id() -> str:
    """Names the sampler's layout (chunk size, opening words, seeding); part of a shipped
    corpus's identity, so a changed sampler never reads an old file."""
    text = json.dumps([SAMPLE_CHUNK, OPENERS, "seed*1000003+chunk", "temperature1"])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def corpus_sequences(model, stats: StatsConfig, *, progress: bool = True) -> list[list[int]]:
    """The corpus as token sequences (BOS where the model expects one, at most ``seq_len`` long)."""
    if stats.corpus == "model":
        return sample_corpus(model, stats, progress=progress)
    if isinstance(stats.corpus, tuple):
        return _file_corpus(model, stats)
    return _hf_corpus(model, stats, progress=progress)


def sample_corpus(model, stats: StatsConfig, *, progress: bool = True) -> list[list[int]]:
    """``n_samples`` token sequences of ``seq_len`` tokens sampled from ``model``.

    Sequences are generated in chunks of ``SAMPLE_CHUNK``; chunk ``c`` starts every row
    with the opening word ``OPENERS[c % len(OPENERS)]`` (through
    :func:`~attention_drift.core.tokens.encode`) and continues by ancestral sampling at
    temperature 1 with a generator seeded by ``(seed, c)``. Chunks are independent, so the
    corpus of N sequences is the first N of any larger one (for the same weights, dtype and
    numerics). The longest known prefix is taken from a shipped corpus or one cached on
    disk, and only the chunks after it are sampled; the result is cached on disk.
    """
    folder = cache_dir("stats") / model_key(model) / stats.corpus_key
    rows = _longest_prefix(model, stats, folder)
    n_chunks = -(-stats.n_samples // SAMPLE_CHUNK)
    done = len(rows) // SAMPLE_CHUNK
    if done >= n_chunks:
        return rows[: stats.n_samples]
    rows = rows[: done * SAMPLE_CHUNK]
    bar = tqdm(total=(n_chunks - done) * SAMPLE_CHUNK * stats.seq_len, desc="sampling corpus", unit="tok",
               disable=not progress)
    for chunk in range(done, n_chunks):
        rows.extend(sample_chunk(model, stats, chunk))
        bar.update(SAMPLE_CHUNK * stats.seq_len)
    bar.close()
    from safetensors.torch import save_file

    write_atomically(folder / f"corpus_n{len(rows)}.safetensors",
                     lambda tmp: save_file({"ids": torch.tensor(rows, dtype=torch.int32).contiguous()}, tmp))
    return rows[: stats.n_samples]


def sample_chunk(model, stats: StatsConfig, chunk: int) -> list[list[int]]:
    """Chunk ``chunk`` of the sampled corpus: ``SAMPLE_CHUNK`` sequences of ``seq_len`` tokens."""
    generator = torch.Generator().manual_seed(stats.seed * 1_000_003 + chunk)
    prefix = tokens.encode(model, OPENERS[chunk % len(OPENERS)])[: stats.seq_len]
    return sample_tokens(model, prefix, SAMPLE_CHUNK, stats.seq_len, generator)


def _longest_prefix(model, stats: StatsConfig, folder: Path) -> list[list[int]]:
    best = shipped_corpus(model, stats) or []
    if folder.exists():
        for path in folder.glob("corpus_n*.safetensors"):
            n = path.stem.split("_n")[1]
            if n.isdigit() and int(n) > len(best):
                from safetensors.torch import load_file

                best = load_file(path)["ids"].tolist()
    return best


def corpus_metadata(model, stats: StatsConfig, n_sequences: int) -> dict[str, str]:
    """What a shipped corpus file must record to be used for ``model`` and ``stats``."""
    return {
        "format": FORMAT,
        "model": str(getattr(model, "model_name", "")),
        "weights": embedding_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(model),
        "vocab_size": str(len(model.tokenizer)),
        "sampler": sampler_id(),
        "seed": str(stats.seed),
        "seq_len": str(stats.seq_len),
        "n_sequences": str(n_sequences),
    }


def write_corpus_file(model, stats: StatsConfig, rows: list[list[int]], path: str | os.PathLike) -> Path:
    """Write sampled ``rows`` as a shippable corpus (uint16 ids when the vocabulary fits)."""
    if not rows or any(len(r) != stats.seq_len for r in rows) or len(rows) % SAMPLE_CHUNK:
        raise ConfigError(
            f"a shipped corpus holds whole chunks of {SAMPLE_CHUNK} sequences of seq_len={stats.seq_len} "
            f"tokens; got {len(rows)} rows"
        )
    from safetensors.numpy import save_file

    dtype = np.uint16 if len(model.tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"ids": np.asarray(rows, dtype=dtype)}, str(path), metadata=corpus_metadata(model, stats, len(rows)))
    return path


def shipped_corpus(model, stats: StatsConfig, folder: Path | None = None) -> list[list[int]] | None:
    """The rows of a shipped corpus (in ``folder``, default :data:`SHIPPED_DIR`) made by this
    sampler for ``model``'s weights and tokenizer with ``stats``'s seed and ``seq_len``; None
    when there is none."""
    folder = SHIPPED_DIR if folder is None else Path(folder)
    if stats.corpus != "model" or not folder.is_dir():
        return None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    wanted = None
    for path in files:
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("sampler") != sampler_id():
                continue
            if meta.get("seed") != str(stats.seed) or meta.get("seq_len") != str(stats.seq_len):
                continue
            if wanted is None:
                wanted = corpus_metadata(model, stats, 0)
            if any(meta.get(k) != wanted[k] for k in ("weights", "tokenizer", "vocab_size")):
                continue
            return handle.get_tensor("ids").astype(np.int64).tolist()
    return None


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

"""ROME's fluency measure: n-gram entropy of sampled generations (and perplexity), as the paper
reports it (FL), used by :func:`attention_drift.measure.evaluate.evaluate_record` and a sequence's monitor."""

import copy
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attention_drift.core import tokens
from attention_drift.core.scores import check_batch_size

@dataclass(frozen=True)
class FluencyConfig:
    """How fluency generations are sampled (defaults: the paper's / ROME's setting).

    Args:
        per_prompt: generations per generation prompt (CounterFact records have 10 prompts,
            so 1 gives the paper's 10 generations per record).
        max_prompts: use at most this many of the record's generation prompts (None: all).
        max_length: tokens per generation, prompt included (BOS included where the model uses it).
        top_k: sample from the k most likely tokens at each step (no temperature, no top-p).
        seed: torch seed for sampling; the same for every record so pre/post runs are paired.
        batch_size: generations sampled together.
    """

    per_prompt: int = 1
    max_prompts: int | None = None
    max_length: int = 100
    top_k: int = 5
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self):
        for name in ("per_prompt", "max_length", "top_k", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FluencyConfig.{name} must be a positive integer, got {value!r}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"FluencyConfig.max_prompts must be None or >= 1, got {self.max_prompts!r}")

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("per_prompt", "max_prompts", "max_length", "top_k", "seed")}


@dataclass(frozen=True)
class FluencyScores:
    """Generated texts (prompt included) and the n-gram entropy (bits) of each."""

    texts: tuple[str, ...]
    ngram_entropy: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.ngram_entropy) / len(self.ngram_entropy) if self.ngram_entropy else math.nan

    def to_json(self) -> dict:
        return {"ngram_entropy": list(self.ngram_entropy), "texts": list(self.texts)}

    @classmethod
    def from_json(cls, obj: dict) -> "FluencyScores":
        return cls(tuple(obj.get("texts", ())), tuple(float(x) for x in obj["ngram_entropy"]))




_WORD = re.compile(r"\w+|[^\w\s]")


def _words(text: str) -> list[str]:
    """Words and single punctuation marks, approximating ``nltk.word_tokenize`` without nltk
    (they differ on contractions, quotes and runs of punctuation)."""
    return _WORD.findall(text)


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME's ``compute_n_gram_entropy`` (the paper's fluency, FL, before the x100).

    For each n, the Shannon entropy in bits of the frequency distribution of the text's word
    n-grams; the result is the arithmetic mean of ``weight_n * H_n`` (defaults: 2- and
    3-grams weighted 2/3 and 4/3, i.e. H2/3 + 2*H3/3). A text with no n-grams of some n
    contributes 0 for that n, as in ROME.
    """
    if len(ns) != len(weights) or not ns:
        raise ValueError(f"ns and weights must be non-empty and of equal length, got {ns} and {weights}")
    words = _words(text)
    terms = []
    for n, weight in zip(ns, weights):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        terms.append(weight * entropy)
    return sum(terms) / len(terms)


def _generation_model(model):
    """A plain Hugging Face model that shares every parameter and buffer with the bridge.

    The bridge's own key-value cache gives wrong continuations after the first generated token
    (checked on SmolLM2 with transformer-lens 4.3), so sampling runs on this clone, built on the
    meta device and filled with the bridge's tensors (no copy): it sees the current, possibly
    edited weights, but not hooks attached to the bridge.
    """
    from transformers import AutoModelForCausalLM

    source = model.original_model
    with torch.device("meta"):
        clone = AutoModelForCausalLM.from_config(copy.deepcopy(source.config))
    tensors: dict[str, Tensor] = {}
    named = list(source.named_parameters(remove_duplicate=False)) + list(source.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        tensors.setdefault(name.replace("._original_component", ""), tensor)
    for name, _ in list(clone.named_parameters(remove_duplicate=False)) + list(clone.named_buffers(remove_duplicate=False)):
        if name not in tensors:
            raise RuntimeError(f"cannot map {name!r} of the Hugging Face model onto the bridge's tensors")
        owner, _, leaf = name.rpartition(".")
        module = clone.get_submodule(owner)
        slot = module._parameters if leaf in module._parameters else module._buffers
        slot[leaf] = tensors[name]
    return clone.eval()


@torch.no_grad()
def _generate_ids(model, prompts: Sequence[str], config: FluencyConfig) -> list[list[int]]:
    """Token ids of the sampled texts, prompt included, each ``config.max_length`` long."""
    rows = [tokens.encode(model, p) for p in prompts for _ in range(config.per_prompt)]
    if not rows:
        return []
    tokenizer = model.tokenizer
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    clone = _generation_model(model)
    out: list[list[int]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for start in range(0, len(rows), config.batch_size):
            chunk = rows[start : start + config.batch_size]
            width = max(len(r) for r in chunk)
            new = config.max_length - min(len(r) for r in chunk)
            if new <= 0:
                out += [r[: config.max_length] for r in chunk]
                continue
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in chunk])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk])
            generated = clone.generate(
                ids, attention_mask=mask, do_sample=True, top_k=config.top_k, top_p=1.0, temperature=1.0,
                repetition_penalty=1.0, max_new_tokens=new, eos_token_id=None, pad_token_id=pad,
            )
            out += [g[width - len(r) :][: config.max_length].tolist() for r, g in zip(chunk, generated)]
    return out


def generate_texts(model, prompts: Sequence[str], config: FluencyConfig = FluencyConfig()) -> list[str]:
    """Sample ``config.per_prompt`` texts per prompt with top-k sampling, as ROME's fluency test.

    Each text is ``config.max_length`` tokens long, prompt included (generation never stops at
    EOS, like ROME's ``generate_fast``), decoded without special tokens. Seeded with
    ``config.seed`` without touching the global random state. Texts of one prompt are
    consecutive.
    """
    return [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in _generate_ids(model, prompts, config)]


@torch.no_grad()
def perplexity(model, texts: Sequence[str], *, batch_size: int = 8) -> float:
    """Perplexity of ``texts``: exp of the mean negative log-likelihood over all predicted tokens
    of all texts pooled (every token after the first of each text, BOS where the model uses it)."""
    check_batch_size(batch_size)
    if not texts:
        raise ValueError("perplexity needs at least one text")
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch = tokens.batch_prompts(model, list(texts[start : start + batch_size]))
        logits = model(batch.input_ids, attention_mask=batch.attention_mask)
        log_probs = logits[:, :-1].float().log_softmax(-1)
        token_lp = log_probs.gather(-1, batch.input_ids[:, 1:, None])[..., 0]
        valid = batch.attention_mask[:, 1:].bool()
        total -= float(token_lp[valid].sum())
        count += int(valid.sum())
    if count == 0:
        raise ValueError("texts are too short: perplexity needs at least one text of two or more tokens")
    return math.exp(total / count)

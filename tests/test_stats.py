"""Covariance statistics of the MLP keys: formula, cache, corpora."""

import json

import pytest
import torch

from attention_drift import tokens
from attention_drift.editing import ConfigError, StatsConfig
from attention_drift.editing import stats as stats_mod
from attention_drift.editing.templates import sample_tokens

TEXT = "\n\n".join(
    [
        "The Eiffel Tower is located in the city of Paris.",
        "Michael Jordan plays basketball. Lionel Messi plays soccer.",
        "Toyota is headquartered in Japan.",
        "Danielle Darrieux's mother tongue is French.",
    ]
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path / "cache"))
    stats_mod.clear_memory_cache()


def test_second_moment_formula_and_disk_cache(tiny_llama, tmp_path, monkeypatch):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    cfg = StatsConfig(corpus=(str(path),), n_samples=4, seq_len=8, batch_size=3)
    moments = stats_mod.key_second_moments(tiny_llama, [0, 1], cfg, progress=False)
    # By hand: every token of every (truncated) paragraph, one at a time.
    keys = {0: [], 1: []}
    for paragraph in TEXT.split("\n\n"):
        ids = torch.tensor([tokens.encode(tiny_llama, paragraph)[:8]])
        _, cache = tiny_llama.run_with_cache(ids)
        for layer in keys:
            keys[layer].append(cache[f"blocks.{layer}.mlp.hook_post"][0])
    for layer, parts in keys.items():
        k = torch.cat(parts).double()
        expected = (k.T @ k / len(k)).float()
        assert moments[layer].dtype == torch.float32
        assert torch.allclose(moments[layer], expected, atol=1e-6, rtol=1e-5)
    saved = stats_mod.stats_path(tiny_llama, 1, cfg)
    provenance = json.loads(saved.with_suffix(".json").read_text())
    assert provenance["tokens"] == sum(len(p) for p in keys[1]) and provenance["layer"] == 1
    # Second call: read from disk, nothing recomputed.
    stats_mod.clear_memory_cache()
    monkeypatch.setattr(stats_mod, "_accumulate", lambda *a, **k: pytest.fail("recomputed"))
    again = stats_mod.key_second_moments(tiny_llama, [1], cfg, progress=False)
    assert torch.equal(again[1], moments[1])


def test_sampled_corpus_is_seeded_and_smaller_corpora_are_prefixes(tiny_llama):
    cfg = StatsConfig(n_samples=40, seq_len=6)
    big = stats_mod.sample_corpus(tiny_llama, cfg, progress=False)
    assert len(big) == 40 and all(len(s) == 6 for s in big)
    small = stats_mod.sample_corpus(tiny_llama, StatsConfig(n_samples=10, seq_len=6), progress=False)
    assert small == big[:10]
    stats_mod.clear_memory_cache()
    for p in stats_mod.cache_root().rglob("corpus_*"):
        p.unlink()
    assert stats_mod.sample_corpus(tiny_llama, StatsConfig(n_samples=10, seq_len=6), progress=False) == small
    other_seed = stats_mod.sample_corpus(tiny_llama, StatsConfig(n_samples=10, seq_len=6, seed=1), progress=False)
    assert other_seed != small


def test_cached_sampling_matches_full_forward_sampling(tiny_llama):
    """The KV cache really holds the context (with transformers 5 it would stay empty unaided)."""
    generated = sample_tokens(tiny_llama, [5, 9], 3, 12, torch.Generator().manual_seed(3), top_k=5)
    generator = torch.Generator().manual_seed(3)
    ids = torch.tensor([[5, 9]] * 3)
    with torch.no_grad():
        while ids.shape[1] < 12:
            logits = tiny_llama(ids)[:, -1].float()
            values, indices = logits.topk(5, dim=-1)
            choice = torch.multinomial(torch.softmax(values, -1), 1, generator=generator)
            ids = torch.cat([ids, indices.gather(-1, choice)], dim=1)
    assert generated == ids.tolist()


def test_bad_corpora_are_clear_errors(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="unknown stats corpus"):
        StatsConfig(corpus="wiki")
    with pytest.raises(ConfigError, match="does not exist"):
        stats_mod.key_second_moments(tiny_llama, [0], StatsConfig(corpus=(str(tmp_path / "nope.txt"),)))
    with pytest.raises(ConfigError, match="out of range"):
        stats_mod.key_second_moments(tiny_llama, [5], StatsConfig())

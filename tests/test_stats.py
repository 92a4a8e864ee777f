"""Covariance statistics of the MLP keys: formula, cache, corpora."""

import json

import pytest

from attention_drift.core.paths import cache_dir
import torch

from attention_drift.core import tokens
from attention_drift.editing import ConfigError, StatsConfig
from attention_drift.editing import stats as stats_mod
from attention_drift.editing.sampling import sample_tokens

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
    for p in cache_dir("stats").rglob("corpus_*"):
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


def _keys_by_hand(model, sequences, layer):
    """Every key of every sequence, one sequence at a time with a full forward."""
    keys = []
    for seq in sequences:
        _, cache = model.run_with_cache(torch.tensor([seq]))
        keys.append(cache[f"blocks.{layer}.mlp.hook_post"][0])
    return keys


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_float32_products_in_float64_sums_match_float64_statistics(arch):
    """Each batch's K^T K is a float32 product added to a float64 sum: within 1e-6 (relative) of
    the all-float64 statistics, and exactly the float32-product / float64-sum of those batches."""
    from attention_drift.core.models import tiny_model

    model = tiny_model(arch)
    cfg = StatsConfig(n_samples=32, seq_len=12, batch_size=8)
    moments = stats_mod.key_second_moments(model, [0, 1], cfg, progress=False)
    sequences = stats_mod.corpus_sequences(model, cfg, progress=False)
    for layer in (0, 1):
        keys = _keys_by_hand(model, sequences, layer)
        k64 = torch.cat(keys).double()
        reference = k64.T @ k64 / len(k64)
        error = (moments[layer].double() - reference).norm() / reference.norm()
        assert error < 1e-6, error
        diag = moments[layer].diagonal().double() / reference.diagonal()
        assert torch.allclose(diag, torch.ones_like(diag), atol=1e-6)
        sums = torch.zeros_like(reference)
        for i in range(0, len(keys), cfg.batch_size):
            k = torch.cat(keys[i:i + cfg.batch_size]).float()
            sums += (k.T @ k).double()
        assert torch.allclose(moments[layer], (sums / len(k64)).float(), atol=1e-7, rtol=1e-6)


def test_key_pass_stops_at_the_highest_key(tiny_llama, tmp_path):
    """Statistics of layer 0 never run block 1 nor the unembedding; the model is intact after."""
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    ran = []
    handles = [tiny_llama.blocks[1].register_forward_pre_hook(lambda *a: ran.append("block 1")),
               tiny_llama.unembed.register_forward_pre_hook(lambda *a: ran.append("unembed"))]
    try:
        moments = stats_mod.key_second_moments(tiny_llama, [0], StatsConfig(corpus=(str(path),), n_samples=4),
                                               progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert ran == [] and moments[0].abs().sum() > 0
    batch = tokens.batch_prompts(tiny_llama, ["The Eiffel Tower is in"])
    with torch.no_grad():
        logits = tiny_llama(batch.input_ids)
        hf_logits = tiny_llama.original_model(batch.input_ids).logits
    torch.testing.assert_close(logits, hf_logits)
    assert not tiny_llama.hook_dict["blocks.0.mlp.hook_post"].fwd_hooks


def test_bfloat16_model_gives_float32_statistics():
    from attention_drift.core.models import tiny_model

    model = tiny_model("llama", dtype=torch.bfloat16)
    moments = stats_mod.key_second_moments(model, [1], StatsConfig(n_samples=32, seq_len=8), progress=False)
    assert moments[1].dtype == torch.float32 and torch.isfinite(moments[1]).all()
    assert torch.linalg.eigvalsh(moments[1].double()).min() > -1e-6

"""The statistics corpus: shipped sampled corpora are used exactly where sampling would give
the same ids, and then nothing is sampled."""

import dataclasses

import numpy as np
import pytest
import torch

from attention_drift.editing import ConfigError, StatsConfig
from attention_drift.editing import corpus as corpus_mod
from attention_drift.editing import stats as stats_mod

SMALL = StatsConfig(n_samples=64, seq_len=6)
PACKAGE_CORPORA = corpus_mod.SHIPPED_DIR


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(corpus_mod, "SHIPPED_DIR", tmp_path / "no-shipped")
    stats_mod.clear_memory_cache()


def _fresh_cache(tmp_path, monkeypatch, name):
    monkeypatch.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path / name))
    stats_mod.clear_memory_cache()


def _ship(model, tmp_path, monkeypatch, stats=SMALL):
    """Sample ``stats``'s corpus the ordinary way, ship it (same code path as the script) and
    point the package's corpus folder at it."""
    rows = corpus_mod.sample_corpus(model, stats, progress=False)
    shipped = tmp_path / "shipped"
    corpus_mod.write_corpus_file(model, stats, rows, shipped / "tiny.safetensors")
    monkeypatch.setattr(corpus_mod, "SHIPPED_DIR", shipped)
    return rows


def _no_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("sampled although the shipped corpus applies")

    monkeypatch.setattr(corpus_mod, "sample_tokens", refuse)


def test_shipped_corpus_gives_the_sampled_statistics_without_sampling(tiny_llama, tmp_path, monkeypatch):
    for n in (64, 40):  # the whole file, and its first n (a smaller corpus is a prefix)
        cfg = dataclasses.replace(SMALL, n_samples=n)
        _fresh_cache(tmp_path, monkeypatch, f"sampled{n}")
        stats_mod.key_second_moments(tiny_llama, [0, 1], cfg, progress=False)
    _ship(tiny_llama, tmp_path, monkeypatch)
    _no_sampling(monkeypatch)
    for n in (64, 40):
        cfg = dataclasses.replace(SMALL, n_samples=n)
        _fresh_cache(tmp_path, monkeypatch, f"shipped{n}")
        shipped = stats_mod.key_second_moments(tiny_llama, [0, 1], cfg, progress=False)
        _fresh_cache(tmp_path, monkeypatch, f"sampled{n}")
        sampled = stats_mod.key_second_moments(tiny_llama, [0, 1], cfg, progress=False)  # from its disk cache
        for layer in (0, 1):
            assert torch.equal(shipped[layer], sampled[layer])


def test_larger_requests_sample_only_after_the_shipped_prefix(tiny_llama, tmp_path, monkeypatch):
    big = dataclasses.replace(SMALL, n_samples=96)
    everything = corpus_mod.sample_corpus(tiny_llama, big, progress=False)
    _fresh_cache(tmp_path, monkeypatch, "second")
    _ship(tiny_llama, tmp_path, monkeypatch)
    _fresh_cache(tmp_path, monkeypatch, "third")
    chunks = []
    original = corpus_mod.sample_chunk
    monkeypatch.setattr(corpus_mod, "sample_chunk", lambda m, s, c: chunks.append(c) or original(m, s, c))
    assert corpus_mod.sample_corpus(tiny_llama, big, progress=False) == everything
    assert chunks == [2]  # chunks 0 and 1 come from the shipped file


def test_shipped_corpus_must_match_weights_tokenizer_seed_length_and_sampler(tiny_llama, tmp_path, monkeypatch):
    rows = _ship(tiny_llama, tmp_path, monkeypatch)
    assert corpus_mod.shipped_corpus(tiny_llama, SMALL) == rows
    assert corpus_mod.shipped_corpus(tiny_llama, dataclasses.replace(SMALL, n_samples=1000)) == rows
    assert corpus_mod.shipped_corpus(tiny_llama, dataclasses.replace(SMALL, seed=1)) is None
    assert corpus_mod.shipped_corpus(tiny_llama, dataclasses.replace(SMALL, seq_len=7)) is None
    assert corpus_mod.shipped_corpus(tiny_llama, StatsConfig(corpus="wikitext", seq_len=6)) is None
    from attention_drift.core.models import tiny_model

    other_weights = tiny_model("llama", seed=1)
    other_weights.model_name = tiny_llama.model_name
    assert corpus_mod.shipped_corpus(other_weights, SMALL) is None
    bf16 = tiny_model("llama", dtype=torch.bfloat16)
    assert corpus_mod.shipped_corpus(bf16, SMALL) is None  # a bfloat16 model samples other text
    openers = corpus_mod.OPENERS
    monkeypatch.setattr(corpus_mod, "OPENERS", ("Once",) + openers[1:])
    assert corpus_mod.shipped_corpus(tiny_llama, SMALL) is None
    monkeypatch.setattr(corpus_mod, "OPENERS", openers)
    assert corpus_mod.shipped_corpus(tiny_llama, SMALL) == rows
    tiny_llama.tokenizer.add_tokens(["qqzzy"])
    assert corpus_mod.shipped_corpus(tiny_llama, SMALL) is None


def test_corpus_file_is_compact_and_whole_chunks(tiny_llama, tmp_path):
    rows = corpus_mod.sample_corpus(tiny_llama, SMALL, progress=False)
    path = corpus_mod.write_corpus_file(tiny_llama, SMALL, rows, tmp_path / "c.safetensors")
    from safetensors.numpy import load_file

    assert load_file(str(path))["ids"].dtype == np.uint16
    assert path.stat().st_size < len(rows) * SMALL.seq_len * 2 + 2000
    with pytest.raises(ConfigError, match="whole chunks"):
        corpus_mod.write_corpus_file(tiny_llama, SMALL, rows[:40], tmp_path / "d.safetensors")


def test_shipped_smollm2_corpus_is_package_data():
    """The offline preset's corpus ships with the package (checked without loading the model)."""
    from safetensors import safe_open

    path = PACKAGE_CORPORA / "smollm2-135m-seed0-len128.safetensors"
    with safe_open(str(path), framework="numpy") as handle:
        meta = handle.metadata()
        ids = handle.get_tensor("ids")
    defaults = StatsConfig()
    assert ids.dtype == np.uint16 and ids.shape == (320, defaults.seq_len)
    assert meta["seed"] == str(defaults.seed) and meta["seq_len"] == str(defaults.seq_len)
    assert meta["sampler"] == corpus_mod.sampler_id() and meta["vocab_size"] == "49152"
    assert int(ids.max()) < 49152


@pytest.mark.slow
def test_smollm2_first_statistics_read_the_shipped_corpus(smollm2, monkeypatch):
    monkeypatch.setattr(corpus_mod, "SHIPPED_DIR", PACKAGE_CORPORA)
    _no_sampling(monkeypatch)
    rows = corpus_mod.sample_corpus(smollm2, StatsConfig(), progress=False)
    assert len(rows) == 300 and all(len(r) == 128 for r in rows)
    assert smollm2.tokenizer.decode(rows[0][:1]) == "The"

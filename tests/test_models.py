import pytest
import torch

from attention_drift.core import models, tokens
from attention_drift.core.models import ModelLoadError


def test_tiny_models_expose_legacy_hook_names(tiny_llama, tiny_gpt2):
    for model in (tiny_llama, tiny_gpt2):
        batch = tokens.batch_prompts(model, ["The Eiffel Tower is in Paris"])
        _, cache = model.run_with_cache(batch.input_ids)
        n = batch.input_ids.shape[1]
        assert cache["blocks.0.attn.hook_pattern"].shape == (1, model.cfg.n_heads, n, n)
        assert cache["blocks.1.hook_resid_post"].shape == (1, n, model.cfg.d_model)
        for name in ("hook_mlp_out", "hook_attn_out", "hook_resid_pre", "hook_resid_mid", "attn.hook_z", "mlp.hook_post"):
            assert f"blocks.0.{name}" in cache


def test_bridge_keeps_raw_hf_weights(tiny_llama):
    """No weight processing: the bridge's MLP output weight IS the HF parameter."""
    hf_weight = tiny_llama.original_model.model.layers[1].mlp.down_proj.weight
    assert models.mlp_out_weight(tiny_llama, 1) is hf_weight
    batch = tokens.batch_prompts(tiny_llama, ["Toyota is headquartered in"])
    with torch.no_grad():
        bridge_logits = tiny_llama(batch.input_ids)
        hf_logits = tiny_llama.original_model(batch.input_ids).logits
    torch.testing.assert_close(bridge_logits, hf_logits, atol=1e-5, rtol=1e-5)


def test_mlp_out_layout(tiny_llama, tiny_gpt2):
    assert not models.mlp_out_is_conv1d(tiny_llama)
    assert models.mlp_out_weight(tiny_llama, 0).shape == (tiny_llama.cfg.d_model, tiny_llama.cfg.d_mlp)
    assert models.mlp_out_is_conv1d(tiny_gpt2)
    assert models.mlp_out_weight(tiny_gpt2, 0).shape == (tiny_gpt2.cfg.d_mlp, tiny_gpt2.cfg.d_model)
    with pytest.raises(ValueError, match="out of range"):
        models.mlp_out_weight(tiny_llama, 2)


def test_parameters_are_frozen_and_model_in_eval(tiny_llama):
    assert not any(p.requires_grad for p in tiny_llama.parameters())
    assert not tiny_llama.training


@pytest.mark.parametrize("bad", ["./no/such/folder", "/definitely/missing.gguf"])
def test_bad_paths_raise_clear_errors(bad):
    with pytest.raises(ModelLoadError):
        models.load_model(bad)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        models.load_model(tmp_path)


def test_unknown_offline_name_is_rejected(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="offline models"):
        models.load_model("no-such-model")


@pytest.mark.slow
def test_smollm2_knows_facts(smollm2):
    """The offline default model is a real model: it completes well-known facts."""
    batch = tokens.batch_prompts(smollm2, ["The Eiffel Tower is located in the city of"])
    with torch.no_grad():
        probs = smollm2(batch.input_ids)[0, -1].softmax(-1)
    assert smollm2.tokenizer.decode(probs.argmax()) == " Paris"
    assert probs.max() > 0.5
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.n_heads == 9
    assert smollm2.cfg.default_prepend_bos is False


def test_dtype_by_object_or_name_and_bad_dtypes_are_clear_errors():
    assert models.resolve_dtype(torch.bfloat16) is torch.bfloat16
    assert models.resolve_dtype("bf16") is torch.bfloat16 and models.resolve_dtype("torch.float16") is torch.float16
    for bad in (torch.int8, "float8", torch.float64):
        with pytest.raises(ModelLoadError, match="unsupported model dtype"):
            models.resolve_dtype(bad)


def test_bfloat16_model_holds_bfloat16_weights_and_close_logits():
    full = models.tiny_model("llama")
    half = models.tiny_model("llama", dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    batch = tokens.batch_prompts(full, ["The Eiffel Tower is in Paris"])
    with torch.no_grad():
        a, b = full(batch.input_ids), half(batch.input_ids).float()
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.05 * a.abs().max()
    assert torch.equal(half.blocks[0].mlp.out.weight, full.blocks[0].mlp.out.weight.to(torch.bfloat16))


@pytest.mark.slow
def test_gemma3_loads_offline_with_the_hooks_and_patterns_the_package_reads(gemma3):
    """Gemma-3-270M (a supported model): raw HF weights under the bridge, the legacy hook names at
    every layer, causal attention patterns whose rows sum to one, and a fact it knows."""
    from attention_drift.core.hooks import act_name

    assert models.model_family(gemma3) == "gemma3_text"
    assert (gemma3.cfg.n_layers, gemma3.cfg.d_model) == (18, 640)
    prompt = "The Eiffel Tower is located in the city of"
    batch = tokens.batch_prompts(gemma3, [prompt])
    n = batch.input_ids.shape[1]
    with torch.no_grad():
        logits, cache = gemma3.run_with_cache(batch.input_ids)
        hf_logits = gemma3.original_model(batch.input_ids).logits
    torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=1e-4)
    assert gemma3.tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
    for layer in range(gemma3.cfg.n_layers):
        pattern = cache[act_name("pattern", layer)]
        assert pattern.shape == (1, gemma3.cfg.n_heads, n, n)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(1, gemma3.cfg.n_heads, n), atol=1e-4, rtol=0)
        assert pattern[0].triu(1).abs().max() == 0  # causal
        for kind in ("mlp_post", "mlp_raw", "resid_post", "attn_raw", "rot_k", "v"):
            assert act_name(kind, layer) in cache
        assert models.mlp_out_weight(gemma3, layer) is gemma3.original_model.model.layers[layer].mlp.down_proj.weight

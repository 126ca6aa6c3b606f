# Source on the GPU machine: the image lacks msgspec/pyzmq/starlette/uvicorn/gguf/xgrammar;
# their wheels travel in the git-ignored .carry/whl (carry it with the device tool) and are
# installed into /tmp/site here; test models travel in .carry/models.
if [ -d .carry/whl ] && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .carry/whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD/.carry/py312:$PWD"
export HEADRACE_SHARED_MODELS="$PWD/.carry/models"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "${OUT:-/tmp}/gpu.txt" 2>&1
# The machine's copy of .git can be stale (it named an older commit once): benches record
# HEADRACE_COMMIT instead; pass it on the command line (HEADRACE_COMMIT=abc1234 bash ...).
export HEADRACE_COMMIT="${HEADRACE_COMMIT:-unrecorded}"

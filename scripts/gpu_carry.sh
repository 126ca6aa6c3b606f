#!/usr/bin/env bash
# Build the git-ignored .carry/ folder that a GPU call takes along (the device tool's `carry`):
#   .carry/whl     wheels for Python 3.12 of what the GPU image lacks (scripts/gpu_env.sh installs
#                  them into /tmp/site there), at the versions this checkout's venv runs;
#   .carry/models  the test models (a copy of ../shared/models: it does not travel by itself);
#   .carry/base    the baseline tree (git archive of BASE, default 3d6250b, the issues' base commit),
#                  for same-call baselines (HEADRACE_BASE_TREE=.carry/base).
# Usage, in the repo root on the CPU machine: bash scripts/gpu_carry.sh [BASE]
# Then carry [".carry"] and start the command with `source scripts/gpu_env.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-3d6250b}
py=${PYTHON:-python3}
# What the image lacks (the device tool's KINDS.md package list), and their needs it lacks too.
pkgs="msgspec pyzmq starlette uvicorn gguf xgrammar apache-tvm-ffi pydantic pydantic-core
annotated-types typing-inspection"
rm -rf .carry/whl && mkdir -p .carry/whl
for p in $pkgs; do
  v=$("$py" -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p')
  spec=$p${v:+==$v}
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d .carry/whl "$spec" 2>&1 | grep -v '^WARNING: Location' || true
  ls .carry/whl | grep -qi "^$(echo "$p" | tr - _)-" || { echo "no wheel for $spec" >&2; exit 1; }
done
rm -rf .carry/models && mkdir -p .carry/models
cp -r ../shared/models/. .carry/models/
rm -rf .carry/base && mkdir -p .carry/base
git archive "$base" | tar -x -C .carry/base
du -sh .carry/whl .carry/models .carry/base
echo "carry: [\".carry\"] (64 MiB a call in all, with the working tree)"

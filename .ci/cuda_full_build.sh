#!/usr/bin/env bash
# Build and link the whole extension WITH CUDA on a machine without a GPU: a throwaway venv gets the
# CUDA build of torch from the registry (its pip nvidia-* packages supply the CUDA headers and
# libnvrtc that a bare nvcc toolkit lacks; CMakeLists.txt picks them up), then CMake builds _C for
# sm_80 and sm_90a and the module is imported (CPU ops of that build run). Takes ~3-4 min on
# 2 cores, most of it the torch download. Usage: .ci/cuda_full_build.sh [torch version]
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version="${1:-2.14.1}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "torch==$torch_version" numpy
"$work/venv/bin/python" -c "import torch; assert torch.version.cuda, 'expected a CUDA build of torch'; print('torch', torch.__version__)"
TORCH_CUDA_ARCH_LIST="8.0;9.0a" cmake -S . -B "$work/build" -DPython_EXECUTABLE="$work/venv/bin/python" \
  -DSPALLM_WITH_CUDA=ON -DSPALLM_OUTPUT_DIR="$work/build/out" $(command -v ninja >/dev/null && echo -GNinja) > "$work/configure.log" \
  || { tail -30 "$work/configure.log"; exit 1; }
cmake --build "$work/build" --parallel "${MAX_JOBS:-2}"
"$work/venv/bin/python" - "$work/build/out" <<'PY'
import sys, torch
sys.path.insert(0, sys.argv[1])
import _C
info = _C.build_info()
assert info["cuda"], info
codes = torch.tensor([[0x1F, 0x2E]], dtype=torch.uint8)
w = torch.ops.spallm.lut_decode(codes, torch.arange(32.0).view(1, 2, 16))
assert w.tolist() == [[1.0, 15.0, 18.0, 30.0]], w
# The CUDA build's dispatch thresholds can be set (a CPU-only build refuses), and out of range is refused.
assert _C.set_cuda_threshold("direct_max_tokens", 4) == "", _C.cuda_thresholds()
assert dict((r[0], r[1]) for r in _C.cuda_thresholds())["direct_max_tokens"] == 4
assert _C.set_cuda_threshold("regs_max_tokens", 33) == "value out of range"
print("CUDA build links and loads:", info)
PY

#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with plain nvcc (no torch, no GPU needed) for the archs we ship.
# The .cu files include only CUDA headers, csrc/codes.h and csrc/cuda/*; this keeps them that way.
# Usage: .ci/cuda_compile_check.sh   (NVCC=/path/to/nvcc and ARCHS="80 90a" override the defaults)
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
ARCHS="${ARCHS:-80 90a}"
[[ -x "$NVCC" ]] || { echo "cuda_compile_check: no nvcc (set NVCC=...)" >&2; exit 1; }

gencode=()
for a in $ARCHS; do gencode+=(-gencode "arch=compute_${a},code=sm_${a}"); done

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
echo "cuda_compile_check: $("$NVCC" --version | tail -1), archs: $ARCHS"
shopt -s nullglob
files=(csrc/cuda/*.cu)
(( ${#files[@]} )) || { echo "cuda_compile_check: no .cu files under csrc/cuda" >&2; exit 1; }
status=0
for f in "${files[@]}"; do
  start=$SECONDS
  if "$NVCC" -std=c++17 -Icsrc -O3 --expt-relaxed-constexpr -Werror all-warnings "${gencode[@]}" \
      -c "$f" -o "$out/$(basename "$f").o"; then
    echo "  ok    $f ($((SECONDS - start)) s)"
  else
    echo "  FAIL  $f" >&2
    status=1
  fi
done
exit $status

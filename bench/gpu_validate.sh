#!/usr/bin/env bash
# One full validation on the GPU machine (see ../shared/notes/gpu.md): build with CUDA, run the
# whole test suite, compute-sanitizer (memcheck + racecheck) on the CUDA tests, then benchmarks.
# Everything goes to $OUT (logs + JSON).
# Usage: bash bench/gpu_validate.sh [build|test|sanitize|bench|tune|train|lowrank|sketch]...
# BENCH_ARGS / TRAIN_ARGS / LOWRANK_ARGS / SKETCH_ARGS pass extra arguments to bench_forward.py /
# bench_train.py / bench_lowrank.py / bench_sketch.py.
set -uo pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
OUT=${OUT:-/tmp/spallm_out}; mkdir -p "$OUT"
steps=("$@"); [ ${#steps[@]} -gt 0 ] || steps=(build test sanitize bench train)
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
if [ -z "${SPALLM_COMMIT:-}" ] && ! git rev-parse HEAD >/dev/null 2>&1; then
  echo "warning: no .git on this machine and SPALLM_COMMIT unset: results will say commit 'unknown'" \
    "(run as SPALLM_COMMIT=<hash> bash bench/gpu_validate.sh ...)" | tee -a "$OUT/warnings.txt"
fi
has_cuda_build() {
  python3 -c "import spallm_ext, sys; sys.exit(0 if spallm_ext.build_info()['cuda'] else 1)" 2>/dev/null
}
build() {
  # The machine starts bare (and is handed back after a short idle): a _C*.so carried from an
  # earlier call (copied from its $OUT into python/spallm_ext/) is reused when it loads and has
  # CUDA; otherwise build in place, so PYTHONPATH=python finds it.
  if ! has_cuda_build; then
    rm -f python/spallm_ext/_C*.so
    ( time python3 -m pip install --no-build-isolation --no-deps -e . ) > "$OUT/build.log" 2>&1
    tail -5 "$OUT/build.log"
  fi
  cp python/spallm_ext/_C*.so "$OUT/" 2>/dev/null
  python3 -c "import spallm_ext, json; print(json.dumps(spallm_ext.build_info()))" | tee "$OUT/build_info.json"
}
for s in "${steps[@]}"; do
  # Every step needs the CUDA build: one named without `build` on a bare machine builds first.
  [ "$s" = build ] || has_cuda_build || build
  case $s in
    build) build ;;
    test)
      # A build without CUDA would skip every CUDA test and still end green: refuse it instead.
      has_cuda_build || { echo "test: this spallm_ext has no CUDA kernels (see $OUT/build.log)"; continue; }
      python3 -m pytest -q -n 8 tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -15 ;;
    sanitize)
      # memcheck: the simple kernels' tests and a bf16 slice of every fast path; racecheck (slow,
      # shared-memory hazards) on the fast kernels' edge cases: tiles past N and M, split-K, the
      # bucket pass of lut_grad, multi-adapter segments.
      compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest -q -x tests/test_cuda.py \
        tests/test_cuda_kernels.py -k "not kernels or float32-bfloat16-4 or adversarial or split or tiles or launch or falls or decode or (lowrank_t_on_chip and 70-float32) or (dx_mma_matches and 576)" \
        -p no:cacheprovider > "$OUT/sanitizer_memcheck.log" 2>&1; echo "memcheck rc=$?"; tail -4 "$OUT/sanitizer_memcheck.log"
      compute-sanitizer --tool racecheck --error-exitcode 1 python3 -m pytest -q -x tests/test_cuda_kernels.py \
        -k "adversarial or split or tiles or (single_launch and 64-16) or (grad_mma_matches and bfloat16 and 33-200) or (dx_mma_matches and float32-bfloat16-4) or (lowrank_t_on_chip and 70-float32-column_slice)" \
        -p no:cacheprovider > "$OUT/sanitizer_racecheck.log" 2>&1; echo "racecheck rc=$?"; tail -4 "$OUT/sanitizer_racecheck.log" ;;
    bench)
      SPALLM_COMMIT=${SPALLM_COMMIT:-} python3 bench/bench_forward.py --out "$OUT/forward.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_forward.log" | tail -40 ;;
    tune)
      # Dispatch thresholds measured on this GPU (spallm_ext/tuning.py): the values to make the
      # built-in ones of csrc/cuda/thresholds.h, and a tuning file to apply meanwhile.
      SPALLM_COMMIT=${SPALLM_COMMIT:-} python3 bench/tune_dispatch.py --device cuda --out "$OUT/tune_cuda.json" \
        --tuning-out "$OUT/tuning_cuda.json" 2>&1 | tee "$OUT/tune.log" | tail -60 ;;
    train)
      # Training step (issue 5): the QLoRA rows need bitsandbytes from .whl (see bench/README.md).
      SPALLM_COMMIT=${SPALLM_COMMIT:-} python3 bench/bench_train.py --out "$OUT/train.json" ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/bench_train.log" | tail -60 ;;
    lowrank)
      # Fused low-rank branch (issue 6): on-chip t vs the skinny GEMM vs unfused vs plain.
      SPALLM_COMMIT=${SPALLM_COMMIT:-} python3 bench/bench_lowrank.py --out "$OUT/lowrank.json" ${LOWRANK_ARGS:-} 2>&1 | tee "$OUT/bench_lowrank.log" | tail -60 ;;
    sketch)
      # Sketching speed on a Llama-3-8B-shaped block stack (issue 3: 32 blocks in < 10 min).
      SPALLM_COMMIT=${SPALLM_COMMIT:-} python3 bench/bench_sketch.py --device cuda --shape llama3-8b --blocks 2 \
        --out "$OUT/sketch.json" ${SKETCH_ARGS:-} 2>&1 | tee "$OUT/bench_sketch.log" | tail -30 ;;
  esac
done

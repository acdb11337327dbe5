#!/usr/bin/env bash
# The CPU comparison in docs/finetune.md: two lanes (one per task), one thread per run, both
# lanes at once (a 2-core machine). Each run also evaluates its untuned base (--eval-base).
# strategyqa: all four methods; gsm_symbolic (longer prompts, generation to score): spallm, lora,
# qlora (the bf16-LUT effect is shown once, on strategyqa). Sized for ~75 min on 2 shared cores.
#   bash examples/run_finetune_cpu.sh [OUT.json]
# STRATEGYQA_STEPS / GSM_STEPS / STRATEGYQA_EVAL / GSM_EVAL override steps and held-out sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/finetune_smollm2_cpu.json}
LOGS=${SPALLM_FT_CACHE:-/tmp/ft_cache}/logs
mkdir -p "$LOGS"
export OMP_NUM_THREADS=1
# Large allocations straight from mmap and back to the OS on free, so the peak RSS we report is
# the peak of live memory, not of glibc's heap fragmentation (which otherwise adds ~0.5 GB here).
export MALLOC_MMAP_THRESHOLD_=1048576
python examples/ft_models.py > "$LOGS/sketch.log" 2>&1   # builds the sketch cache once (minutes)

lane() {  # task steps eval-examples methods...
    local task=$1 steps=$2 n_eval=$3
    shift 3
    for m in "$@"; do
        python examples/finetune.py --task "$task" --method "$m" --steps "$steps" --eval-limit "$n_eval" \
            --eval-base --out "$OUT" > "$LOGS/${task}_$m.log" 2>&1
    done
}
start=$(date +%s)
lane strategyqa "${STRATEGYQA_STEPS:-120}" "${STRATEGYQA_EVAL:-200}" spallm spallm_bf16lut lora qlora &
lane gsm_symbolic "${GSM_STEPS:-40}" "${GSM_EVAL:-64}" spallm lora qlora &
wait
echo "all runs: $(( $(date +%s) - start )) s wall" | tee "$LOGS/wall.txt"

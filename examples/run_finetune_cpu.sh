#!/usr/bin/env bash
# The CPU comparison in docs/finetune.md: two lanes (one per task) of four methods each, one
# thread per run, both lanes at once (a 2-core machine). Each run also evaluates its untuned base.
#   bash examples/run_finetune_cpu.sh [OUT.json]
# STRATEGYQA_STEPS / GSM_STEPS override the step counts.
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

lane() {  # task steps
    for m in spallm spallm_bf16lut lora qlora; do
        python examples/finetune.py --task "$1" --method "$m" --steps "$2" --eval-base --out "$OUT" \
            > "$LOGS/$1_$m.log" 2>&1
    done
}
start=$(date +%s)
lane strategyqa "${STRATEGYQA_STEPS:-200}" &
lane gsm_symbolic "${GSM_STEPS:-80}" &
wait
echo "all runs: $(( $(date +%s) - start )) s wall" | tee "$LOGS/wall.txt"

"""Dispatch thresholds measured on this machine (spallm_ext.tuning): every path of lut_linear (and
on CUDA lut_linear_dx) timed at a ladder of token counts, the crossovers read from the timings.

    python bench/tune_dispatch.py [--device cuda|cpu] [--shapes 4096x4096,...] [--tokens 1,2,4,...]

Writes bench/results/tune_<device>.json (the benchmark metadata, `thresholds` measured next to
`builtin`, and one row per timed call: `path`, `op`, `dtype`, `M`, `N`, `K`, `median_us`) and,
with --tuning-out, a tuning file that $SPALLM_EXT_TUNING / spallm_ext.tuning.load_tuning apply.
The CUDA figures are the ones to copy into csrc/cuda/thresholds.h as built-in values for the GPU
they were measured on.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import write_results  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--shapes", default=None, help="OUTxIN,... (default: spallm_ext.tuning's for the device)")
    p.add_argument("--tokens", default=None, help="comma-separated token counts")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--budget-ms", type=float, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--tuning-out", default=None, help="also write a tuning file (spallm_ext.tuning format)")
    a = p.parse_args(argv)
    from spallm_ext import tuning

    shapes = tuning.parse_shapes(a.shapes) if a.shapes else None
    tokens = [int(v) for v in a.tokens.split(",")] if a.tokens else None
    result = tuning.tune(a.device, shapes=shapes, tokens=tokens, bits=a.bits, groups_per_row=a.groups,
                         budget_ms=a.budget_ms, apply=False)
    print(tuning.describe(result))
    rows = [dict(impl="spallm", adapters=1, bits=a.bits, groups_per_row=a.groups, **r) for r in result.rows]
    out = a.out or os.path.join(HERE, "results", f"tune_{a.device}.json")
    write_results(out, a.device, rows, device_name=result.device_name, thresholds=result.thresholds,
                  builtin=result.builtin, settings=result.meta)
    if a.tuning_out:
        print(f"wrote {tuning.save_tuning(result, a.tuning_out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

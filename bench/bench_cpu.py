"""CPU benchmark of spallm.lut_linear against torch.matmul (fp32 and bf16 dense weights).

    python bench/bench_cpu.py [--out bench/results/cpu_lut_linear.json] [--quick]

Shapes: 4096x4096 and 11008x4096 (Llama-2-7B MLP), M in {1, 8, 64}, 4-bit, groups_per_row 1 and 4.
The CPU op decodes W a tile at a time into fp32 and runs the tile through BLAS, so it should sit
near the fp32 matmul: the decode is the overhead being measured.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_sketch, time_cpu, write_results  # noqa: E402

import spallm_ext  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_lut_linear.json"))
    ap.add_argument("--quick", action="store_true", help="one shape, fewer runs (smoke test)")
    args = ap.parse_args()
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096)]
    ms = [1, 8] if args.quick else [1, 8, 64]
    secs = 0.1 if args.quick else 1.0
    rows = []
    print(f"{'N':>6} {'K':>5} {'M':>3} {'G':>2} {'impl':<14} {'x':<5} {'median_ms':>9} {'vs fp32 mm':>10}")
    for n, k in shapes:
        for m in ms:
            for dt in (torch.float32, torch.bfloat16):
                x = torch.randn(m, k, dtype=dt)
                w = torch.randn(n, k, dtype=dt) * 0.02
                dense = time_cpu(lambda: torch.matmul(x, w.T), min_seconds=secs)
                dname = "fp32" if dt == torch.float32 else "bf16"
                rows.append({"impl": f"torch_matmul_{dname}", "M": m, "N": n, "K": k, "bits": 16,
                             "groups_per_row": 0, "adapters": 1, "x_dtype": dname, **dense})
                if dt == torch.float32:
                    base = dense["median_us"]
                print(f"{n:>6} {k:>5} {m:>3} {'-':>2} {'matmul':<14} {dname:<5} {dense['median_us'] / 1e3:>9.3f} "
                      f"{dense['median_us'] / base:>9.2f}x")
                for g in (1, 4):
                    codes, lut = random_sketch(n, k, 4, g, "cpu")
                    t = time_cpu(lambda: spallm_ext.lut_linear(x, codes, lut), min_seconds=secs)
                    rows.append({"impl": "spallm", "M": m, "N": n, "K": k, "bits": 4, "groups_per_row": g,
                                 "adapters": 1, "x_dtype": dname, **t,
                                 "ratio_to_matmul_fp32": t["median_us"] / base})
                    print(f"{n:>6} {k:>5} {m:>3} {g:>2} {'spallm':<14} {dname:<5} {t['median_us'] / 1e3:>9.3f} "
                          f"{t['median_us'] / base:>9.2f}x")
    write_results(args.out, "cpu", rows, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()

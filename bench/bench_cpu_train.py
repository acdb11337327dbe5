"""CPU training step of one layer: forward + backward (dx and the trainable parameters' gradient),
in fp32 and under torch.autocast("cpu", bfloat16), for a dense nn.Linear (its weight trains) and a
4-bit SketchedLinear (its fp32 master LUT trains, the codes are frozen).

    python bench/bench_cpu_train.py [--out bench/results/cpu_train_step.json] [--quick]

Shapes 4096 x 4096 and 11008 x 4096 (Llama-2-7B), M in {256, 1024} tokens. Rows: ``impl``
(``dense`` or ``spallm``), ``dtype`` (``fp32`` or ``autocast_bf16``), ``median_ms`` of one step
(zeroed grads, forward, sum of squares as the loss, backward), and for spallm ``cpu_path``: the
plan of the step's last op (lut_grad). A dense step is three GEMMs (y, dx, dW); a sketched step is
the same three GEMM shapes plus the decodes of W (forward and dx) and the bucket sums of dW.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import time_cpu, write_results  # noqa: E402

import spallm_ext  # noqa: E402
from spallm_ext import SketchedLinear, kernels  # noqa: E402


def step_fn(layer: torch.nn.Module, x: torch.Tensor, autocast: bool):
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        xx = x.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(xx)
        y.float().square().sum().backward()
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_train_step.json"))
    ap.add_argument("--quick", action="store_true", help="one small shape (smoke test)")
    args = ap.parse_args()
    shapes = [(512, 512)] if args.quick else [(4096, 4096), (11008, 4096)]
    ms = [64] if args.quick else [256, 1024]
    secs = 0.1 if args.quick else 1.0
    rows = []
    print(f"{'N':>6} {'K':>5} {'M':>5} {'impl':<7} {'dtype':<14} {'median_ms':>9}  path")
    for n, k in shapes:
        torch.manual_seed(0)
        dense = torch.nn.Linear(k, n, bias=False)
        sketched = SketchedLinear.from_linear(dense, bits=4, groups_per_row=4)
        sketched.codes.requires_grad_(False)
        for m in ms:
            x = torch.randn(m, k)
            for impl, layer in (("dense", dense), ("spallm", sketched)):
                for dtype, autocast in (("fp32", False), ("autocast_bf16", True)):
                    t = time_cpu(step_fn(layer, x, autocast), min_runs=3, min_seconds=secs, warmup=1)
                    row = {"impl": impl, "dtype": dtype, "M": m, "N": n, "K": k,
                           "bits": 4 if impl == "spallm" else 32, "groups_per_row": 4 if impl == "spallm" else 0,
                           "adapters": 1, "median_ms": t["median_us"] / 1e3, **t}
                    if impl == "spallm":
                        row["cpu_path"] = kernels.last_cpu_plan()
                    rows.append(row)
                    print(f"{n:>6} {k:>5} {m:>5} {impl:<7} {dtype:<14} {row['median_ms']:>9.1f}  {row.get('cpu_path', '-')}")
    write_results(args.out, "cpu", rows, threads=torch.get_num_threads(),
                  cpu_simd=spallm_ext.build_info()["cpu_simd"], cpu_bf16=spallm_ext.build_info()["cpu_bf16"])


if __name__ == "__main__":
    main()

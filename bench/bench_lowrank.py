"""Benchmark of spallm.lut_linear_lowrank (sketch + low-rank branch) on a GPU.

    python bench/bench_lowrank.py --out bench/results/lowrank_h100.json [--quick] [--bits 4] [--ranks 16 32]
    python bench/bench_lowrank.py --cpu-smoke --out /tmp/lowrank_smoke.json   # tiny shapes, CPU, checks the script

impls (the `impl` field of each row), all with x bf16 and the LUT as an fp32 master copy:
  spallm_lowrank  torch.ops.spallm.lut_linear_lowrank(x, codes, lut, l1, l2): the op as dispatched
                  (fused on the mma paths: t = x l1 on chip when K is split, else a skinny GEMM
                  first; decode_gemm + two GEMMs at large M); `plan` says which
  spallm_lowrank_tgemm  the same op with t = x l1 always from the skinny GEMM
                  (kernels.use_lowrank_t("gemm")): what computing t on chip saves
  unfused         spallm.lut_linear, then t = x @ l1 and y += t @ l2 (addmm): three launches, the
                  Nunchaku "naive" baseline the fused kernel must beat
  spallm          plain spallm.lut_linear, no branch: the floor a fused branch adds to
  cublas_bf16     torch.matmul with the dense bf16 weight (no branch)
l1 [K, rank] and l2 [rank, N] are bf16 (what inference stores; --lowrank-dtype float32 for the
training master copy). Shapes are Llama-3-8B's (N, K); M from 1 to 8192. Timings: medians with
the L2 flushed before every call (bench/common.py). Each row: impl, M, N, K, bits,
groups_per_row, rank, median_us, min_us, runs, speedup_vs_cublas, overhead_vs_spallm (time over
plain lut_linear at the same shape), and for spallm_lowrank the relative error against unfused.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_sketch, rel_err, timer, write_results  # noqa: E402

import spallm_ext  # noqa: E402
from spallm_ext import kernels  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
RANKS = [16, 32, 64, 128]
SMOKE_SHAPES = [(48, 64), (32, 96)]
SMOKE_MS = [1, 5]
SMOKE_RANKS = [4, 8]


def unfused(x, codes, lut, l1, l2):
    """Three launches: the sketch, then the branch through two GEMMs (the second fused with the add)."""
    y = spallm_ext.lut_linear(x, codes, lut)
    return torch.addmm(y.reshape(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]) @ l1, l2).reshape(y.shape)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lowrank.json"))
    ap.add_argument("--quick", action="store_true", help="one shape, five M values")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    ap.add_argument("--bits", type=int, nargs="+", default=[4])
    ap.add_argument("--groups", type=int, nargs="+", default=[1])
    ap.add_argument("--ranks", type=int, nargs="+", default=None)
    ap.add_argument("--ms", type=int, nargs="+", default=None)
    ap.add_argument("--lowrank-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--budget-ms", type=float, default=150.0, help="time budget per measurement")
    args = ap.parse_args(argv)

    dev = "cpu" if args.cpu_smoke else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA GPU: this benchmark is for the GPU machine (use --cpu-smoke to check the script)")
    if args.cpu_smoke:
        shapes, ms, ranks, budget = SMOKE_SHAPES, args.ms or SMOKE_MS, args.ranks or SMOKE_RANKS, 5.0
    else:
        shapes = SHAPES[2:3] if args.quick else SHAPES
        ms = args.ms or ([1, 16, 64, 256, 4096] if args.quick else MS)
        ranks, budget = args.ranks or RANKS, args.budget_ms
    lr_dtype = getattr(torch, args.lowrank_dtype)
    timed = timer(dev, budget)
    last_plan = kernels.last_cpu_plan if dev == "cpu" else kernels.last_cuda_plan
    rows = []
    print(f"{'N':>6} {'K':>6} {'M':>5} {'b':>2} {'G':>2} {'r':>4} {'impl':<15} {'us':>10} {'vs cuBLAS':>9} {'vs spallm':>9}")

    def emit(impl, m, n, k, bits, g, rank, t, base, plain, **extra):
        row = {"impl": impl, "M": m, "N": n, "K": k, "bits": bits, "groups_per_row": g, "rank": rank, **t,
               "speedup_vs_cublas": base["median_us"] / t["median_us"],
               "overhead_vs_spallm": t["median_us"] / plain["median_us"] if plain else 1.0, **extra}
        rows.append(row)
        print(f"{n:>6} {k:>6} {m:>5} {bits:>2} {g:>2} {rank:>4} {impl:<15} {t['median_us']:>10.1f} "
              f"{row['speedup_vs_cublas']:>8.2f}x {row['overhead_vs_spallm']:>8.2f}x", flush=True)

    out = {"l2_flushed": dev == "cuda", "lowrank_dtype": args.lowrank_dtype, "cpu_smoke": args.cpu_smoke}
    gen = torch.Generator().manual_seed(0)
    for done, (n, k) in enumerate(shapes):
        w = (torch.randn(n, k, generator=gen) * 0.02).to(device=dev, dtype=torch.bfloat16)
        factors = {r: ((torch.randn(k, r, generator=gen) / k ** 0.5).to(dev, lr_dtype),
                       (torch.randn(r, n, generator=gen) * 0.02).to(dev, lr_dtype)) for r in ranks}
        # One sketch per (bits, G) and shape, reused at every M (bench_forward.py says why).
        sketches = {(b, g): random_sketch(n, k, b, g, dev, seed=n + k + b) for b in args.bits for g in args.groups}
        for m in ms:
            x = torch.randn(m, k, generator=gen).to(device=dev, dtype=torch.bfloat16)
            base = timed(lambda: torch.matmul(x, w.T))
            emit("cublas_bf16", m, n, k, 16, 0, 0, base, base, None)
            for bits in args.bits:
                for g in args.groups:
                    codes, lut = sketches[bits, g]
                    plain = timed(lambda: spallm_ext.lut_linear(x, codes, lut))
                    emit("spallm", m, n, k, bits, g, 0, plain, base, plain)
                    for r in ranks:
                        l1, l2 = factors[r]
                        l1x, l2x = l1.to(x.dtype), l2.to(x.dtype)   # unfused GEMMs need one dtype
                        y_ref = unfused(x, codes, lut, l1x, l2x)
                        y = spallm_ext.lut_linear_lowrank(x, codes, lut, l1, l2)
                        err, plan = rel_err(y, y_ref), last_plan()  # the plan before other calls replace it
                        emit("unfused", m, n, k, bits, g, r, timed(lambda: unfused(x, codes, lut, l1x, l2x)),
                             base, plain)
                        emit("spallm_lowrank", m, n, k, bits, g, r,
                             timed(lambda: spallm_ext.lut_linear_lowrank(x, codes, lut, l1, l2)), base, plain,
                             rel_err_vs_unfused=err, plan=plan)
                        with kernels.use_lowrank_t("gemm"):
                            emit("spallm_lowrank_tgemm", m, n, k, bits, g, r,
                                 timed(lambda: spallm_ext.lut_linear_lowrank(x, codes, lut, l1, l2)), base, plain)
        # Rewritten after every shape, so a run cut off by the machine's limit keeps what it measured.
        write_results(args.out, dev, rows, partial=done < len(shapes) - 1, **out,
                      shapes_done=[list(s) for s in shapes[:done + 1]])
    return {**out, "rows": rows}


if __name__ == "__main__":
    main()

"""Forward microbenchmark of spallm.lut_linear on a GPU against the baselines that matter.

    python bench/bench_forward.py --out bench/results/forward_h100.json [--quick] [--bits 4 3 2]

impls (the `impl` field of each row):
  spallm          torch.ops.spallm.lut_linear (x bf16, LUT fp32 master copy, no cast per call), the
                  kernel the dispatch picks (the row's `plan` says which); `adapters` > 1 rows give
                  every token one of A adapters (LUT stack [A, N, G, 2^b], random adapter_index)
  spallm_mma      the same call forced onto the fused tensor-core kernel, W tiles decoded in shared
                  memory (spallm_ext.kernels)
  spallm_mma_regs forced onto its small-M variant (M <= 32), mma fragments decoded in registers
  spallm_mma_regs_direct  the same with the codes loaded straight into registers (no code ring)
  spallm_decode_gemm  forced onto decode-to-bf16 + cuBLAS
  spallm_simple   forced onto the exact CUDA-core kernels (only with --paths simple)
  cublas_bf16     torch.matmul with the dense bf16 weight
  sketchtune_ref  the official SketchTune path: decode the full W to bf16, then matmul
  bnb_nf4         bitsandbytes 4-bit NF4 (QLoRA's kernel), blocksize 64, when bitsandbytes imports
  torch_int4      torch._weight_int4pack_mm (group 128), when it runs on this torch/GPU
Shapes are Llama-3-8B's (N, K); timings are medians with the L2 flushed before every call, and
calls that take under --graph-below-us microseconds are re-timed as CUDA-graph replays (the row's
`cuda_graph` field), so launch gaps between a call's kernels are not counted.
Reported per row: median_us, GB/s (minimum bytes: codes + LUTs + x + y for spallm, the weight
format's bytes for the others), TFLOP/s, and speedup over cublas_bf16 at the same (M, N, K).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_sketch, runs_for, time_cuda, time_cuda_graph, write_results  # noqa: E402

import spallm_ext  # noqa: E402
from spallm_ext import kernels  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
# Peak HBM bandwidth (GB/s, vendor figures) for the hbm_fraction column; others default to H100 SXM.
HBM_GBPS = {"NVIDIA H100 80GB HBM3": 3350.0, "NVIDIA H200": 4800.0}
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 8192]


def _bnb_nf4(w: torch.Tensor):
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except Exception:  # noqa: BLE001  (not installed, or no binary for this GPU)
        return None
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    return lambda x: bnb.matmul_4bit(x, q.t(), quant_state=state)


def _torch_int4(w: torch.Tensor):
    try:
        n, k = w.shape
        group = 128
        wf = w.float().view(n, k // group, group)
        lo, hi = wf.amin(-1, keepdim=True), wf.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        q = ((wf - lo) / scale).round().clamp(0, 15).to(torch.int32).view(n, k)
        # torch >= 2.5 takes the nibbles pre-packed two per byte, high nibble first.
        packed = torch._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), 8)
        zeros = lo + 8 * scale
        sz = torch.stack([scale, zeros], -1).squeeze(-2).transpose(0, 1).contiguous().to(torch.bfloat16)
        fn = lambda x: torch._weight_int4pack_mm(x, packed, group, sz)  # noqa: E731
        fn(torch.randn(1, k, device=w.device, dtype=torch.bfloat16))
        return fn
    except Exception:  # noqa: BLE001  (packing API differs between torch versions / archs)
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "forward.json"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--ms", type=int, nargs="+", default=None)
    ap.add_argument("--budget-ms", type=float, default=150.0, help="time budget per measurement")
    ap.add_argument("--paths", nargs="*", default=["mma", "mma_regs", "mma_regs_direct", "decode_gemm"],
                    help="forced CUDA paths timed besides the automatic choice (4-bit rows only)")
    ap.add_argument("--adapters", type=int, nargs="*", default=[16],
                    help="multi-adapter rows: adapters per batch, at M >= adapters and M <= 256")
    ap.add_argument("--graph-below-us", type=float, default=50.0)
    args = ap.parse_args()
    ms = args.ms or ([1, 16, 64, 256, 4096] if args.quick else MS)
    shapes = SHAPES[2:3] if args.quick else SHAPES
    dev = "cuda"
    rows = []
    print(f"{'N':>6} {'K':>6} {'M':>5} {'b':>2} {'G':>2} {'impl':<15} {'us':>10} {'GB/s':>7} {'TFLOP/s':>8} {'vs cuBLAS':>9}")

    def timed(fn):
        t = time_cuda(fn, runs=runs_for(fn, args.budget_ms))
        if t["median_us"] < args.graph_below_us:
            t = time_cuda_graph(fn, runs=max(t["runs"], 50))
        return t

    def emit(impl, m, n, k, bits, g, t, nbytes, base_us, adapters=1, plan=None):
        flops = 2.0 * m * n * k
        row = {"impl": impl, "M": m, "N": n, "K": k, "bits": bits, "groups_per_row": g, "adapters": adapters,
               **t, "gbps": nbytes / t["median_us"] / 1e3, "tflops": flops / t["median_us"] / 1e6,
               "hbm_fraction": nbytes / t["median_us"] / 1e3 / HBM_GBPS.get(torch.cuda.get_device_name(), 3350.0),
               "speedup_vs_cublas": (base_us / t["median_us"]) if base_us else 1.0}
        if plan is not None:
            row["plan"] = plan
        rows.append(row)
        print(f"{n:>6} {k:>6} {m:>5} {bits:>2} {g:>2} {impl + ('' if adapters == 1 else f' x{adapters}'):<15} "
              f"{t['median_us']:>10.1f} {row['gbps']:>7.0f} {row['tflops']:>8.1f} {row['speedup_vs_cublas']:>8.2f}x"
              f"  {plan or ''}", flush=True)

    def plan_of(fn):
        fn()
        return kernels.last_cuda_plan()

    for n, k in shapes:
        w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
        baselines = {"bnb_nf4": _bnb_nf4(w), "torch_int4": _torch_int4(w)}
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            act = 2 * (m * k + m * n)
            f = lambda: torch.matmul(x, w.T)  # noqa: E731
            base = timed(f)
            emit("cublas_bf16", m, n, k, 16, 0, base, 2 * n * k + act, None)
            for name, fn in baselines.items():
                if fn is None:
                    continue
                g = lambda: fn(x)  # noqa: E731
                wbytes = n * k // 2 + (n * k // 64 if name == "bnb_nf4" else n * k // 128 * 4)
                emit(name, m, n, k, 4, 0, timed(g), wbytes + act, base["median_us"])
            for bits in args.bits:
                for gpr in args.groups:
                    codes, lut = random_sketch(n, k, bits, gpr, dev)
                    lut_bf16 = lut.to(torch.bfloat16)
                    nbytes = codes.numel() + lut.numel() * 4 + act
                    f = lambda: spallm_ext.lut_linear(x, codes, lut)  # noqa: E731
                    emit("spallm", m, n, k, bits, gpr, timed(f), nbytes, base["median_us"], plan=plan_of(f))
                    if bits == args.bits[0]:
                        for path in args.paths:
                            with kernels.use_cuda_kernel(path):
                                plan = plan_of(f)
                                if plan.startswith(path + " "):  # the path supports this call
                                    emit(f"spallm_{path}", m, n, k, bits, gpr, timed(f), nbytes, base["median_us"],
                                         plan=plan)
                        f = lambda: torch.matmul(x, spallm_ext.lut_decode(codes, lut_bf16).T)  # noqa: E731
                        emit("sketchtune_ref", m, n, k, bits, gpr, timed(f), nbytes + 4 * n * k, base["median_us"])
                        for a in args.adapters:
                            if not (a <= m <= 256):
                                continue
                            # A adapters sharing the codes, each token picks one (all A present).
                            stack = lut.unsqueeze(0).repeat(a, 1, 1, 1) + 0.001 * torch.randn(
                                a, *lut.shape, device=dev)
                            index = torch.randperm(m, device=dev) % a
                            f = lambda: spallm_ext.lut_linear(x, codes, stack, None, index)  # noqa: E731
                            emit("spallm", m, n, k, bits, gpr, timed(f), nbytes + (a - 1) * lut.numel() * 4,
                                 base["median_us"], adapters=a)
    write_results(args.out, dev, rows, l2_flushed=True)


if __name__ == "__main__":
    main()

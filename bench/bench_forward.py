"""Forward microbenchmark of spallm.lut_linear on a GPU against the baselines that matter.

    python bench/bench_forward.py --out bench/results/forward_h100.json [--quick] [--bits 4 3 2]
        [--shapes 14336x4096,4096x14336]   # a subset of the sweep, e.g. to split it over two calls
    python bench/bench_forward.py --cpu-smoke --out /tmp/forward_smoke.json   # tiny, CPU: checks the script

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
format's bytes for the others), TFLOP/s, and speedup over cublas_bf16 at the same (M, N, K); spallm
rows also `rel_err` against the pure-torch reference (spallm_ext.reference), so a fast row that is
wrong shows. The JSON is rewritten after every shape (`partial: true` until the sweep ends): a run
cut off by the GPU machine's 10-minute limit keeps the shapes it finished. A full sweep takes
several minutes on an H100 (mostly the many spallm rows at M >= 1024): split it with --shapes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_sketch, rel_err, timer, write_results  # noqa: E402

import spallm_ext  # noqa: E402
from spallm_ext import kernels, reference  # noqa: E402
from spallm_ext.tuning import parse_shapes  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
# Peak HBM bandwidth (GB/s, vendor figures) for the hbm_fraction column; others default to H100 SXM.
HBM_GBPS = {"NVIDIA H100 80GB HBM3": 3350.0, "NVIDIA H200": 4800.0}
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 8192]
SMOKE_SHAPES = [(48, 64), (40, 128)]
SMOKE_MS = [1, 3, 6]
SMOKE_ADAPTERS = [3]


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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "forward.json"))
    ap.add_argument("--quick", action="store_true", help="one shape, five M values")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    ap.add_argument("--shapes", type=parse_shapes, default=None, help="NxK,... (default: Llama-3-8B's four)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--ms", type=int, nargs="+", default=None)
    ap.add_argument("--budget-ms", type=float, default=150.0, help="time budget per measurement")
    ap.add_argument("--paths", nargs="*", default=["mma", "mma_regs", "mma_regs_direct", "decode_gemm"],
                    help="forced CUDA paths timed besides the automatic choice (rows of the first --bits)")
    ap.add_argument("--adapters", type=int, nargs="*", default=None,
                    help="multi-adapter rows: adapters per batch, at M >= adapters and M <= 256 (default 16)")
    ap.add_argument("--graph-below-us", type=float, default=50.0)
    args = ap.parse_args(argv)
    dev = "cpu" if args.cpu_smoke else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA GPU: this benchmark is for the GPU machine (use --cpu-smoke to check the script)")
    if args.cpu_smoke:
        shapes, ms, budget = args.shapes or SMOKE_SHAPES, args.ms or SMOKE_MS, 5.0
        adapters, paths = SMOKE_ADAPTERS if args.adapters is None else args.adapters, []
        hbm_gbps, last_plan = float("nan"), kernels.last_cpu_plan
    else:
        shapes = args.shapes or (SHAPES[2:3] if args.quick else SHAPES)
        ms = args.ms or ([1, 16, 64, 256, 4096] if args.quick else MS)
        budget, adapters, paths = args.budget_ms, [16] if args.adapters is None else args.adapters, args.paths
        hbm_gbps, last_plan = HBM_GBPS.get(torch.cuda.get_device_name(), 3350.0), kernels.last_cuda_plan
    timed = timer(dev, budget, graph_below_us=None if args.cpu_smoke else args.graph_below_us)
    rows = []
    print(f"{'N':>6} {'K':>6} {'M':>5} {'b':>2} {'G':>2} {'impl':<15} {'us':>10} {'GB/s':>7} {'TFLOP/s':>8} {'vs cuBLAS':>9}")

    def emit(impl, m, n, k, bits, g, t, nbytes, base_us, adapters=1, **extra):
        flops = 2.0 * m * n * k
        row = {"impl": impl, "M": m, "N": n, "K": k, "bits": bits, "groups_per_row": g, "adapters": adapters,
               **t, "gbps": nbytes / t["median_us"] / 1e3, "tflops": flops / t["median_us"] / 1e6,
               "hbm_fraction": nbytes / t["median_us"] / 1e3 / hbm_gbps,
               "speedup_vs_cublas": (base_us / t["median_us"]) if base_us else 1.0, **extra}
        rows.append(row)
        print(f"{n:>6} {k:>6} {m:>5} {bits:>2} {g:>2} {impl + ('' if adapters == 1 else f' x{adapters}'):<15} "
              f"{t['median_us']:>10.1f} {row['gbps']:>7.0f} {row['tflops']:>8.1f} {row['speedup_vs_cublas']:>8.2f}x"
              f"  {extra.get('plan', '')}", flush=True)

    def checked(fn, ref):
        """Run fn once: what it ran (the dispatch's plan) and its error against ref."""
        y = fn()
        return {"plan": last_plan(), "rel_err": rel_err(y, ref)}

    extra = {"l2_flushed": dev == "cuda", "cpu_smoke": args.cpu_smoke}
    gen = torch.Generator().manual_seed(0)
    for done, (n, k) in enumerate(shapes):
        w = (torch.randn(n, k, generator=gen) * 0.02).to(device=dev, dtype=torch.bfloat16)
        baselines = {"bnb_nf4": _bnb_nf4(w), "torch_int4": _torch_int4(w)} if dev == "cuda" else {}
        # One random sketch per (bits, G) and shape, reused at every M (building one on the CPU
        # takes up to a second at 14336 x 4096, GPU time the sweep would otherwise idle away).
        sketches = {(b, g): random_sketch(n, k, b, g, dev, seed=n + k + b) for b in args.bits for g in args.groups}
        for m in ms:
            x = torch.randn(m, k, generator=gen).to(device=dev, dtype=torch.bfloat16)
            act = 2 * (m * k + m * n)
            base = timed(lambda: torch.matmul(x, w.T))
            emit("cublas_bf16", m, n, k, 16, 0, base, 2 * n * k + act, None)
            for name, fn in baselines.items():
                if fn is None:
                    continue
                wbytes = n * k // 2 + (n * k // 64 if name == "bnb_nf4" else n * k // 128 * 4)
                emit(name, m, n, k, 4, 0, timed(lambda: fn(x)), wbytes + act, base["median_us"])
            for bits in args.bits:
                for gpr in args.groups:
                    codes, lut = sketches[bits, gpr]
                    ref = x.float() @ reference.lut_decode(codes, lut).float().T
                    nbytes = codes.numel() + lut.numel() * 4 + act
                    f = lambda: spallm_ext.lut_linear(x, codes, lut)  # noqa: E731
                    info = checked(f, ref)
                    emit("spallm", m, n, k, bits, gpr, timed(f), nbytes, base["median_us"], **info)
                    if bits != args.bits[0]:
                        continue
                    for path in paths:
                        with kernels.use_cuda_kernel(path):
                            info = checked(f, ref)
                            if info["plan"].startswith(path + " "):  # the path supports this call
                                emit(f"spallm_{path}", m, n, k, bits, gpr, timed(f), nbytes, base["median_us"],
                                     **info)
                    lut_bf16 = lut.to(torch.bfloat16)
                    emit("sketchtune_ref", m, n, k, bits, gpr,
                         timed(lambda: torch.matmul(x, spallm_ext.lut_decode(codes, lut_bf16).T)),
                         nbytes + 4 * n * k, base["median_us"])
                    for a in adapters:
                        if not (a <= m <= 256):
                            continue
                        # A adapters sharing the codes, each token picks one (all A present).
                        stack = lut.unsqueeze(0).repeat(a, 1, 1, 1) + 0.001 * torch.randn(
                            a, *lut.shape, generator=gen).to(dev)
                        index = (torch.randperm(m, generator=gen) % a).to(dev)
                        fa = lambda: spallm_ext.lut_linear(x, codes, stack, None, index)  # noqa: E731
                        info = checked(fa, reference.lut_linear(x.float(), codes, stack.float(), None, index))
                        emit("spallm", m, n, k, bits, gpr, timed(fa), nbytes + (a - 1) * lut.numel() * 4,
                             base["median_us"], adapters=a, **info)
        write_results(args.out, dev, rows, partial=done < len(shapes) - 1, **extra,
                      shapes_done=[list(s) for s in shapes[:done + 1]])
    return {**extra, "rows": rows}


if __name__ == "__main__":
    main()

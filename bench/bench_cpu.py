"""CPU benchmark of spallm.lut_linear (every CPU path) against torch.matmul with dense fp32/bf16 W.

    python bench/bench_cpu.py [--out bench/results/cpu_lut_linear.json] [--quick]

Shapes: 4096x4096 and 11008x4096 (Llama-2-7B MLP), M in {1, 2, 4, 8, 16, 32, 64, 128, 256}; 4-bit
with groups_per_row 1 and 4, 3- and 2-bit with 4, as fp32 models (x and LUT fp32) and, for 4-bit,
as bf16 models (x and LUT bf16, what model.to(torch.bfloat16) gives). Rows:

* ``spallm``: the automatic CPU path (``cpu_path`` says which ran: "avx512_gemv" / "avx2_gemv"
  decode W in registers straight into FMAs up to 4096 / 16 tokens, "avx512bf16_gemv" does the same
  on bf16 dot products for bf16 models up to 32 tokens (AVX512-BF16), "bf16_tiles" decodes bf16 tiles
  of W for torch's bf16 matmul (bf16 models from 33 / 16 / 8 tokens on, where the CPU multiplies
  bf16 natively), "avx512_tiles" / "avx2_tiles" / "portable_tiles" decode fp32 tiles of W for BLAS),
* ``spallm_bf16`` (bf16 models): the bf16 tiles forced, with the fp32 pass below their threshold,
* ``spallm_avx512``, ``spallm_avx2``, ``spallm_portable``: that path forced (fp32 work: the vector
  kernels of one instruction set, or the scalar decode + BLAS), wherever the CPU has it and it is
  not what auto ran anyway,
* ``torch_matmul_fp32`` / ``torch_matmul_bf16``: the dense layer the sketch replaces.

Timed with time.perf_counter around whole calls (median; no cache flush: the weights, 8-45 MB of
codes or 64-180 MB dense, exceed the caches anyway).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_sketch, time_cpu, write_results  # noqa: E402

import spallm_ext  # noqa: E402
from spallm_ext import kernels  # noqa: E402

# (bits, groups_per_row, model dtype names: x and LUT in that dtype) of the sketch rows
CONFIGS = [(4, 1, ("fp32", "bf16")), (4, 4, ("fp32", "bf16")), (3, 4, ("fp32",)), (2, 4, ("fp32",))]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_lut_linear.json"))
    ap.add_argument("--quick", action="store_true", help="one shape, fewer runs (smoke test)")
    args = ap.parse_args()
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096)]
    ms = [1, 16] if args.quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    secs = 0.1 if args.quick else 0.5
    # auto, then each forced path this CPU has whose kernels auto would not pick for an fp32 model
    # (the widest vector set); bf16 models also force that one where auto takes the bf16 tiles.
    have = kernels.cpu_kernels()
    widest = "avx512" if "avx512" in have else "avx2" if "avx2" in have else "portable"
    forced = [p for p in ("avx512", "avx2", "portable") if p in have and p != widest]
    paths = [("spallm", "auto")] + [(f"spallm_{p}", p) for p in forced]
    # bf16 models where the CPU multiplies bf16 natively: auto takes the bf16 dot-product pass at few
    # tokens and the bf16 tiles at more; "bf16" (tiles, fp32 pass below them) and the widest fp32
    # kernels are forced beside it.
    native = spallm_ext.build_info()["cpu_bf16"] and widest != "portable"
    bf16_extra = ([(f"spallm_{widest}", widest)] if native else []) + ([("spallm_bf16", "bf16")] if native else [])
    bf16_paths = paths[:1] + bf16_extra + paths[1:]
    rows = []
    print(f"{'N':>6} {'K':>5} {'M':>3} {'b':>2} {'G':>2} {'impl':<16} {'x':<5} {'median_ms':>9} {'vs fp32 mm':>10}  path")
    for n, k in shapes:
        sketches = {(b, g): random_sketch(n, k, b, g, "cpu") for b, g, _ in CONFIGS}
        for m in ms:
            base = {}
            for dname, dt in DTYPES.items():
                x = torch.randn(m, k, dtype=dt)
                w = torch.randn(n, k, dtype=dt) * 0.02
                dense = time_cpu(lambda: torch.matmul(x, w.T), min_seconds=secs)
                base[dname] = dense["median_us"]
                rows.append({"impl": f"torch_matmul_{dname}", "M": m, "N": n, "K": k, "bits": 16,
                             "groups_per_row": 0, "adapters": 1, "x_dtype": dname, **dense})
                print(f"{n:>6} {k:>5} {m:>3} {'-':>2} {'-':>2} {'matmul':<16} {dname:<5} "
                      f"{dense['median_us'] / 1e3:>9.3f} {dense['median_us'] / base['fp32']:>9.2f}x")
            for bits, g, dnames in CONFIGS:
                for dname in dnames:
                    codes, lut = sketches[(bits, g)]
                    lut = lut.to(DTYPES[dname])
                    x = torch.randn(m, k, dtype=DTYPES[dname])
                    for impl, path in (bf16_paths if dname == "bf16" else paths):
                        with kernels.use_cpu_kernel(path):
                            t = time_cpu(lambda: spallm_ext.lut_linear(x, codes, lut), min_seconds=secs)
                            plan = kernels.last_cpu_plan()
                        rows.append({"impl": impl, "M": m, "N": n, "K": k, "bits": bits, "groups_per_row": g,
                                     "adapters": 1, "x_dtype": dname, "lut_dtype": dname, "cpu_path": plan, **t,
                                     "ratio_to_matmul_fp32": t["median_us"] / base["fp32"]})
                        print(f"{n:>6} {k:>5} {m:>3} {bits:>2} {g:>2} {impl:<16} {dname:<5} "
                              f"{t['median_us'] / 1e3:>9.3f} {t['median_us'] / base['fp32']:>9.2f}x  {plan}")
    write_results(args.out, "cpu", rows, threads=torch.get_num_threads(),
                  cpu_simd=spallm_ext.build_info()["cpu_simd"], cpu_bf16=spallm_ext.build_info()["cpu_bf16"])


if __name__ == "__main__":
    main()

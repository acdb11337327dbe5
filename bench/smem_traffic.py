"""Shared-memory traffic of the fused forward kernels, counted on the SIMT emulator (no GPU needed).

    python bench/smem_traffic.py [--out bench/results/smem_traffic_emulated.json]

Runs lut_linear_mma (every decode: tile, regs with its shared-memory code ring, regs with codes
loaded straight into registers ("direct"); their token tiles) on a 256 x 1024 sketch (two 128-row tiles,
16 K-steps, G = 4) at M = 1 and a full tile on the emulator of tests/simt, which counts for every marked
shared-memory access of a warp (lookups, stores, code reads, ldmatrix, cp.async) the bank wavefronts
it needs (tests/test_cuda_emulated.py checks they are the conflict-free minimum, two known cases
aside). Shared memory delivers one wavefront (128 bytes) per clock and SM, so
`weights_per_clock = weights / wavefronts` is the ceiling the kernel's shared-memory traffic puts
on its decode rate; `hbm_weights_per_clock` is the rate at which the codes arrive when HBM runs at
its 3.35 TB/s spec, split over 132 SMs at 1.755 GHz (H100 SXM). Where the first is below the
second, a decode-size call cannot reach HBM speed whatever else the kernel does. Counts, not
timings: the GPU session measures the real thing (bench_forward.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import simt_cases as simt  # noqa: E402  (tests/simt_cases.py: builds and drives the emulator)
from common import random_sketch, write_results  # noqa: E402

HBM_BYTES_PER_S = 3.35e12
SMS = 132
CLOCK_HZ = 1.755e9
DECODES = {"tile": 0, "regs": 1, "direct": 2}  # MmaConfig as tests/simt/harness.cpp reads it


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "smem_traffic_emulated.json"))
    args = ap.parse_args()
    n, k, groups = 256, 1024, 4
    cases, meta = [], []
    for bits in (4, 3, 2):
        codes, lut = random_sketch(n, k, bits, groups, "cpu")
        for decode, block_m in (("regs", 16), ("regs", 32), ("direct", 16), ("tile", 16), ("tile", 32), ("tile", 64)):
            for m in sorted({1, block_m}):
                x = torch.randn(m, k, dtype=torch.bfloat16)
                ints = dict(M=m, N=n, K=k, G=groups, row_bytes=codes.shape[1], bits=bits, act=2, lut_type=0,
                            block_m=block_m, splits=1, regs=DECODES[decode])
                cases.append(("linear_mma", ints, dict(x=x, codes=codes, lut=lut)))
                meta.append((bits, decode, block_m, m))
    outs = simt.run_cases(cases)
    rows = []
    hbm_bytes_per_clock = HBM_BYTES_PER_S / SMS / CLOCK_HZ
    print(f"{'bits':>4} {'decode':<6} {'tile':>4} {'M':>3} {'wavefronts/1k w':>15} {'smem w/clk':>10} "
          f"{'HBM w/clk':>9}  per site (wavefronts per 1k weights)")
    for (bits, decode, block_m, m), out in zip(meta, outs):
        assert out["status"] == 0
        sites = sorted({key.split(".")[1] for key in out if key.startswith("smem.") and key.count(".") == 2})
        per_site = {s: out[f"smem.{s}.wavefronts"] * 1024 / (n * k) for s in sites}
        total = sum(per_site.values())
        row = {"impl": f"spallm_mma_{decode}", "M": m, "N": n, "K": k, "bits": bits, "groups_per_row": groups,
               "adapters": 1, "block_m": block_m, "wavefronts_per_1k_weights": total,
               "wavefronts_per_1k_weights_by_site": per_site,
               "smem_weights_per_clock": 1024 / total,
               "hbm_weights_per_clock": hbm_bytes_per_clock * 8 / bits}
        rows.append(row)
        print(f"{bits:>4} {decode:<6} {block_m:>4} {m:>3} {total:>15.1f} {row['smem_weights_per_clock']:>10.1f} "
              f"{row['hbm_weights_per_clock']:>9.1f}  " + ", ".join(f"{s} {v:.1f}" for s, v in per_site.items()))
    write_results(args.out, "SIMT emulator (counts; H100 SXM rates for the ceilings)", rows,
                  hbm_bytes_per_s=HBM_BYTES_PER_S, sms=SMS, clock_hz=CLOCK_HZ)


if __name__ == "__main__":
    main()

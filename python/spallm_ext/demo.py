"""Sketch a small transformer-shaped MLP stack on the default device and print its figures.

    python -m spallm_ext.demo [--device cuda|cpu] [--bits 4] [--groups 4] [--dim 1024]

Weights are synthetic (heavy-tailed, like trained LLM weights) so nothing is downloaded. For each
layer it prints the relative weight error, the relative output error on random activations, and
the bytes of the dense bf16 weight against the sketch (codes + fp16 LUTs).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from . import build_info
from .nn import SketchedLinear


def _llm_like_linear(in_f: int, out_f: int, gen: torch.Generator, device) -> nn.Linear:
    lin = nn.Linear(in_f, out_f, bias=False)
    # Student-t weights: a Gaussian bulk with the outliers real LLM weights have.
    t = torch.distributions.StudentT(torch.tensor(4.0)).sample((out_f, in_f))
    with torch.no_grad():
        lin.weight.copy_(t * 0.02 + 0.001 * torch.randn(out_f, in_f, generator=gen))
    return lin.to(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4))
    p.add_argument("--groups", type=int, default=4, help="groups_per_row")
    p.add_argument("--dim", type=int, default=1024, help="hidden size (MLP is dim -> 8/3 dim -> dim)")
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args(argv)

    info = build_info()
    print(f"spallm_ext {info['version']}  backends={info['backends']}  torch={info['torch_runtime']}  "
          f"device={args.device}")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    hidden = (args.dim * 8 // 3 + 63) // 64 * 64
    shapes = {"gate_proj": (args.dim, hidden), "up_proj": (args.dim, hidden), "down_proj": (hidden, args.dim)}
    print(f"{'layer':<10} {'shape':>12} {'rel W err':>10} {'rel Y err':>10} {'dense bf16':>11} "
          f"{'sketch':>10} {'ratio':>6} {'time':>8}")
    tot_dense = tot_sketch = 0
    for name, (i, o) in shapes.items():
        lin = _llm_like_linear(i, o, gen, args.device)
        t0 = time.perf_counter()
        sk = SketchedLinear.from_linear(lin, bits=args.bits, groups_per_row=args.groups)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        x = torch.randn(args.tokens, i, device=args.device)
        with torch.no_grad():
            w_err = (sk.decode() - lin.weight).norm() / lin.weight.norm()
            y_ref = lin(x)
            y_err = (sk(x) - y_ref).norm() / y_ref.norm()
        dense = i * o * 2
        sketch = sk.storage_bytes(torch.float16)
        tot_dense += dense
        tot_sketch += sketch
        print(f"{name:<10} {f'{o}x{i}':>12} {w_err.item():>10.4f} {y_err.item():>10.4f} {dense:>11,} "
              f"{sketch:>10,} {dense / sketch:>5.2f}x {dt * 1e3:>6.0f}ms")
    print(f"total: dense bf16 {tot_dense:,} B -> sketch {tot_sketch:,} B "
          f"({16 * tot_sketch / tot_dense:.2f} bits/weight incl. LUTs, {tot_dense / tot_sketch:.2f}x smaller)")
    print(sk)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

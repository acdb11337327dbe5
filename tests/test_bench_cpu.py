"""Smoke test of bench/bench_cpu.py --quick: it runs, writes the documented schema, and its rows
say which CPU path ran (the fused pass at decode sizes where the CPU has AVX2, bf16 tiles for bf16
models from 8 tokens on where it multiplies bf16 natively)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

import spallm_ext
from spallm_ext import kernels

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_cpu.py"


def test_quick_run_writes_both_paths(tmp_path):
    out = tmp_path / "cpu.json"
    subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out)], check=True, capture_output=True)
    data = json.loads(out.read_text())
    for key in ("device", "torch", "cuda", "commit", "rows", "threads", "cpu_simd", "cpu_bf16"):
        assert key in data, key
    rows = data["rows"]
    have = kernels.cpu_kernels()
    widest = "avx512" if "avx512" in have else "avx2" if "avx2" in have else None
    bf16 = spallm_ext.build_info()["cpu_bf16"]
    auto_bf16 = bf16 and torch.backends.mkldnn.is_available()
    impls = {r["impl"] for r in rows}
    assert {"torch_matmul_fp32", "torch_matmul_bf16", "spallm"} <= impls
    # every path this CPU has, forced, besides auto's own (the widest, forced only for bf16 models)
    assert ("spallm_portable" in impls) == (widest is not None)
    assert ("spallm_avx2" in impls) == (widest == "avx512" or (widest == "avx2" and bf16))
    assert ("spallm_avx512" in impls) == (widest == "avx512" and bf16)
    assert ("spallm_bf16" in impls) == (widest is not None and bf16)
    dot = "avx512bf16" in have  # auto's bf16 dot-product pass for bf16 models up to 20 tokens
    for r in rows:
        for key in ("impl", "M", "N", "K", "bits", "groups_per_row", "adapters", "median_us"):
            assert key in r, (key, r)
        assert r["median_us"] > 0
        if r["impl"] == "spallm":
            if widest is None:
                assert r["cpu_path"] == "portable_tiles"
            elif dot and r["x_dtype"] == "bf16" and r["M"] <= 20:
                assert r["cpu_path"] == "avx512bf16_gemv"
            elif auto_bf16 and r["x_dtype"] == "bf16" and r["M"] >= (21 if dot else 16 if widest == "avx512" else 8):
                assert r["cpu_path"] == "bf16_tiles"
            else:
                assert r["cpu_path"] == f"{widest}_gemv"
        for isa in ("avx2", "avx512"):
            if r["impl"] == f"spallm_{isa}":
                assert r["cpu_path"] == f"{isa}_gemv"
                if isa == widest:
                    assert r["x_dtype"] == r["lut_dtype"] == "bf16"
        if r["impl"] == "spallm_portable":
            assert r["cpu_path"] == "portable_tiles"
        if r["impl"] == "spallm_bf16":
            assert r["x_dtype"] == "bf16" and r["cpu_path"] in ("bf16_tiles", f"{widest}_gemv")
    assert {r["bits"] for r in rows if r["impl"] == "spallm"} == {2, 3, 4}


def test_quick_train_step_run(tmp_path):
    out = tmp_path / "train.json"
    script = BENCH.parent / "bench_cpu_train.py"
    subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], check=True, capture_output=True)
    data = json.loads(out.read_text())
    for key in ("device", "torch", "cuda", "commit", "rows", "threads", "cpu_simd", "cpu_bf16"):
        assert key in data, key
    rows = data["rows"]
    assert {(r["impl"], r["dtype"]) for r in rows} == {(i, d) for i in ("dense", "spallm")
                                                       for d in ("fp32", "autocast_bf16")}
    auto_bf16 = (spallm_ext.build_info()["cpu_bf16"] and torch.backends.mkldnn.is_available()
                 and torch.backends.mkldnn.enabled)
    for r in rows:
        assert r["median_ms"] > 0
        if r["impl"] == "spallm":
            # the step's last op is lut_grad: bf16 dW tiles under autocast where auto takes them
            bf16 = r["dtype"] == "autocast_bf16" and auto_bf16
            assert r["cpu_path"] == ("bf16_tiles" if bf16 else "portable_tiles")

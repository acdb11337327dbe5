"""Dispatch thresholds (spallm_ext.kernels) and their measurement (spallm_ext.tuning)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import spallm_ext
from spallm_ext import cli, kernels, reference, tuning

CUDA_BUILD = bool(spallm_ext.build_info()["cuda"])
HAS_GPU = CUDA_BUILD and torch.cuda.is_available()
CPU_SIMD = spallm_ext.build_info()["cpu_simd"]


@pytest.fixture(autouse=True)
def _builtin_thresholds():
    yield
    kernels.reset_dispatch_thresholds("cpu")
    kernels.reset_dispatch_thresholds("cuda")


def _sketch(n, k, bits, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = spallm_ext.pack_codes(torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8), bits)
    return codes, torch.randn(n, groups, 1 << bits, generator=g)


# ------------------------------------------------------------------------------------------------
# Setting and reading thresholds

def test_threshold_names_and_builtin_values():
    assert set(kernels.dispatch_thresholds("cuda")) == {"direct_max_tokens", "regs_max_tokens", "mma_max_tokens",
                                                        "dx_mma_max_tokens", "decode_min_tokens"}
    assert set(kernels.dispatch_thresholds("cpu")) == {"gemv_max_tokens", "bf16_min_tokens", "bf16_gemv_min_tokens",
                                                       "bf16_gemv_max_tokens"}
    for device in kernels.THRESHOLD_DEVICES:
        assert kernels.dispatch_thresholds(device) == kernels.dispatch_thresholds(device, builtin=True)
    cuda = kernels.dispatch_thresholds("cuda", builtin=True)
    assert cuda["direct_max_tokens"] <= 16 and cuda["regs_max_tokens"] <= 32
    # The CPU's built-in gemv crossover follows its widest vector kernels (none: no fused pass).
    want = {"avx512": 4096, "avx2+fma": 16, "none": 0}[CPU_SIMD]
    assert kernels.dispatch_thresholds("cpu")["gemv_max_tokens"] == want


def test_set_reset_and_context_manager():
    kernels.set_dispatch_thresholds("cpu", gemv_max_tokens=3, bf16_min_tokens=5)
    assert kernels.dispatch_thresholds("cpu")["gemv_max_tokens"] == 3
    assert kernels.dispatch_thresholds("cpu")["bf16_min_tokens"] == 5
    assert kernels.dispatch_thresholds("cpu", builtin=True)["gemv_max_tokens"] != 3 or CPU_SIMD == "none"
    with kernels.use_dispatch_thresholds("cpu", gemv_max_tokens=7, bf16_min_tokens=None):
        assert kernels.dispatch_thresholds("cpu")["gemv_max_tokens"] == 7
        assert kernels.dispatch_thresholds("cpu")["bf16_min_tokens"] == \
            kernels.dispatch_thresholds("cpu", builtin=True)["bf16_min_tokens"]
    assert kernels.dispatch_thresholds("cpu")["gemv_max_tokens"] == 3
    assert kernels.dispatch_thresholds("cpu")["bf16_min_tokens"] == 5
    kernels.set_dispatch_thresholds("cpu", gemv_max_tokens=None)
    kernels.reset_dispatch_thresholds("cpu")
    assert kernels.dispatch_thresholds("cpu") == kernels.dispatch_thresholds("cpu", builtin=True)


def test_bad_thresholds_are_refused_by_name():
    with pytest.raises(ValueError, match="gemv_max_tokenz"):
        kernels.set_dispatch_thresholds("cpu", gemv_max_tokenz=3)
    with pytest.raises(ValueError, match="bf16_min_tokens.*got 0"):
        kernels.set_dispatch_thresholds("cpu", bf16_min_tokens=0)
    with pytest.raises(ValueError, match="direct_max_tokens.*\\[0, 16\\].*got 17"):
        kernels.set_dispatch_thresholds("cuda", direct_max_tokens=17)
    with pytest.raises(TypeError, match="gemv_max_tokens"):
        kernels.set_dispatch_thresholds("cpu", gemv_max_tokens=2.5)
    with pytest.raises(TypeError, match="gemv_max_tokens"):
        kernels.set_dispatch_thresholds("cpu", gemv_max_tokens=True)
    with pytest.raises(ValueError, match="device"):
        kernels.dispatch_thresholds("tpu")
    # Checked before anything is set: a bad second name leaves the first alone.
    with pytest.raises(ValueError, match="nope"):
        kernels.set_dispatch_thresholds("cpu", gemv_max_tokens=3, nope=1)
    assert kernels.dispatch_thresholds("cpu") == kernels.dispatch_thresholds("cpu", builtin=True)


def test_cuda_thresholds_in_this_build():
    if CUDA_BUILD:
        kernels.set_dispatch_thresholds("cuda", mma_max_tokens=100, direct_max_tokens=0)
        got = kernels.dispatch_thresholds("cuda")
        assert got["mma_max_tokens"] == 100 and got["direct_max_tokens"] == 0
    else:
        with pytest.raises(RuntimeError, match="no CUDA in this build"):
            kernels.set_dispatch_thresholds("cuda", mma_max_tokens=100)
        assert kernels.dispatch_thresholds("cuda") == kernels.dispatch_thresholds("cuda", builtin=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_threshold_moves_the_path_not_the_result(dtype):
    codes, lut = _sketch(96, 256, 4, 4, seed=1)
    x = torch.randn(6, 256).to(dtype)
    ref = reference.lut_linear(x.double(), codes, lut.double())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    plans = []
    # fp32: the fused pass up to gemv_max_tokens, decode + BLAS beyond; bf16 x on the fp32 route likewise.
    for setting in (dict(gemv_max_tokens=6), dict(gemv_max_tokens=5)):
        with kernels.use_dispatch_thresholds("cpu", bf16_min_tokens=1 << 40, bf16_gemv_max_tokens=0, **setting):
            y = torch.ops.spallm.lut_linear(x, codes, lut)
            plans.append(kernels.last_cpu_plan())
        torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    if CPU_SIMD == "none":
        assert plans == ["portable_tiles", "portable_tiles"]
    else:
        assert plans[0].endswith("_gemv") and plans[1].endswith("_tiles"), plans


@pytest.mark.parametrize("m", [1, 4])
def test_cpu_bf16_gemv_thresholds(m):
    codes, lut = _sketch(64, 256, 4, 2, seed=2)
    x = torch.randn(m, 256).bfloat16()
    ref = reference.lut_linear(x.double(), codes, lut.bfloat16().double())
    plans = {}
    for name, setting in (("on", dict(bf16_gemv_min_tokens=m, bf16_gemv_max_tokens=m)),
                          ("above_max", dict(bf16_gemv_min_tokens=1, bf16_gemv_max_tokens=m - 1)),
                          ("below_min", dict(bf16_gemv_min_tokens=m + 1, bf16_gemv_max_tokens=32))):
        with kernels.use_dispatch_thresholds("cpu", **setting):
            y = torch.ops.spallm.lut_linear(x, codes, lut)
            plans[name] = kernels.last_cpu_plan()
        if plans[name] == "avx512bf16_gemv":
            torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    assert plans["above_max"] != "avx512bf16_gemv" and plans["below_min"] != "avx512bf16_gemv"
    if "avx512bf16" in kernels.cpu_kernels():
        assert plans["on"] == "avx512bf16_gemv"
    else:
        assert plans["on"] == plans["above_max"]


# ------------------------------------------------------------------------------------------------
# Reading thresholds from timings

@pytest.mark.parametrize("ours,theirs,builtin,want", [
    ([1, 1, 1, 1, 3, 3], [2] * 6, 16, 8),               # wins up to 8
    ([1, 1, 2.1, 1, 1, 3], [2] * 6, 16, 16),           # one near-tie loss does not cut the run
    ([3] * 6, [2] * 6, 16, 0),                         # never wins
    ([1] * 6, [2] * 6, 4096, 4096),                    # wins at every M measured: beyond is the built-in's
    ([1] * 6, [2] * 6, 16, 32),                        # ... unless the built-in is smaller
    ([2] * 6, [2] * 6, 4, 4),                          # all settings equal: the built-in
    ([5, 1, 1, 1, 1, 3], [2] * 6, 16, 16),             # a slow first point does not forbid the path
])
def test_fit_up_to(ours, theirs, builtin, want):
    assert tuning.fit_up_to([1, 2, 4, 8, 16, 32], ours, theirs, builtin) == want


def _rows(op, dtype, times: dict, shapes=((256, 512), (512, 256))):
    """Rows for `times` {path: {M: us}}; the second shape takes twice as long (geomeans scale alike)."""
    return [dict(op=op, dtype=dtype, path=p, M=m, N=n, K=k, median_us=t * (1 + i))
            for p, by_m in times.items() for m, t in by_m.items() for i, (n, k) in enumerate(shapes)]


def test_decide_cuda_from_synthetic_timings():
    ms = [1, 2, 4, 8, 12, 16, 24, 32, 64, 128, 256, 512, 1024]
    # direct best up to 8, regs best 12..24, mma best 32..256, decode beyond.
    direct = {m: 10 if m <= 8 else 30 for m in ms if m <= 16}
    # regs loses to mma where direct runs anyway (<= 8): only the M past direct's setting count.
    regs = {m: 30 if m <= 8 else 20 if m <= 24 else 40 for m in ms if m <= 32}
    mma = {m: 25 if m <= 256 else 10 * m for m in ms}
    decode = {m: 35 if m <= 256 else 5 * m for m in ms}
    rows = _rows("linear", "bf16", dict(mma_regs_direct=direct, mma_regs=regs, mma=mma, decode_gemm=decode))
    rows += _rows("dx", "bf16", dict(mma={m: 1 if m <= 128 else 3 for m in ms if m >= 16},
                                      decode_gemm={m: 2 for m in ms if m >= 16}))
    rows += _rows("linear", "fp32", dict(simple={m: m for m in ms if m <= 256}, decode_gemm={m: 20 for m in ms if m <= 256}))
    builtin = kernels.dispatch_thresholds("cuda", builtin=True)
    got = tuning.decide_cuda(rows, builtin)
    assert got == dict(direct_max_tokens=8, regs_max_tokens=24, mma_max_tokens=256, dx_mma_max_tokens=128,
                       decode_min_tokens=17)  # simple (m us) beats 20 us up to 16
    # Untimed paths keep the built-in values.
    fwd_only = [r for r in rows if r["op"] == "linear" and r["dtype"] == "bf16"]
    got = tuning.decide_cuda(fwd_only, builtin)
    assert got["dx_mma_max_tokens"] == builtin["dx_mma_max_tokens"]
    assert got["decode_min_tokens"] == builtin["decode_min_tokens"]
    assert tuning.decide_cuda([], builtin) == builtin


def test_decide_cuda_regs_never_below_direct():
    ms = [1, 2, 4, 8, 16, 32]
    rows = _rows("linear", "bf16", dict(mma_regs_direct={m: 1 for m in ms if m <= 16}, mma_regs={m: 9 for m in ms},
                                         mma={m: 5 for m in ms}, decode_gemm={m: 50 for m in ms}))
    got = tuning.decide_cuda(rows, kernels.dispatch_thresholds("cuda", builtin=True))
    assert got["direct_max_tokens"] == 16 and got["regs_max_tokens"] == 16


def test_decide_cpu_from_synthetic_timings():
    ms = [1, 2, 4, 8, 16, 32, 64, 128]
    rows = _rows("linear", "fp32", dict(gemv={m: m for m in ms}, tiles={m: 10 + m / 4 for m in ms}))
    rows += _rows("linear", "bf16", dict(bf16_gemv={m: 1.5 if m == 1 else m / 2 for m in ms},
                                         fp32_pass={m: m for m in ms}, bf16_tiles={m: 11 + m / 8 for m in ms}))
    got = tuning.decide_cpu(rows, kernels.dispatch_thresholds("cpu", builtin=True))
    # gemv: m < 10 + m/4 up to m = 8 (13.3 at 16 loses). bf16: one token is faster on the fp32
    # pass (1 < 1.5), the dot products win from 2 while m/2 < 11 + m/8, up to 16; past 16 the
    # tiles beat the fp32 pass everywhere, so they start right after.
    assert got == dict(gemv_max_tokens=8, bf16_gemv_min_tokens=2, bf16_gemv_max_tokens=16, bf16_min_tokens=17)
    # The dot products fitted only where they run: a slow first token does not shorten their range.
    rows = [r for r in rows if not (r["path"] == "bf16_gemv" and r["M"] == 1)]
    assert tuning.decide_cpu(rows, kernels.dispatch_thresholds("cpu", builtin=True))["bf16_gemv_min_tokens"] == 1


# ------------------------------------------------------------------------------------------------
# Measuring, files, environment, CLI

def test_tune_cpu_end_to_end(tmp_path):
    result = tuning.tune("cpu", shapes=[(128, 256)], tokens=[1, 8, 64], budget_ms=1, progress=False)
    builtin = kernels.dispatch_thresholds("cpu", builtin=True)
    assert result.device == "cpu" and result.builtin == builtin and set(result.thresholds) == set(builtin)
    timed = {(r["dtype"], r["path"]) for r in result.rows}
    assert ("bf16", "fp32_pass") in timed
    if CPU_SIMD != "none":
        assert {("fp32", "gemv"), ("fp32", "tiles")} <= timed
    assert all(r["median_us"] > 0 and math.isfinite(r["median_us"]) for r in result.rows)
    assert {r["M"] for r in result.rows} == {1, 8, 64}
    assert result.thresholds == tuning.decide_cpu(result.rows, builtin)
    assert kernels.dispatch_thresholds("cpu") == result.thresholds  # applied
    path = tuning.save_tuning(result, tmp_path / "cpu.json")
    kernels.reset_dispatch_thresholds("cpu")
    loaded = tuning.load_tuning(path)
    assert loaded == result
    assert kernels.dispatch_thresholds("cpu") == result.thresholds


def test_tune_refuses_bad_arguments():
    with pytest.raises(ValueError, match="device"):
        tuning.tune("tpu")
    with pytest.raises(ValueError, match="tokens"):
        tuning.tune("cpu", tokens=[0, 4], progress=False)
    with pytest.raises(ValueError, match="groups_per_row"):
        tuning.tune("cpu", shapes=[(64, 100)], groups_per_row=3, progress=False)
    if not HAS_GPU:
        with pytest.raises(RuntimeError, match="GPU"):
            tuning.tune("cuda")


def _tuning_file(tmp_path, **changes):
    t = tuning.Tuning(device="cpu", device_name=tuning._device_name("cpu"), thresholds={"gemv_max_tokens": 12},
                      builtin=kernels.dispatch_thresholds("cpu", builtin=True), rows=[], meta={})
    data = {**t.to_json(), **changes}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    return path


def test_load_tuning_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        tuning.load_tuning(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        tuning.load_tuning(bad)
    with pytest.raises(ValueError, match="format"):
        tuning.load_tuning(_tuning_file(tmp_path, format="other/1"))
    with pytest.raises(ValueError, match="device"):
        tuning.load_tuning(_tuning_file(tmp_path, device="tpu"))
    with pytest.raises(ValueError, match="gemv_max_tokenz"):
        tuning.load_tuning(_tuning_file(tmp_path, thresholds={"gemv_max_tokenz": 3}))
    with pytest.raises(ValueError, match="ints"):
        tuning.load_tuning(_tuning_file(tmp_path, thresholds={"gemv_max_tokens": "3"}))
    assert kernels.dispatch_thresholds("cpu") == kernels.dispatch_thresholds("cpu", builtin=True)
    with pytest.warns(UserWarning, match="measured on 'another cpu'"):
        tuning.load_tuning(_tuning_file(tmp_path, device_name="another cpu"))
    assert kernels.dispatch_thresholds("cpu")["gemv_max_tokens"] == 12
    tuning.load_tuning(_tuning_file(tmp_path, thresholds={"gemv_max_tokens": 20}), apply=False)
    assert kernels.dispatch_thresholds("cpu")["gemv_max_tokens"] == 12


def _import_and_print(env_value):
    env = dict(os.environ, SPALLM_EXT_TUNING=env_value)
    code = "import json, spallm_ext.kernels as k; print(json.dumps(k.dispatch_thresholds('cpu')))"
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_environment_variable_applies_at_import(tmp_path):
    got, _ = _import_and_print(str(_tuning_file(tmp_path)))
    assert got["gemv_max_tokens"] == 12
    got, err = _import_and_print(str(tmp_path / "missing.json"))  # a warning, not an import error
    assert got == kernels.dispatch_thresholds("cpu", builtin=True)
    assert "SPALLM_EXT_TUNING" in err and "missing.json" in err


def test_cli_tune(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    rc = cli.main(["tune", "--device", "cpu", "--shapes", "128x256", "--tokens", "1,8", "--budget-ms", "1",
                   "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "gemv_max_tokens" in text and "M=8" in text
    saved = tuning.load_tuning(out, apply=False)
    assert saved.meta["shapes"] == [[128, 256]] and saved.meta["tokens"] == [1, 8]
    assert cli.main(["tune", "--device", "cpu", "--shapes", "128by256"]) == 2
    assert "--shapes" in capsys.readouterr().err
    assert cli.main(["tune", "--device", "cpu", "--tokens", "1,x"]) == 2
    assert "--tokens" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# GPU

@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU and a CUDA build")
def test_tune_cuda_small():
    result = tuning.tune("cuda", shapes=[(512, 1024)], tokens=[1, 16, 24, 64, 600], budget_ms=2, progress=False)
    paths = {(r["op"], r["dtype"], r["path"]) for r in result.rows}
    assert {("linear", "bf16", p) for p in ("mma_regs_direct", "mma_regs", "mma", "decode_gemm")} <= paths
    assert {("dx", "bf16", "mma"), ("linear", "fp32", "simple")} <= paths
    specs = {name: (lo, hi) for name, _, _, lo, hi in spallm_ext._C.cuda_thresholds()}
    for name, value in result.thresholds.items():
        assert specs[name][0] <= value <= specs[name][1], (name, value)
    assert kernels.dispatch_thresholds("cuda") == result.thresholds
    # The tuned dispatch gives the same results as the built-in one, within the paths' rounding.
    codes, lut = _sketch(512, 1024, 4, 4)
    codes, lut = codes.cuda(), lut.cuda()
    for m in (1, 24, 600):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        y = torch.ops.spallm.lut_linear(x, codes, lut)
        ref = reference.lut_linear(x.double().cpu(), codes.cpu(), lut.bfloat16().double().cpu())
        torch.testing.assert_close(y.double().cpu(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_parse_shapes():
    assert tuning.parse_shapes("4096x4096, 14336X4096,") == [(4096, 4096), (14336, 4096)]
    for bad in ("", "64x", "0x64", "64x64x2", "axb", ","):
        with pytest.raises(ValueError, match="OUTxIN"):
            tuning.parse_shapes(bad)

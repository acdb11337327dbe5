"""Shared helpers of the spallm_ext test suite.

* ``DEVICES``: the device parametrization; the CUDA entry is marked ``cuda`` and skipped cleanly
  without a GPU, so every test written against it runs on CPU here and on both devices on a GPU box.
* ``make_sketch``: random (or adversarial) packed codes plus a LUT.
* ``assert_close_rel``: relative-norm comparison against spallm_ext.reference, with a tolerance
  set by the dtype the result is rounded to.
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

# torch reads this once per process, at its first cuBLAS call: a test that turns deterministic
# algorithms on (test_sketch_hessian) needs it set before any other test touches cuBLAS.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest
import torch

import spallm_ext
from spallm_ext.formats import pack_unit

HAS_CUDA = torch.cuda.is_available() and spallm_ext.build_info()["cuda"]
requires_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)" if not torch.cuda.is_available()
    else "a GPU is present but this build of spallm_ext has no CUDA kernels (rebuild with nvcc)")
CUDA_MARKS = [requires_cuda, pytest.mark.cuda]

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA_MARKS)]

# The tests that check which kernel runs assume the built-in dispatch thresholds: a tuning file
# applied at import ($SPALLM_EXT_TUNING, spallm_ext.tuning) is undone for the test session.
for _device in spallm_ext.kernels.THRESHOLD_DEVICES:
    spallm_ext.kernels.reset_dispatch_thresholds(_device)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALL_BITS = (2, 3, 4)
ALL_GROUPS = (1, 2, 4, 8)

# Relative error ||out - ref|| / ||ref|| allowed for a result rounded to this dtype. The kernels
# accumulate in fp32 (fp64 for fp64 activations on CPU); the reference accumulates in fp64.
REL_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
}


def dtype_id(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def act_lut_dtype_params():
    """(device, act_dtype) pairs: fp64 only on CPU (the CUDA kernels reject it)."""
    out = []
    for dev in DEVICES:
        name = dev.values[0]
        for dt in FLOAT_DTYPES + ((torch.float64,) if name == "cpu" else ()):
            out.append(pytest.param(name, dt, id=f"{name}-{dtype_id(dt)}", marks=dev.marks))
    return out


def device_dtype_params():
    """(device, act_dtype, lut_dtype) triples; fp64 (either side) only on CPU."""
    out = []
    for dev in DEVICES:
        name = dev.values[0]
        dts = FLOAT_DTYPES + ((torch.float64,) if name == "cpu" else ())
        for a in dts:
            for l in dts:
                out.append(pytest.param(name, a, l, id=f"{name}-x_{dtype_id(a)}-lut_{dtype_id(l)}",
                                        marks=dev.marks))
    return out


def odd_in_features(bits: int, groups: int, at_least: int = 16) -> int:
    """Smallest in_features >= at_least allowed for (bits, groups) whose group size is NOT a
    multiple of 8 when that is possible (3-bit with one group always has groups of 8k)."""
    unit = pack_unit(bits)
    base = unit * groups // math.gcd(unit, groups)
    k = base * max(1, -(-at_least // base))
    for _ in range(64):
        if (k // groups) % 8:
            return k
        k += base
    return base * max(1, -(-at_least // base))


def make_codes(n: int, k: int, bits: int, *, mode: str = "random", gen: torch.Generator | None = None) -> torch.Tensor:
    """Unpacked integer codes [n, k] (int64). Modes: random, zeros, equal (all one mid value),
    alternating (0, max, 0, max, ... per row, shifted by row), max (all 2^b - 1)."""
    e = 1 << bits
    if mode == "random":
        return torch.randint(0, e, (n, k), generator=gen)
    if mode == "zeros":
        return torch.zeros(n, k, dtype=torch.long)
    if mode == "equal":
        return torch.full((n, k), e // 2 + 1, dtype=torch.long)
    if mode == "alternating":
        idx = torch.arange(k)[None, :] + torch.arange(n)[:, None]
        return torch.where(idx % 2 == 0, 0, e - 1).long()
    if mode == "max":
        return torch.full((n, k), e - 1, dtype=torch.long)
    raise ValueError(mode)


def make_sketch(n: int, k: int, bits: int, groups: int, *, lut_dtype=torch.float32, device="cpu",
                mode: str = "random", seed: int = 0):
    """(packed codes uint8 [n, row_bytes], lut [n, groups, 2^bits]) on `device`."""
    gen = torch.Generator().manual_seed(seed)
    codes = make_codes(n, k, bits, mode=mode, gen=gen)
    lut = torch.randn(n, groups, 1 << bits, generator=gen, dtype=torch.float64)
    return spallm_ext.pack_codes(codes, bits).to(device), lut.to(device=device, dtype=lut_dtype)


def randn(*shape, dtype=torch.float32, device="cpu", seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = r.norm().item()
    num = (o - r).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, *,
                     factor: float = 1.0) -> None:
    """Same shape, same dtype as ref, all finite where ref is, and relative-norm error under the
    tolerance of `dtype` (default: out's dtype)."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"dtype {out.dtype} != reference {ref.dtype}"
    if ref.numel() == 0:
        return
    assert torch.isfinite(out).all(), "non-finite values in output"
    tol = REL_TOL[dtype or out.dtype] * factor
    err = rel_err(out, ref)
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e}"



def assert_opcheck_passes(result: dict) -> None:
    """torch.library.opcheck's report: at least one check ran and every one succeeded."""
    assert result, "opcheck ran no test"
    bad = {k: v for k, v in result.items() if v != "SUCCESS"}
    assert not bad, bad


BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench(name: str):
    """A fresh instance of the script bench/<name>.py as a module (its main() takes argv); the
    scripts put bench/ on sys.path themselves for their sibling modules."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def one_thread():
    """torch on one thread for the test: on a shared 2-core machine OpenMP teams of 2 can stall
    for hundreds of milliseconds, which the benchmark smoke tests would otherwise wait out."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

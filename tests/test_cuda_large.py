"""Outputs with more than 2^31 elements on CUDA (64-bit indexing). The full reference is never
built: sampled tokens and features are checked against the reference on those samples only.
The automatic choice at these token counts is decode + cuBLAS, whose big output cuBLAS writes; the
exact and tensor-core kernels are forced too, so this package's own epilogues write it as well."""
from __future__ import annotations

import pytest
import torch

import spallm_ext
from spallm_ext import kernels, reference

from conftest import CUDA_MARKS, REL_TOL, make_sketch, rel_err

pytestmark = [*CUDA_MARKS, pytest.mark.slow]

NEED_FREE_BYTES = 16 * 2**30


@pytest.fixture
def big_gpu():
    free, _ = torch.cuda.mem_get_info()
    if free < NEED_FREE_BYTES:
        pytest.skip(f"needs {NEED_FREE_BYTES / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    yield
    torch.cuda.empty_cache()


def _samples(size: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """Random indices plus both ends (the last elements are where 32-bit offsets wrap)."""
    idx = torch.randint(0, size, (count,), generator=gen)
    return torch.cat([torch.tensor([0, 1, size - 2, size - 1]), idx]).unique()


PATHS = [("auto", "decode_gemm"), ("simple", "simple"), ("mma", "mma")]


@pytest.mark.parametrize("path,plan", PATHS)
def test_lut_linear_output_over_2_pow_31(big_gpu, path, plan):
    m, k, n, bits, groups = 65536, 128, 32768, 4, 2  # groups of 64 columns: every path takes them
    assert m * n >= 2**31
    gen = torch.Generator().manual_seed(0)
    codes, lut = make_sketch(n, k, bits, groups, seed=1)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    with kernels.use_cuda_kernel(path):
        y = spallm_ext.lut_linear(x.cuda(), codes.cuda(), lut.cuda(), bias.cuda())
        assert kernels.last_cuda_plan().split()[0] == plan, kernels.last_cuda_plan()
    assert y.shape == (m, n) and y.dtype == torch.bfloat16 and y.numel() >= 2**31
    rows, cols = _samples(m, 60, gen), _samples(n, 60, gen)
    got = y[rows.cuda()][:, cols.cuda()].cpu()
    del y
    ref = reference.lut_linear(x[rows], codes[cols].contiguous(), lut[cols].contiguous(), bias[cols])
    assert rel_err(got, ref) <= REL_TOL[torch.bfloat16]
    # the very last element on its own
    assert abs(float(got[-1, -1]) - float(ref[-1, -1])) <= 0.02 * (1 + abs(float(ref[-1, -1])))


@pytest.mark.parametrize("path,plan", PATHS)
def test_lut_linear_dx_output_over_2_pow_31(big_gpu, path, plan):
    m, n, k, bits, groups = 65536, 64, 32768, 2, 4
    assert m * k >= 2**31
    gen = torch.Generator().manual_seed(2)
    codes, lut = make_sketch(n, k, bits, groups, seed=3)
    dy = torch.randn(m, n, generator=gen).to(torch.bfloat16)
    with kernels.use_cuda_kernel(path):
        dx = spallm_ext.lut_linear_dx(dy.cuda(), codes.cuda(), lut.cuda())
        assert kernels.last_cuda_plan().split()[0] == plan, kernels.last_cuda_plan()
    assert dx.shape == (m, k) and dx.numel() >= 2**31
    rows, cols = _samples(m, 60, gen), _samples(k, 60, gen)
    got = dx[rows.cuda()][:, cols.cuda()].cpu()
    del dx
    w_cols = reference.lut_decode(codes, lut)[:, cols].double()  # [n, sampled k], small
    ref = (dy[rows].double() @ w_cols).to(torch.bfloat16)
    assert rel_err(got, ref) <= REL_TOL[torch.bfloat16]

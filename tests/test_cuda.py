"""CUDA against CPU on the same inputs, and run-to-run determinism of lut_grad on CUDA."""
from __future__ import annotations

import pytest
import torch

import spallm_ext
from spallm_ext import kernels, reference

from conftest import ALL_BITS, CUDA_MARKS, FLOAT_DTYPES, REL_TOL, dtype_id, make_sketch, randn, rel_err

pytestmark = CUDA_MARKS


def cpu_lut_grad_fp32(*args):
    """CPU lut_grad with dW in fp32: the automatic CPU path rounds each dW element to bf16 for bf16
    activations (bf16_tiles, as autocast's weight gradient), the CUDA kernels keep it in fp32;
    a forced path takes fp32 tiles, so the two compare at fp32 tolerance."""
    with kernels.use_cpu_kernel("portable"):
        out = spallm_ext.lut_grad(*args)
        assert kernels.last_cpu_plan() == "portable_tiles", kernels.last_cpu_plan()
    return out


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("act_dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("lut_dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m,n,k,groups", [(37, 130, 264, 4), (1, 96, 1000, 8), (300, 33, 72, 1)])
def test_cuda_matches_cpu(bits, act_dtype, lut_dtype, m, n, k, groups):
    codes, lut = make_sketch(n, k, bits, groups, lut_dtype=lut_dtype, seed=m + bits)
    x = randn(m, k, dtype=act_dtype, seed=1)
    dy = randn(m, n, dtype=act_dtype, seed=2)
    bias = randn(n, dtype=act_dtype, seed=3)
    cu = [t.cuda() for t in (x, dy, bias, codes, lut)]
    xc, dyc, bc, cc, lc = cu

    pairs = [
        (spallm_ext.lut_linear(x, codes, lut, bias), spallm_ext.lut_linear(xc, cc, lc, bc), act_dtype),
        (spallm_ext.lut_linear(x, codes, lut), spallm_ext.lut_linear(xc, cc, lc), act_dtype),
        (spallm_ext.lut_linear_dx(dy, codes, lut), spallm_ext.lut_linear_dx(dyc, cc, lc), act_dtype),
        (cpu_lut_grad_fp32(dy, x, codes, groups, 1 << bits),
         spallm_ext.lut_grad(dyc, xc, cc, groups, 1 << bits), torch.float32),
    ]
    for cpu_out, cuda_out, dt in pairs:
        assert cuda_out.is_cuda and cuda_out.dtype == cpu_out.dtype and cuda_out.shape == cpu_out.shape
        # each is within REL_TOL of the fp64 reference, so of each other within twice that
        err = rel_err(cuda_out, cpu_out)
        assert err <= 2 * REL_TOL[dt], f"cuda vs cpu relative error {err:.3e}"
    assert torch.equal(spallm_ext.lut_decode(cc, lc).cpu(), spallm_ext.lut_decode(codes, lut))


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("act_dtype", FLOAT_DTYPES, ids=dtype_id)
def test_cuda_lut_grad_deterministic(bits, act_dtype):
    # groups of 1024 columns: 16 column tiles of 64 add into every bucket, in an order atomics
    # would change from run to run (with 2 tiles, a + b == b + a would hide it)
    m, n, k, groups = 4099, 64, 2048, 2
    codes, _ = make_sketch(n, k, bits, groups, device="cuda", seed=bits)
    x = randn(m, k, dtype=act_dtype, device="cuda", seed=1)
    dy = randn(m, n, dtype=act_dtype, device="cuda", seed=2)
    a = spallm_ext.lut_grad(dy, x, codes, groups, 1 << bits, deterministic=True)
    plan = kernels.last_cuda_plan()
    assert plan.startswith("simple" if act_dtype == torch.float32 else "mma"), plan
    b = spallm_ext.lut_grad(dy, x, codes, groups, 1 << bits, deterministic=True)
    assert torch.equal(a, b)
    ref = reference.lut_grad(dy, x, codes, groups, 1 << bits)
    assert rel_err(a, ref) <= REL_TOL[torch.float32]


def test_cuda_backward_through_module():
    torch.manual_seed(0)
    mod = spallm_ext.SketchedLinear(64, 48, bits=3, groups_per_row=4, train_bias=True)
    mod_cuda = spallm_ext.SketchedLinear(64, 48, bits=3, groups_per_row=4, train_bias=True).cuda()
    mod_cuda.load_state_dict(mod.state_dict())
    x = randn(5, 7, 64, seed=1)
    x_cpu, x_cuda = x.clone().requires_grad_(True), x.cuda().requires_grad_(True)
    (mod(x_cpu) ** 2).sum().backward()
    (mod_cuda(x_cuda) ** 2).sum().backward()
    tol = 2 * REL_TOL[torch.float32]
    assert rel_err(x_cuda.grad, x_cpu.grad) <= tol
    assert rel_err(mod_cuda.lut.grad, mod.lut.grad) <= tol
    assert rel_err(mod_cuda.bias.grad, mod.bias.grad) <= tol

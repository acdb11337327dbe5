"""Autograd of lut_linear: gradcheck in fp64 (op and SketchedLinear), and the backward in low
precision against autograd through the dense reference."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import spallm_ext
from spallm_ext import reference

from conftest import ALL_BITS, DEVICES, act_lut_dtype_params, assert_close_rel, make_sketch, odd_in_features, randn


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_gradcheck_lut_linear_fp64(bits, groups, with_bias):
    k = odd_in_features(bits, groups, 8)
    codes, lut = make_sketch(3, k, bits, groups, lut_dtype=torch.float64, seed=bits)
    x = randn(2, 2, k, dtype=torch.float64, seed=1).requires_grad_(True)
    lut.requires_grad_(True)
    if with_bias:
        bias = randn(3, dtype=torch.float64, seed=2).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x, l, b: spallm_ext.lut_linear(x, codes, l, b), (x, lut, bias))
    else:
        assert torch.autograd.gradcheck(lambda x, l: spallm_ext.lut_linear(x, codes, l), (x, lut))


def test_gradcheck_lut_linear_fp64_only_lut():
    """needs_input_grad paths: x without grad, only the LUT."""
    codes, lut = make_sketch(4, 16, 4, 2, lut_dtype=torch.float64, seed=3)
    x = randn(5, 16, dtype=torch.float64, seed=4)
    assert torch.autograd.gradcheck(lambda l: spallm_ext.lut_linear(x, codes, l), (lut.requires_grad_(True),))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_gradcheck_sketched_linear_fp64(bits):
    torch.manual_seed(bits)
    k = odd_in_features(bits, 2, 8)
    mod = spallm_ext.SketchedLinear(k, 3, bits=bits, groups_per_row=2, bias=True, dtype=torch.float64,
                                    lut_dtype=torch.float64, train_bias=True)
    assert mod.lut.dtype == torch.float64 and mod.bias.requires_grad
    with torch.no_grad():
        mod.lut.copy_(torch.randn_like(mod.lut))
    x = randn(2, 3, k, dtype=torch.float64, seed=5).requires_grad_(True)
    lut = mod.lut.detach().clone().requires_grad_(True)
    bias = mod.bias.detach().clone().requires_grad_(True)

    def f(x, lut, bias):
        return functional_call(mod, {"lut": lut, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, (x, lut, bias))


@pytest.mark.parametrize("device,act_dtype", act_lut_dtype_params())
@pytest.mark.parametrize("lut_dtype", [torch.float32, torch.bfloat16], ids=["lut_fp32", "lut_bf16"])
def test_backward_matches_dense_reference(device, act_dtype, lut_dtype):
    """x.grad, lut.grad and bias.grad of lut_linear vs autograd through the dense fp64 reference."""
    bits, groups, n = 3, 2, 6
    k = odd_in_features(bits, groups, 24)
    codes, lut0 = make_sketch(n, k, bits, groups, lut_dtype=lut_dtype, device=device, seed=6)
    x0 = randn(2, 3, k, dtype=act_dtype, device=device, seed=7)
    b0 = randn(n, dtype=act_dtype, device=device, seed=8)
    dy = randn(2, 3, n, dtype=act_dtype, device=device, seed=9)

    x, lut, b = (t.clone().requires_grad_(True) for t in (x0, lut0, b0))
    y = spallm_ext.lut_linear(x, codes, lut, b)
    y.backward(dy)
    assert x.grad.dtype == act_dtype and lut.grad.dtype == lut_dtype and b.grad.dtype == act_dtype

    xr, lr, br = (t.detach().cpu().double().requires_grad_(True) for t in (x0, lut0, b0))
    yr = xr @ reference.lut_decode(codes.cpu(), lr).T + br
    yr.backward(dy.cpu().double())
    assert_close_rel(x.grad, xr.grad.to(act_dtype))
    # lut.grad is computed in fp32 (fp64 for fp64 activations) then rounded to the LUT dtype
    acc = torch.float64 if act_dtype == torch.float64 else torch.float32
    assert_close_rel(lut.grad, lr.grad.to(lut_dtype), dtype=lut_dtype if lut_dtype != torch.float32 else acc)
    assert_close_rel(b.grad, br.grad.to(act_dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_for_codes_and_frozen_inputs(device):
    codes, lut = make_sketch(4, 16, 4, 1, device=device)
    x = randn(3, 16, device=device).requires_grad_(True)
    y = spallm_ext.lut_linear(x, codes, lut)  # lut without grad
    y.sum().backward()
    assert x.grad is not None and lut.grad is None and codes.grad is None
    assert_close_rel(x.grad, reference.lut_linear_dx(torch.ones(3, 4, device=device), codes, lut))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_gradcheck_lut_decode_fp64(bits):
    """lut_decode is differentiable in the LUT: each weight's gradient lands on its entry."""
    codes, lut = make_sketch(3, odd_in_features(bits, 2, 8), bits, 2, lut_dtype=torch.float64, seed=bits)
    assert torch.autograd.gradcheck(lambda l: spallm_ext.lut_decode(codes, l), (lut.requires_grad_(True),))

"""torch.library.opcheck on every spallm op: schema, fake (meta) kernels, autograd registration,
AOT dispatch (dynamic shapes)."""
from __future__ import annotations

import pytest
import torch

from conftest import ALL_BITS, DEVICES, assert_opcheck_passes, make_sketch, odd_in_features, randn

ops = torch.ops.spallm


def _inputs(device, bits, groups=2, lead=(2, 3), n=5, dtype=torch.float32):
    k = odd_in_features(bits, groups)
    codes, lut = make_sketch(n, k, bits, groups, device=device, seed=bits)
    x = randn(*lead, k, dtype=dtype, device=device, seed=1)
    dy = randn(*lead, n, dtype=dtype, device=device, seed=2)
    bias = randn(n, dtype=dtype, device=device, seed=3)
    return codes, lut, x, dy, bias


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_opcheck_lut_linear(device, bits, with_bias):
    codes, lut, x, _, bias = _inputs(device, bits)
    x.requires_grad_(True)
    lut.requires_grad_(True)
    b = bias.requires_grad_(True) if with_bias else None
    assert_opcheck_passes(torch.library.opcheck(ops.lut_linear.default, (x, codes, lut, b)))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_lut_linear_low_precision_and_zero_tokens(device):
    codes, lut, x, _, bias = _inputs(device, 4, groups=4, lead=(0,), dtype=torch.bfloat16)
    lut = lut.to(torch.float16).requires_grad_(True)
    assert_opcheck_passes(torch.library.opcheck(ops.lut_linear.default,
                                           (x.requires_grad_(True), codes, lut, bias.requires_grad_(True))))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_opcheck_lut_linear_dx(device, bits):
    codes, lut, _, dy, _ = _inputs(device, bits)
    assert_opcheck_passes(torch.library.opcheck(ops.lut_linear_dx.default, (dy, codes, lut)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_opcheck_lut_grad(device, bits):
    codes, lut, x, dy, _ = _inputs(device, bits)
    assert_opcheck_passes(torch.library.opcheck(ops.lut_grad.default, (dy, x, codes, lut.shape[1], lut.shape[2])))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_opcheck_lut_decode(device, bits):
    codes, lut, _, _, _ = _inputs(device, bits)
    assert_opcheck_passes(torch.library.opcheck(ops.lut_decode.default, (codes, lut)))


def test_opcheck_lut_grad_fp64_cpu():
    codes, lut, x, dy, _ = _inputs("cpu", 3, dtype=torch.float64)
    assert_opcheck_passes(torch.library.opcheck(ops.lut_grad.default, (dy, x, codes, lut.shape[1], lut.shape[2])))

"""Multi-adapter batches: one set of codes, a stack of LUT sets [A, N, G, 2^b], and a per-token
adapter index; forward, dx and per-adapter dLUT against the reference and against running each
adapter on its own tokens."""
from __future__ import annotations

import pytest
import torch

import spallm_ext
from spallm_ext import reference

from conftest import ALL_BITS, DEVICES, assert_close_rel, make_sketch, odd_in_features, randn


def _stack(n, k, bits, groups, adapters, *, dtype=torch.float32, device="cpu", seed=0):
    codes, lut = make_sketch(n, k, bits, groups, lut_dtype=dtype, device=device, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    luts = torch.stack([lut.cpu() + 0.1 * a * torch.randn(lut.shape, generator=gen, dtype=torch.float64).to(dtype)
                        for a in range(adapters)])
    return codes, luts.to(device).contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_and_backward_vs_reference(device, bits, act_dtype):
    n, k, groups, adapters = 12, odd_in_features(bits, 2, 24), 2, 4
    codes, luts = _stack(n, k, bits, groups, adapters, device=device, seed=bits)
    x = randn(3, 7, k, dtype=act_dtype, device=device, seed=1)
    dy = randn(3, 7, n, dtype=act_dtype, device=device, seed=2)
    bias = randn(n, dtype=act_dtype, device=device, seed=3)
    idx = torch.randint(0, adapters, (3, 7), generator=torch.Generator().manual_seed(4)).to(device)
    idx[0, 0] = adapters - 1  # every run uses the last adapter at least once
    assert_close_rel(spallm_ext.lut_linear(x, codes, luts, bias, idx),
                     reference.lut_linear(x, codes, luts, bias, idx), act_dtype)
    assert_close_rel(spallm_ext.lut_linear_dx(dy, codes, luts, idx),
                     reference.lut_linear_dx(dy, codes, luts, idx), act_dtype)
    got = spallm_ext.lut_grad(dy, x, codes, groups, 1 << bits, idx, adapters)
    assert got.shape == (adapters, n, groups, 1 << bits) and got.dtype == torch.float32
    assert_close_rel(got, reference.lut_grad(dy, x, codes, groups, 1 << bits, idx, adapters), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_each_token_sees_only_its_adapter(device):
    """Output of a mixed batch == each adapter run alone on its tokens; unused adapters get zero grad."""
    n, k, adapters = 16, 32, 5
    codes, luts = _stack(n, k, 4, 4, adapters, device=device)
    x = randn(10, k, device=device, seed=5)
    idx = torch.tensor([0, 2, 2, 0, 4, 2, 0, 0, 4, 2], device=device)
    y = spallm_ext.lut_linear(x, codes, luts, None, idx)
    for a in (0, 2, 4):
        rows = (idx == a).nonzero().flatten()
        torch.testing.assert_close(y[rows], spallm_ext.lut_linear(x[rows], codes, luts[a]))
    luts.requires_grad_(True)
    spallm_ext.lut_linear(x, codes, luts, None, idx).square().sum().backward()
    assert not luts.grad[1].any() and not luts.grad[3].any()
    assert luts.grad[0].abs().sum() > 0 and luts.grad[4].abs().sum() > 0


def test_gradcheck_fp64():
    codes, luts = _stack(3, 16, 4, 2, 3, dtype=torch.float64)
    x = randn(6, 16, dtype=torch.float64, seed=1).requires_grad_(True)
    idx = torch.tensor([2, 0, 2, 1, 0, 2])
    assert torch.autograd.gradcheck(lambda x, l: spallm_ext.lut_linear(x, codes, l, None, idx),
                                    (x, luts.requires_grad_(True)))


def test_opcheck_multi_adapter():
    codes, luts = _stack(8, 16, 3, 1, 2)
    x = randn(5, 16, seed=1).requires_grad_(True)
    idx = torch.tensor([1, 0, 1, 1, 0])
    torch.library.opcheck(torch.ops.spallm.lut_linear.default, (x, codes, luts.requires_grad_(True), None, idx))
    torch.library.opcheck(torch.ops.spallm.lut_grad.default, (randn(5, 8, seed=2), x.detach(), codes, 1, 8, idx, 2))


def test_zero_tokens():
    codes, luts = _stack(8, 16, 4, 1, 3)
    y = spallm_ext.lut_linear(torch.randn(0, 16), codes, luts, None, torch.zeros(0, dtype=torch.long))
    assert y.shape == (0, 8)
    g = spallm_ext.lut_grad(torch.randn(0, 8), torch.randn(0, 16), codes, 1, 16, torch.zeros(0, dtype=torch.long), 3)
    assert g.shape == (3, 8, 1, 16) and not g.any()


@pytest.mark.parametrize("device", DEVICES)
def test_bad_adapter_arguments(device):
    codes, luts = _stack(8, 16, 4, 1, 3, device=device)
    x = randn(4, 16, device=device, seed=1)
    ok = torch.tensor([0, 1, 2, 0], device=device)
    with pytest.raises(ValueError, match="adapter_index.*lie in \\[0, 3\\), found 3"):
        spallm_ext.lut_linear(x, codes, luts, None, torch.tensor([0, 1, 3, 0], device=device))
    with pytest.raises(ValueError, match="adapter_index.*found -1"):
        spallm_ext.lut_linear(x, codes, luts, None, torch.tensor([0, -1, 2, 0], device=device))
    with pytest.raises(ValueError, match="adapter_index.*one entry per token \\(4\\), got 3"):
        spallm_ext.lut_linear(x, codes, luts, None, ok[:3])
    with pytest.raises(TypeError, match="adapter_index.*int64 or int32"):
        spallm_ext.lut_linear(x, codes, luts, None, ok.float())
    with pytest.raises(ValueError, match="'lut' must be a 4-D stack"):
        spallm_ext.lut_linear(x, codes, luts[0], None, ok)
    with pytest.raises(ValueError, match="num_adapters"):
        spallm_ext.lut_grad(randn(4, 8, device=device), x, codes, 1, 16, ok, 0)

"""SketchedLinear: construction, from_linear / to_linear, state_dict, repr, dtypes, autocast, training."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import spallm_ext
from spallm_ext import reference
from spallm_ext.formats import row_bytes

from conftest import ALL_BITS, DEVICES, assert_close_rel, randn, rel_err


def _linear(in_f, out_f, bias=True, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(device)


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("groups", [1, 4])
def test_construction_defaults(bits, groups):
    mod = spallm_ext.SketchedLinear(32, 12, bits=bits, groups_per_row=groups)
    assert mod.bits == bits and mod.groups_per_row == groups and mod.num_entries == 1 << bits
    assert mod.in_features == 32 and mod.out_features == 12
    buffers = dict(mod.named_buffers())
    assert set(buffers) == {"codes"}
    assert mod.codes.dtype == torch.uint8 and mod.codes.shape == (12, row_bytes(32, bits))
    assert isinstance(mod.lut, nn.Parameter) and mod.lut.requires_grad
    assert mod.lut.dtype == torch.float32 and mod.lut.shape == (12, groups, 1 << bits)
    assert isinstance(mod.bias, nn.Parameter) and not mod.bias.requires_grad
    assert {n for n, p in mod.named_parameters() if p.requires_grad} == {"lut"}
    # nn.Linear's weight scale: every decoded weight lies within +-1/sqrt(in)
    assert mod.decode().abs().max() <= 32 ** -0.5 + 1e-6


def test_construction_options():
    mod = spallm_ext.SketchedLinear(16, 4, bias=False, lut_dtype=torch.bfloat16)
    assert mod.bias is None and mod.lut.dtype == torch.bfloat16
    mod = spallm_ext.SketchedLinear(16, 4, train_bias=True, dtype=torch.float16)
    assert mod.bias.requires_grad and mod.bias.dtype == torch.float16


@pytest.mark.parametrize("kwargs,match", [
    (dict(in_features=16, out_features=4, bits=5), "bits"),
    (dict(in_features=16, out_features=4, bits=1), "bits"),
    (dict(in_features=12, out_features=4, bits=3), "in_features"),     # 3-bit needs multiples of 8
    (dict(in_features=10, out_features=4, bits=2), "in_features"),     # 2-bit needs multiples of 4
    (dict(in_features=15, out_features=4, bits=4), "in_features"),     # 4-bit needs multiples of 2
    (dict(in_features=16, out_features=4, groups_per_row=3), "groups_per_row"),
    (dict(in_features=16, out_features=4, groups_per_row=0), "groups_per_row"),
    (dict(in_features=0, out_features=4), "in_features"),
    (dict(in_features=16, out_features=0), "out_features"),
])
def test_construction_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spallm_ext.SketchedLinear(**kwargs)


def test_construction_rejects_bad_lut_dtype():
    with pytest.raises(TypeError, match="lut_dtype"):
        spallm_ext.SketchedLinear(16, 4, lut_dtype=torch.int32)


def test_forward_rejects_wrong_in_features():
    mod = spallm_ext.SketchedLinear(16, 4)
    with pytest.raises(ValueError, match="in_features"):
        mod(torch.randn(3, 15))


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_forward_matches_reference(device, bits):
    torch.manual_seed(bits)
    mod = spallm_ext.SketchedLinear(24, 10, bits=bits, groups_per_row=3).to(device)
    x = randn(2, 3, 24, device=device, seed=1)
    y = mod(x)
    assert y.shape == (2, 3, 10)
    assert_close_rel(y, reference.lut_linear(x, mod.codes, mod.lut.detach(), mod.bias.detach()))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_input_fp32_lut(device):
    torch.manual_seed(0)
    mod = spallm_ext.SketchedLinear(40, 9, bits=4, groups_per_row=4).to(device)
    x = randn(5, 40, dtype=torch.bfloat16, device=device)
    y = mod(x)
    assert y.dtype == torch.bfloat16 and mod.lut.dtype == torch.float32
    ref = reference.lut_linear(x, mod.codes, mod.lut.detach(), mod.bias.detach().to(torch.bfloat16))
    assert_close_rel(y, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_gives_low_precision_output(device):
    torch.manual_seed(0)
    mod = spallm_ext.SketchedLinear(32, 8, bits=3, groups_per_row=2).to(device)
    x = randn(4, 32, device=device)
    dt = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=dt):
        y = mod(x)
    assert y.dtype == dt
    ref = reference.lut_linear(x.to(dt), mod.codes, mod.lut.detach(), mod.bias.detach().to(dt))
    assert_close_rel(y, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_cpu = spallm_ext.SketchedLinear(32, 8)(torch.randn(4, 32))
    assert y_cpu.dtype == torch.bfloat16


# ---------------------------------------------------------------- from_linear / to_linear


@pytest.mark.parametrize("groups", [1, 4])
def test_from_linear_close_and_improves_with_bits(groups):
    lin = _linear(64, 24, seed=1)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    y = lin(x).detach()
    errs = {}
    for bits in (2, 3, 4):
        mod = spallm_ext.SketchedLinear.from_linear(lin, bits=bits, groups_per_row=groups)
        assert mod.bits == bits and mod.groups_per_row == groups
        assert torch.equal(mod.bias, lin.bias.detach())
        w_err = rel_err(mod.decode(), lin.weight)
        errs[bits] = (w_err, rel_err(mod(x).detach(), y))
    assert errs[2][0] > errs[3][0] > errs[4][0], errs
    assert errs[2][1] > errs[3][1] > errs[4][1], errs
    # Lloyd with 16 levels on uniform weights: the error is a small fraction of the weight
    assert errs[4][0] < 0.1 and errs[4][1] < 0.1, errs


def test_from_linear_groups_reduce_error():
    lin = _linear(64, 16, seed=3)
    e1 = rel_err(spallm_ext.SketchedLinear.from_linear(lin, bits=2, groups_per_row=1).decode(), lin.weight)
    e8 = rel_err(spallm_ext.SketchedLinear.from_linear(lin, bits=2, groups_per_row=8).decode(), lin.weight)
    assert e8 < e1


def test_from_linear_exact_when_few_distinct_values():
    lin = _linear(16, 6, bias=False, seed=4)
    with torch.no_grad():
        levels = torch.tensor([-0.5, -0.1, 0.2, 0.7])
        lin.weight.copy_(levels[torch.randint(0, 4, (6, 16), generator=torch.Generator().manual_seed(5))])
    mod = spallm_ext.SketchedLinear.from_linear(lin, bits=2)
    assert mod.bias is None
    assert torch.equal(mod.decode(), lin.weight.detach())


def test_from_linear_custom_sketcher():
    lin = _linear(16, 4, seed=6)
    calls = []

    def sketcher(weight, bits, groups_per_row, scale=1.0):
        calls.append((tuple(weight.shape), bits, groups_per_row, scale))
        codes = torch.arange(16).repeat(4, 1) % (1 << bits)
        lut = torch.arange(1 << bits, dtype=torch.float32).expand(4, groups_per_row, -1) * scale
        return codes, lut

    mod = spallm_ext.SketchedLinear.from_linear(lin, bits=3, groups_per_row=2, sketcher=sketcher, scale=0.5)
    assert calls == [((4, 16), 3, 2, 0.5)]
    expected = (torch.arange(16) % 8).float().repeat(4, 1) * 0.5
    assert torch.equal(mod.decode(), expected)


def test_from_linear_bad_sketcher():
    lin = _linear(16, 4)
    with pytest.raises(ValueError, match="unknown sketcher"):
        spallm_ext.SketchedLinear.from_linear(lin, sketcher="no-such-sketcher")

    def wrong_shape(weight, bits, groups_per_row):
        return torch.zeros(4, 8, dtype=torch.long), torch.zeros(4, groups_per_row, 1 << bits)

    with pytest.raises(ValueError, match="sketcher returned"):
        spallm_ext.SketchedLinear.from_linear(lin, sketcher=wrong_shape)
    with pytest.raises(TypeError, match="nn.Linear"):
        spallm_ext.SketchedLinear.from_linear(nn.Conv1d(4, 4, 1))


def test_register_sketcher_by_name():
    name = "test-suite-constant"

    @spallm_ext.register_sketcher(name)
    def _const(weight, bits, groups_per_row):
        n, k = weight.shape
        return torch.zeros(n, k, dtype=torch.long), torch.full((n, groups_per_row, 1 << bits), 0.25)

    mod = spallm_ext.SketchedLinear.from_linear(_linear(8, 3), bits=4, sketcher=name)
    assert torch.equal(mod.decode(), torch.full((3, 8), 0.25))


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("lut_dtype", [torch.float32, torch.bfloat16])
def test_to_linear_decodes_exactly(bits, lut_dtype):
    lin = _linear(32, 8, seed=7)
    mod = spallm_ext.SketchedLinear.from_linear(lin, bits=bits, groups_per_row=4, lut_dtype=lut_dtype)
    dense = mod.to_linear()
    assert isinstance(dense, nn.Linear) and dense.weight.dtype == lut_dtype
    assert torch.equal(dense.weight.detach(), reference.lut_decode(mod.codes, mod.lut.detach()))
    assert torch.equal(dense.bias.detach(), mod.bias.detach().to(lut_dtype))
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(8))
    if lut_dtype == torch.float32:
        assert_close_rel(mod(x), dense(x))
    d64 = mod.to_linear(torch.float64)
    assert d64.weight.dtype == torch.float64
    assert torch.equal(d64.weight.detach(), reference.lut_decode(mod.codes, mod.lut.detach().double()))


# ---------------------------------------------------------------- state_dict, repr


@pytest.mark.parametrize("bits", ALL_BITS)
def test_state_dict_roundtrip(bits):
    mod = spallm_ext.SketchedLinear.from_linear(_linear(24, 6, seed=9), bits=bits, groups_per_row=3)
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert set(sd) == {"codes", "lut", "bias"}
    torch.manual_seed(123)  # the fresh module gets other random codes
    fresh = spallm_ext.SketchedLinear(24, 6, bits=bits, groups_per_row=3)
    assert not torch.equal(fresh.codes, mod.codes)
    fresh.load_state_dict(sd)
    for name in ("codes", "lut", "bias"):
        assert torch.equal(getattr(fresh, name), getattr(mod, name))
    assert fresh.codes.dtype == torch.uint8
    assert not fresh.bias.requires_grad and fresh.lut.requires_grad
    x = torch.randn(4, 24)
    assert torch.equal(fresh(x), mod(x))


def test_state_dict_rejects_other_shape():
    sd = spallm_ext.SketchedLinear(24, 6, bits=3).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        spallm_ext.SketchedLinear(24, 6, bits=4).load_state_dict(sd)


def test_repr_shows_bits_groups_bytes():
    mod = spallm_ext.SketchedLinear(64, 16, bits=3, groups_per_row=4)
    text = repr(mod)
    assert "bits=3" in text and "groups_per_row=4" in text
    nbytes = 16 * row_bytes(64, 3) + 16 * 4 * 8 * 4
    assert mod.storage_bytes() == nbytes
    assert f"bytes={nbytes}" in text
    assert "in_features=64" in text and "out_features=16" in text


@pytest.mark.parametrize("device", [p for p in DEVICES if p.values[0] == "cuda"])
def test_module_to_cuda(device):
    mod = spallm_ext.SketchedLinear.from_linear(_linear(32, 8, seed=10), bits=4, groups_per_row=2)
    x = torch.randn(3, 32)
    y_cpu = mod(x)
    mod_cuda = mod.to(device)
    assert mod_cuda.codes.is_cuda and mod_cuda.codes.dtype == torch.uint8
    assert_close_rel(mod_cuda(x.to(device)).cpu(), y_cpu)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 4])
def test_training_lut_only_reduces_loss(device, bits):
    """Regress a freshly initialised sketch (random codes) onto a dense layer, training the LUT
    with Adam: the loss must fall substantially and the codes must never change."""
    torch.manual_seed(bits)
    target = nn.Linear(32, 16).to(device)
    mod = spallm_ext.SketchedLinear(32, 16, bits=bits, groups_per_row=4, bias=True).to(device)
    codes0 = mod.codes.clone()
    bias0 = mod.bias.detach().clone()
    opt = torch.optim.Adam([mod.lut], lr=2e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        x = torch.randn(64, 32, generator=gen).to(device)
        loss = nn.functional.mse_loss(mod(x), target(x).detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert mod.codes.grad is None
        opt.step()
        losses.append(loss.item())
        assert torch.equal(mod.codes, codes0)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    assert torch.equal(mod.bias.detach(), bias0)  # frozen bias

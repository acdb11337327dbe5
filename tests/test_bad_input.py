"""Argument validation of the spallm ops: each rule raises the documented exception type
(TypeError for dtypes, ValueError for shapes/sizes/layout, RuntimeError for devices) with a message
naming the offending argument."""
from __future__ import annotations

import pytest
import torch

import spallm_ext

from conftest import CUDA_MARKS, DEVICES, make_sketch, randn

N, K, G, BITS = 6, 32, 2, 4


def _valid(device, bits=BITS, n=N, k=K, groups=G):
    codes, lut = make_sketch(n, k, bits, groups, device=device)
    return dict(x=randn(3, k, device=device, seed=1), codes=codes, lut=lut,
                bias=randn(n, device=device, seed=2), dy=randn(3, n, device=device, seed=3))


def _linear(a):
    return spallm_ext.lut_linear(a["x"], a["codes"], a["lut"], a.get("bias"))


def _dx(a):
    return spallm_ext.lut_linear_dx(a["dy"], a["codes"], a["lut"])


def _grad(a, groups=None, entries=None):
    return spallm_ext.lut_grad(a["dy"], a["x"], a["codes"], groups or a["lut"].shape[1],
                               entries or a["lut"].shape[2])


def _decode(a):
    return spallm_ext.lut_decode(a["codes"], a["lut"])


ALL_OPS = [_linear, _dx, _grad, _decode]
LUT_OPS = [_linear, _dx, _decode]


@pytest.mark.parametrize("device", DEVICES)
def test_valid_inputs_work(device):
    """The baseline every bad-input case below mutates is accepted by every op."""
    a = _valid(device)
    assert _linear(a).shape == (3, N)
    assert _dx(a).shape == (3, K)
    assert _grad(a).shape == (N, G, 16)
    assert _decode(a).shape == (N, K)


# ---------------------------------------------------------------- dtypes -> TypeError


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.complex64])
def test_x_wrong_dtype(device, dtype):
    a = _valid(device)
    a["x"] = a["x"].to(dtype)
    a["bias"] = None
    with pytest.raises(TypeError, match="'x'"):
        _linear(a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", LUT_OPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_lut_wrong_dtype(device, op, dtype):
    a = _valid(device)
    a["lut"] = a["lut"].to(dtype)
    with pytest.raises(TypeError, match="'lut'"):
        op(a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ALL_OPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float32])
def test_codes_wrong_dtype(device, op, dtype):
    a = _valid(device)
    a["codes"] = a["codes"].to(dtype)
    with pytest.raises(TypeError, match="'codes'"):
        op(a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.int32])
def test_bias_wrong_dtype(device, dtype):
    a = _valid(device)
    a["bias"] = a["bias"].to(dtype)
    with pytest.raises(TypeError, match="'bias'"):
        _linear(a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", [_dx, _grad], ids=lambda f: f.__name__)
def test_dy_wrong_dtype(device, op):
    a = _valid(device)
    a["dy"] = a["dy"].to(torch.int32)
    with pytest.raises(TypeError, match="'dy'"):
        op(a)


@pytest.mark.parametrize("device", DEVICES)
def test_lut_grad_dy_x_dtype_mismatch(device):
    a = _valid(device)
    a["dy"] = a["dy"].to(torch.bfloat16)
    with pytest.raises(TypeError, match="'dy' and 'x'"):
        _grad(a)


# ---------------------------------------------------------------- shapes, sizes, layout -> ValueError


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ALL_OPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape", [(-1,), (N, 1, -1)], ids=["1d", "3d"])
def test_codes_not_2d(device, op, shape):
    a = _valid(device)
    a["codes"] = a["codes"].reshape(*shape)
    with pytest.raises(ValueError, match="'codes'.*2-D"):
        op(a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ALL_OPS, ids=lambda f: f.__name__)
def test_codes_not_contiguous(device, op):
    a = _valid(device)
    # a transposed [row_bytes, N] code matrix viewed as [N, row_bytes]: right shape, wrong strides
    a["codes"] = a["codes"].t().contiguous().t()
    assert not a["codes"].is_contiguous()
    with pytest.raises(ValueError, match="'codes'.*contiguous"):
        op(a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ALL_OPS, ids=lambda f: f.__name__)
def test_codes_strided_view(device, op):
    a = _valid(device)
    wide = torch.zeros(N, 2 * a["codes"].shape[1], dtype=torch.uint8, device=device)
    wide[:, ::2] = a["codes"]
    a["codes"] = wide[:, ::2]
    with pytest.raises(ValueError, match="'codes'.*contiguous"):
        op(a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", LUT_OPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape", [(N, G * 16), (1, N, G, 16)], ids=["2d", "4d"])
def test_lut_not_3d(device, op, shape):
    a = _valid(device)
    a["lut"] = a["lut"].reshape(*shape)
    with pytest.raises(ValueError, match="'lut'.*3-D"):
        op(a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", LUT_OPS, ids=lambda f: f.__name__)
def test_lut_not_contiguous(device, op):
    a = _valid(device)
    a["lut"] = a["lut"].transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(ValueError, match="'lut'.*contiguous"):
        op(a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", LUT_OPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("entries", [1, 5, 32])
def test_lut_bad_num_entries(device, op, entries):
    a = _valid(device)
    a["lut"] = torch.zeros(N, G, entries, device=device)
    with pytest.raises(ValueError, match="'lut'.*4, 8 or 16"):
        op(a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", LUT_OPS, ids=lambda f: f.__name__)
def test_lut_rows_mismatch(device, op):
    a = _valid(device)
    a["lut"] = torch.zeros(N + 1, G, 16, device=device)
    with pytest.raises(ValueError, match="'lut' has 7 rows but 'codes' has 6"):
        op(a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", LUT_OPS, ids=lambda f: f.__name__)
def test_in_features_not_divisible_by_groups(device, op):
    a = _valid(device)
    a["lut"] = torch.zeros(N, 3, 16, device=device)  # K = 32 columns in 3 groups
    with pytest.raises(ValueError, match="in_features \\(32\\).*groups_per_row \\(3\\)"):
        op(a)


@pytest.mark.parametrize("device", DEVICES)
def test_lut_grad_groups_not_dividing(device):
    a = _valid(device)
    with pytest.raises(ValueError, match="groups_per_row"):
        _grad(a, groups=3)
    with pytest.raises(ValueError, match="'groups_per_row'"):
        spallm_ext.lut_grad(a["dy"], a["x"], a["codes"], 0, 16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entries", [5, 2, 32])
def test_lut_grad_bad_num_entries(device, entries):
    a = _valid(device)
    with pytest.raises(ValueError, match="'num_entries'.*4, 8 or 16"):
        _grad(a, entries=entries)


@pytest.mark.parametrize("device", DEVICES)
def test_x_last_dim_wrong(device):
    a = _valid(device)
    a["x"] = randn(3, K + 2, device=device)
    with pytest.raises(ValueError, match="'x' has last dimension 34"):
        _linear(a)
    with pytest.raises(ValueError, match="'x'"):
        _grad(a)


@pytest.mark.parametrize("device", DEVICES)
def test_x_zero_dim(device):
    a = _valid(device)
    a["x"] = torch.tensor(1.0, device=device)
    a["bias"] = None
    with pytest.raises(ValueError, match="'x'"):
        _linear(a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", [_dx, _grad], ids=lambda f: f.__name__)
def test_dy_last_dim_wrong(device, op):
    a = _valid(device)
    a["dy"] = randn(3, N + 1, device=device)
    with pytest.raises(ValueError, match="'dy' has last dimension 7"):
        op(a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(N + 1,), (1, N), ()], ids=["long", "2d", "scalar"])
def test_bias_wrong_shape(device, shape):
    a = _valid(device)
    a["bias"] = torch.zeros(shape, device=device) if shape else torch.tensor(0.0, device=device)
    with pytest.raises(ValueError, match="'bias' must have shape \\[6\\]"):
        _linear(a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ALL_OPS, ids=lambda f: f.__name__)
def test_3bit_row_bytes_not_multiple_of_3(device, op):
    a = _valid(device, bits=3, k=16)  # 6 bytes per row
    a["codes"] = a["codes"][:, :4].contiguous()
    with pytest.raises(ValueError, match="'codes' has 4 bytes per row"):
        op(a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ALL_OPS, ids=lambda f: f.__name__)
def test_codes_without_columns(device, op):
    a = _valid(device)
    a["codes"] = torch.zeros(N, 0, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match="'codes' has no columns"):
        op(a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead_dy", [(4,), (1, 2, 2), (2,), (0,)])
def test_lut_grad_token_mismatch(device, lead_dy):
    a = _valid(device)  # x has 3 tokens
    a["dy"] = randn(*lead_dy, N, device=device)
    with pytest.raises(ValueError, match="'dy' and 'x' must have the same number of tokens"):
        _grad(a)


@pytest.mark.parametrize("device", DEVICES)
def test_lut_grad_same_tokens_other_shape_is_fine(device):
    a = _valid(device)
    a["x"] = randn(1, 3, K, device=device)
    assert _grad(a).shape == (N, G, 16)


# ---------------------------------------------------------------- CUDA only


@pytest.mark.parametrize("arg", ["x", "lut", "bias"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA_MARKS)])
def test_cuda_mixed_devices_lut_linear(device, arg):
    a = _valid(device)
    a[arg] = a[arg].cpu()
    with pytest.raises(RuntimeError, match=f"'{arg}'.*cpu|cpu.*'{arg}'"):
        _linear(a)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA_MARKS)])
def test_cuda_mixed_devices_codes_on_cpu(device):
    a = _valid(device)
    a["codes"] = a["codes"].cpu()
    for op in ALL_OPS:
        with pytest.raises(RuntimeError, match="device|is on"):
            op(a)


@pytest.mark.parametrize("arg,op", [("dy", _dx), ("dy", _grad), ("x", _grad), ("lut", _dx), ("lut", _decode)])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA_MARKS)])
def test_cuda_mixed_devices_other_ops(device, arg, op):
    a = _valid(device)
    a[arg] = a[arg].cpu()
    with pytest.raises(RuntimeError, match=f"'{arg}'.*cpu|cpu.*'{arg}'"):
        op(a)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA_MARKS)])
def test_cuda_rejects_fp64(device):
    a = _valid(device)
    a64 = dict(a, x=a["x"].double(), bias=a["bias"].double())
    with pytest.raises(TypeError, match="'x'"):
        _linear(a64)
    with pytest.raises(TypeError, match="'lut'"):
        _linear(dict(a, lut=a["lut"].double()))
    with pytest.raises(TypeError, match="'lut'"):
        _decode(dict(a, lut=a["lut"].double()))
    with pytest.raises(TypeError, match="'dy'"):
        _dx(dict(a, dy=a["dy"].double()))
    with pytest.raises(TypeError, match="'dy'|'x'"):
        _grad(dict(a, dy=a["dy"].double(), x=a["x"].double()))

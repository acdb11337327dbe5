"""Every spallm op against spallm_ext.reference: shapes, dtypes, adversarial codes, non-finite LUTs."""
from __future__ import annotations

import pytest
import torch

import spallm_ext
from spallm_ext import reference

from conftest import (ALL_BITS, ALL_GROUPS, DEVICES, act_lut_dtype_params, assert_close_rel,
                      device_dtype_params, make_sketch, odd_in_features, randn)

# (bits, groups, in_features): every groups_per_row for every width, with group sizes that are
# not multiples of 8 where the packing allows it (e.g. 4-bit, K=20, G=2 -> groups of 10).
BGK = [(b, g, odd_in_features(b, g)) for b in ALL_BITS for g in ALL_GROUPS]
BGK_IDS = [f"b{b}-g{g}-k{k}" for b, g, k in BGK]

# leading dims of x: M in {0, 1, 3, 17, 128} tokens and a [2, 3, K] batch
LEADS = [(0,), (1,), (3,), (17,), (128,), (2, 3)]
LEAD_IDS = ["m" + "x".join(map(str, lead)) for lead in LEADS]

NS = [1, 7]


def _check_all_ops(device, x_lead, n, k, bits, groups, act_dtype=torch.float32, lut_dtype=torch.float32,
                   mode="random", seed=0):
    codes, lut = make_sketch(n, k, bits, groups, lut_dtype=lut_dtype, device=device, mode=mode, seed=seed)
    x = randn(*x_lead, k, dtype=act_dtype, device=device, seed=seed + 1)
    dy = randn(*x_lead, n, dtype=act_dtype, device=device, seed=seed + 2)
    bias = randn(n, dtype=act_dtype, device=device, seed=seed + 3)

    y = spallm_ext.lut_linear(x, codes, lut)
    assert y.device.type == device
    assert_close_rel(y, reference.lut_linear(x, codes, lut))
    yb = spallm_ext.lut_linear(x, codes, lut, bias)
    assert_close_rel(yb, reference.lut_linear(x, codes, lut, bias))

    dx = spallm_ext.lut_linear_dx(dy, codes, lut)
    assert_close_rel(dx, reference.lut_linear_dx(dy, codes, lut))

    dl = spallm_ext.lut_grad(dy, x, codes, groups, 1 << bits)
    dl_ref = reference.lut_grad(dy, x, codes, groups, 1 << bits)
    assert_close_rel(dl, dl_ref, dtype=torch.float64 if act_dtype == torch.float64 else torch.float32)

    w = spallm_ext.lut_decode(codes, lut)
    assert w.dtype == lut_dtype
    assert torch.equal(w, reference.lut_decode(codes, lut))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,groups,k", BGK, ids=BGK_IDS)
@pytest.mark.parametrize("x_lead", LEADS, ids=LEAD_IDS)
@pytest.mark.parametrize("n", NS, ids=[f"n{n}" for n in NS])
def test_shapes_match_reference(device, bits, groups, k, x_lead, n):
    _check_all_ops(device, x_lead, n, k, bits, groups, seed=bits * 100 + groups * 10 + n)


@pytest.mark.parametrize("device,act_dtype,lut_dtype", device_dtype_params())
@pytest.mark.parametrize("bits", ALL_BITS)
def test_dtypes_match_reference(device, act_dtype, lut_dtype, bits):
    groups = 2
    _check_all_ops(device, (2, 3), 9, odd_in_features(bits, groups, 40), bits, groups,
                   act_dtype=act_dtype, lut_dtype=lut_dtype, seed=bits)


@pytest.mark.parametrize("device,act_dtype", act_lut_dtype_params())
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("mode", ["zeros", "equal", "alternating", "max"])
def test_adversarial_codes(device, act_dtype, bits, mode):
    groups = 4
    _check_all_ops(device, (17,), 5, odd_in_features(bits, groups, 32), bits, groups,
                   act_dtype=act_dtype, mode=mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,groups,k,n,m", [
    (4, 1, 1024, 1100, 3),   # more than one CPU decode tile (1M weights)
    (4, 8, 264, 257, 129),   # sizes just past powers of two
    (3, 4, 520, 130, 65),
    (2, 2, 516, 96, 33),
])
def test_larger_shapes_match_reference(device, bits, groups, k, n, m):
    _check_all_ops(device, (m,), n, k, bits, groups, seed=k)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_tokens(device):
    codes, lut = make_sketch(6, 16, 4, 2, device=device)
    x = torch.empty(0, 16, device=device)
    y = spallm_ext.lut_linear(x, codes, lut, torch.ones(6, device=device))
    assert y.shape == (0, 6) and y.dtype == torch.float32 and y.device.type == device
    dx = spallm_ext.lut_linear_dx(torch.empty(0, 6, device=device), codes, lut)
    assert dx.shape == (0, 16)
    dl = spallm_ext.lut_grad(torch.empty(0, 6, device=device), x, codes, 2, 16)
    assert dl.shape == (6, 2, 16) and dl.dtype == torch.float32
    assert torch.equal(dl.cpu(), torch.zeros(6, 2, 16))
    # a [2, 0, K] batch keeps its leading dims
    y3 = spallm_ext.lut_linear(torch.empty(2, 0, 16, device=device), codes, lut)
    assert y3.shape == (2, 0, 6)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_x_is_fine(device):
    codes, lut = make_sketch(5, 24, 3, 3, device=device)
    x = randn(24, 9, device=device).t()  # [9, 24], strided
    assert not x.is_contiguous()
    assert_close_rel(spallm_ext.lut_linear(x, codes, lut), reference.lut_linear(x, codes, lut))
    dy = randn(5, 9, device=device).t()
    assert_close_rel(spallm_ext.lut_grad(dy, x, codes, 3, 8), reference.lut_grad(dy, x, codes, 3, 8))
    assert_close_rel(spallm_ext.lut_linear_dx(dy, codes, lut), reference.lut_linear_dx(dy, codes, lut))


@pytest.mark.parametrize("device", DEVICES)
def test_lut_grad_matches_autograd_of_decode(device):
    """lut_grad is d(sum(dy * (x W^T)))/d lut, W = decode(codes, lut): check against autograd on the
    pure-PyTorch reference decode (gather), independent of reference.lut_grad."""
    bits, groups, n, k = 3, 4, 6, 40
    codes, lut = make_sketch(n, k, bits, groups, device=device, seed=4)
    x, dy = randn(11, k, device=device, seed=5), randn(11, n, device=device, seed=6)
    lut_d = lut.double().cpu().requires_grad_(True)
    y = x.double().cpu() @ reference.lut_decode(codes.cpu(), lut_d).T
    (g,) = torch.autograd.grad(y, lut_d, dy.double().cpu())
    assert_close_rel(spallm_ext.lut_grad(dy, x, codes, groups, 1 << bits), g.float())


# ---------------------------------------------------------------- non-finite LUT entries


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_lut_entry_used(device, bits, bad):
    """A NaN/Inf in a LUT entry that row r uses: output column r is non-finite for every token
    (x has no zeros), the other columns are finite and equal to the reference."""
    n, groups = 6, 2
    k = odd_in_features(bits, groups)
    codes, lut = make_sketch(n, k, bits, groups, device=device, seed=7)
    r, c = 3, k - 1
    g = c // (k // groups)
    code = int(spallm_ext.unpack_codes(codes.cpu(), bits)[r, c])
    lut[r, g, code] = bad
    x = randn(9, k, device=device, seed=8).abs() + 0.5  # positive: Inf * x stays Inf, never NaN by 0*Inf
    y = spallm_ext.lut_linear(x, codes, lut).cpu()
    ref = reference.lut_linear(x.cpu(), codes.cpu(), lut.cpu())
    if bad != bad:  # NaN
        assert torch.isnan(y[:, r]).all()
    else:
        assert (~torch.isfinite(y[:, r])).all()
    others = [i for i in range(n) if i != r]
    assert torch.isfinite(y[:, others]).all()
    assert_close_rel(y[:, others], ref[:, others])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_non_finite_lut_entry_unused(device, bits):
    """A NaN in an entry that no code refers to changes nothing."""
    n, groups = 5, 2
    k = odd_in_features(bits, groups)
    codes_int = torch.randint(0, (1 << bits) - 1, (n, k), generator=torch.Generator().manual_seed(9))
    codes = spallm_ext.pack_codes(codes_int, bits).to(device)  # never uses the last entry
    lut = randn(n, groups, 1 << bits, device=device, seed=10)
    x = randn(4, k, device=device, seed=11)
    y_clean = spallm_ext.lut_linear(x, codes, lut)
    lut_nan = lut.clone()
    lut_nan[:, :, -1] = float("nan")
    y = spallm_ext.lut_linear(x, codes, lut_nan)
    assert torch.isfinite(y).all()
    assert torch.equal(y, y_clean)
    dy = randn(4, n, device=device, seed=12)
    assert torch.equal(spallm_ext.lut_linear_dx(dy, codes, lut_nan), spallm_ext.lut_linear_dx(dy, codes, lut))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_out_features(device):
    """N = 0 (an empty weight) is a valid, if useless, shape: every op returns empty or zeros."""
    codes = torch.zeros(0, 8, dtype=torch.uint8, device=device)
    lut = torch.randn(0, 2, 16, device=device)
    x = torch.randn(3, 16, device=device)
    assert spallm_ext.lut_linear(x, codes, lut).shape == (3, 0)
    dx = spallm_ext.lut_linear_dx(torch.randn(3, 0, device=device), codes, lut)
    assert dx.shape == (3, 16) and not dx.any()
    assert spallm_ext.lut_grad(torch.randn(3, 0, device=device), x, codes, 2, 16).shape == (0, 2, 16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(3,), (2, 3)], ids=["2d", "3d"])
def test_outputs_are_fresh_tensors_not_views(device, lead):
    # FSDP2 and in-place users expect what nn.Linear returns: a tensor that is nobody's view.
    codes, lut = make_sketch(8, 32, 4, 2, device=device)
    x = randn(*lead, 32, device=device)
    dy = randn(*lead, 8, device=device)
    stack = torch.stack([lut, lut + 1])
    index = torch.zeros(x.shape[:-1].numel(), dtype=torch.long, device=device)
    outs = [spallm_ext.lut_linear(x, codes, lut), spallm_ext.lut_linear_dx(dy, codes, lut),
            spallm_ext.lut_linear(x, codes, stack, None, index),
            spallm_ext.lut_linear_dx(dy, codes, stack, index),
            spallm_ext.lut_linear_lowrank(x, codes, lut, randn(32, 4, device=device), randn(4, 8, device=device))]
    for out in outs:
        assert out.shape[:-1] == x.shape[:-1]
        assert not out._is_view()


@pytest.mark.parametrize("device", DEVICES)
def test_ops_keep_their_dtypes_under_autocast(device):
    # The op's contract is fp32 accumulation for fp32 inputs; autocast must not recast the GEMMs
    # its kernels run (it used to turn the CPU kernel's at::mm into a bf16 one: 3e-3 error).
    codes, lut = make_sketch(64, 256, 4, 2, device=device)
    x = randn(70, 256, device=device)
    dy = randn(70, 64, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = spallm_ext.lut_linear(x, codes, lut)
        dx = spallm_ext.lut_linear_dx(dy, codes, lut)
    assert y.dtype == dx.dtype == torch.float32
    assert_close_rel(y, reference.lut_linear(x, codes, lut))
    assert_close_rel(dx, reference.lut_linear_dx(dy, codes, lut))

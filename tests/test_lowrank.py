"""Sketch + low-rank branch: spallm.lut_linear_lowrank (forward and backward vs the fp64 reference,
gradcheck, opcheck, torch.compile, bad input) and LowRankSketchedLinear (initialisations lower
the errors they promise, trainable modes, conversion, save/load)."""
from __future__ import annotations

import pytest
import torch

import spallm_ext
from spallm_ext import LowRankSketchedLinear, SketchedLinear, reference
from spallm_ext.lowrank import eora_fit, lowrank_sketch, relative_error

from conftest import (ALL_BITS, DEVICES, act_lut_dtype_params, assert_close_rel,
                      assert_opcheck_passes, make_sketch, odd_in_features, randn)

ops = torch.ops.spallm
N, RANK = 6, 3


def _problem(device, bits=3, groups=2, lead=(2, 3), dtype=torch.float32, lut_dtype=torch.float32,
             lr_dtype=torch.float32, n=N, rank=RANK, seed=0):
    k = odd_in_features(bits, groups, 24)
    codes, lut = make_sketch(n, k, bits, groups, lut_dtype=lut_dtype, device=device, seed=seed + bits)
    x = randn(*lead, k, dtype=dtype, device=device, seed=seed + 1)
    l1 = (randn(k, rank, dtype=torch.float64, seed=seed + 2) / k ** 0.5).to(device=device, dtype=lr_dtype)
    l2 = randn(rank, n, dtype=lr_dtype, device=device, seed=seed + 3)
    bias = randn(n, dtype=dtype, device=device, seed=seed + 4)
    return x, codes, lut, l1, l2, bias


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("device,dtype", act_lut_dtype_params())
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_forward_matches_reference(device, dtype, bits, groups, with_bias):
    x, codes, lut, l1, l2, bias = _problem(device, bits, groups, dtype=dtype)
    b = bias if with_bias else None
    y = spallm_ext.lut_linear_lowrank(x, codes, lut, l1, l2, b)
    assert y.shape == (2, 3, N) and y.dtype == dtype and y.device == x.device
    assert_close_rel(y, reference.lut_linear_lowrank(x, codes, lut, l1, l2, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lr_dtype", [torch.bfloat16, torch.float16], ids=["lr_bf16", "lr_fp16"])
def test_forward_low_precision_factors_and_lut(device, lr_dtype):
    """l1/l2 and the LUT in 16-bit, x in bf16: dtypes are independent, the result is x's."""
    x, codes, lut, l1, l2, bias = _problem(device, 4, 2, dtype=torch.bfloat16, lut_dtype=torch.float16,
                                           lr_dtype=lr_dtype)
    y = spallm_ext.lut_linear_lowrank(x, codes, lut, l1, l2, bias)
    assert y.dtype == torch.bfloat16
    assert_close_rel(y, reference.lut_linear_lowrank(x, codes, lut, l1, l2, bias))


@pytest.mark.parametrize("device", DEVICES)
def test_forward_is_sketch_plus_branch(device):
    """y - lut_linear(x) is exactly the branch (x l1) l2 up to fp32 rounding, fp32 everywhere."""
    x, codes, lut, l1, l2, bias = _problem(device, 2, 1)
    y = spallm_ext.lut_linear_lowrank(x, codes, lut, l1, l2, bias)
    assert_close_rel(y - spallm_ext.lut_linear(x, codes, lut, bias), (x @ l1) @ l2, factor=10)
    # a zero branch adds exactly nothing
    y0 = spallm_ext.lut_linear_lowrank(x, codes, lut, l1, torch.zeros_like(l2), bias)
    assert torch.equal(y0, spallm_ext.lut_linear(x, codes, lut, bias))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_tokens_and_one_dim_input(device):
    x, codes, lut, l1, l2, bias = _problem(device, lead=(0,))
    assert spallm_ext.lut_linear_lowrank(x, codes, lut, l1, l2, bias).shape == (0, N)
    x, codes, lut, l1, l2, bias = _problem(device, lead=(2, 0))
    assert spallm_ext.lut_linear_lowrank(x, codes, lut, l1, l2, bias).shape == (2, 0, N)
    x, codes, lut, l1, l2, bias = _problem(device, lead=())
    y = spallm_ext.lut_linear_lowrank(x, codes, lut, l1, l2, bias)
    assert y.shape == (N,)
    assert_close_rel(y, reference.lut_linear_lowrank(x, codes, lut, l1, l2, bias))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    x, codes, lut, l1, l2, bias = _problem(device, lead=(4, 3))
    xt = x.transpose(0, 1)                       # [3, 4, K], not contiguous
    l1t = l1.T.contiguous().T                    # [K, r] with strides (1, K)
    l2t = l2.T.contiguous().T
    assert not (xt.is_contiguous() or l1t.is_contiguous() or l2t.is_contiguous())
    y = spallm_ext.lut_linear_lowrank(xt, codes, lut, l1t, l2t, bias)
    assert_close_rel(y, reference.lut_linear_lowrank(xt.contiguous(), codes, lut, l1, l2, bias))


@pytest.mark.parametrize("rank", [1, 32])
def test_ranks(rank):
    x, codes, lut, l1, l2, bias = _problem("cpu", 4, 1, rank=rank, n=40)
    assert_close_rel(spallm_ext.lut_linear_lowrank(x, codes, lut, l1, l2, bias),
                     reference.lut_linear_lowrank(x, codes, lut, l1, l2, bias))


def test_lowrank_t_mode_names_are_checked():
    # the switch between the fused kernel's two ways to get t = x l1 (csrc/cuda/dispatch.cpp);
    # CPU-only builds accept the same names and have nothing to switch
    from spallm_ext import kernels
    with pytest.raises(ValueError, match="mode must be one of"):
        kernels.set_lowrank_t("on-chip")
    with pytest.raises(ValueError, match="mode must be one of"):
        kernels.set_lowrank_t(1)
    with kernels.use_lowrank_t("gemm"):
        assert kernels.lowrank_t() in kernels.LOWRANK_T_MODES
    assert kernels.lowrank_t() == "auto"


# ---------------------------------------------------------------- backward


@pytest.mark.parametrize("device,dtype", act_lut_dtype_params())
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("groups", [1, 4])
def test_backward_matches_reference(device, dtype, bits, groups):
    """x, lut, l1, l2 and bias grads vs autograd through the dense fp64 reference. The sketch part of
    dx and dlut reuses lut_linear_dx / lut_grad; the branch parts are plain matmuls."""
    x0, codes, lut0, l10, l20, b0 = _problem(device, bits, groups, dtype=dtype, seed=5)
    dy = randn(2, 3, N, dtype=dtype, device=device, seed=9)
    x, lut, l1, l2, b = (t.clone().requires_grad_(True) for t in (x0, lut0, l10, l20, b0))
    spallm_ext.lut_linear_lowrank(x, codes, lut, l1, l2, b).backward(dy)
    ref = [t.detach().cpu().double().requires_grad_(True) for t in (x0, lut0, l10, l20, b0)]
    reference.lut_linear_lowrank(ref[0], codes.cpu(), *ref[1:4], ref[4]).backward(dy.cpu().double())
    assert x.grad.dtype == dtype and b.grad.dtype == dtype
    assert lut.grad.dtype == l1.grad.dtype == l2.grad.dtype == torch.float32
    assert_close_rel(x.grad, ref[0].grad.to(dtype))
    assert_close_rel(b.grad, ref[4].grad.to(dtype))
    # master-copy grads are computed in fp32 from dy in x's dtype: x's rounding bounds them
    tol = dtype if dtype != torch.float64 else torch.float32
    for got, want in ((lut.grad, ref[1].grad), (l1.grad, ref[2].grad), (l2.grad, ref[3].grad)):
        assert_close_rel(got, want.float(), dtype=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_only_some_inputs(device):
    """Frozen inputs get no grad (the needs_input_grad paths), and the rest are still right."""
    x0, codes, lut0, l10, l20, b0 = _problem(device, 4, 2)
    l1 = l10.clone().requires_grad_(True)
    l2 = l20.clone().requires_grad_(True)
    spallm_ext.lut_linear_lowrank(x0, codes, lut0, l1, l2, b0).sum().backward()
    assert lut0.grad is None and x0.grad is None and codes.grad is None
    dy = torch.ones(2, 3, N, dtype=torch.float64)
    xf = x0.double().reshape(-1, x0.shape[-1]).cpu()
    assert_close_rel(l1.grad, (xf.T @ (dy.reshape(-1, N) @ l20.double().cpu().T)).float())
    assert_close_rel(l2.grad, ((xf @ l10.double().cpu()).T @ dy.reshape(-1, N)).float())


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_gradcheck_fp64(bits, with_bias):
    k = odd_in_features(bits, 2, 8)
    codes, lut = make_sketch(3, k, bits, 2, lut_dtype=torch.float64, seed=bits)
    x = randn(2, 2, k, dtype=torch.float64, seed=1).requires_grad_(True)
    l1 = randn(k, 2, dtype=torch.float64, seed=2).requires_grad_(True)
    l2 = randn(2, 3, dtype=torch.float64, seed=3).requires_grad_(True)
    lut.requires_grad_(True)
    if with_bias:
        b = randn(3, dtype=torch.float64, seed=4).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda *a: spallm_ext.lut_linear_lowrank(a[0], codes, *a[1:]),
                                        (x, lut, l1, l2, b))
    else:
        assert torch.autograd.gradcheck(lambda *a: spallm_ext.lut_linear_lowrank(a[0], codes, *a[1:]),
                                        (x, lut, l1, l2))


# ---------------------------------------------------------------- opcheck, compile


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_opcheck(device, bits, with_bias):
    x, codes, lut, l1, l2, bias = _problem(device, bits)
    args = [t.requires_grad_(True) for t in (x, lut, l1, l2)]
    b = bias.requires_grad_(True) if with_bias else None
    assert_opcheck_passes(torch.library.opcheck(ops.lut_linear_lowrank.default,
                                           (args[0], codes, args[1], args[2], args[3], b)))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_low_precision_and_zero_tokens(device):
    x, codes, lut, l1, l2, bias = _problem(device, 4, 4, lead=(0,), dtype=torch.bfloat16, lr_dtype=torch.bfloat16)
    assert_opcheck_passes(torch.library.opcheck(ops.lut_linear_lowrank.default,
                                           (x.requires_grad_(True), codes, lut, l1.requires_grad_(True),
                                            l2.requires_grad_(True), bias)))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = LowRankSketchedLinear(24, 16, 4, bits=3, groups_per_row=3, bias=True, train_bias=True)
        self.b = LowRankSketchedLinear(16, 8, 2, bits=4, groups_per_row=2, bias=False, trainable="lowrank")
        with torch.no_grad():   # a non-zero branch, so its gradients reach x
            self.a.l2.normal_()
            self.b.l2.normal_()

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_forward_backward(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _Block().to(device)
    mod = _Block().to(device)
    mod.load_state_dict(eager.state_dict())
    compiled = torch.compile(mod, fullgraph=True, backend="inductor")
    x = randn(2, 5, 24, device=device, seed=1)

    def run(fn, m):
        xx = x.clone().requires_grad_(True)
        y = fn(xx)
        (y ** 2).sum().backward()
        return y.detach(), xx.grad, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    y_e, dx_e, g_e = run(eager, eager)
    y_c, dx_c, g_c = run(compiled, mod)
    assert_close_rel(y_c, y_e)
    assert_close_rel(dx_c, dx_e)
    assert set(g_c) == set(g_e) == {"a.lut", "a.l1", "a.l2", "a.bias", "b.l1", "b.l2"}
    for name in g_e:
        assert_close_rel(g_c[name], g_e[name])


# ---------------------------------------------------------------- bad input


def _call(a):
    return spallm_ext.lut_linear_lowrank(a["x"], a["codes"], a["lut"], a["l1"], a["l2"], a.get("bias"))


def _valid(device="cpu"):
    x, codes, lut, l1, l2, bias = _problem(device, 4, 2, lead=(3,))
    return dict(x=x, codes=codes, lut=lut, l1=l1, l2=l2, bias=bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("change,exc,match", [
    (lambda a: a.update(l1=a["l1"][:, :0], l2=a["l2"][:0]), ValueError, "rank 0"),
    (lambda a: a.update(l2=a["l2"][:2]), ValueError, "disagree on the rank"),
    (lambda a: a.update(l1=a["l1"][:-2]), ValueError, "'l1' must be 2-D \\[in_features"),
    (lambda a: a.update(l1=a["l1"][None]), ValueError, "'l1' must be 2-D"),
    (lambda a: a.update(l2=a["l2"][:, :-1]), ValueError, "'l2' must be 2-D \\[rank, out_features"),
    (lambda a: a.update(l1=a["l1"].to(torch.int32)), TypeError, "'l1'"),
    (lambda a: a.update(l2=a["l2"].to(torch.bfloat16)), TypeError, "'l1' and 'l2' must share one dtype"),
    (lambda a: a.update(x=a["x"][:, :-2]), ValueError, "'x'"),
    (lambda a: a.update(x=a["x"].to(torch.int64), bias=None), TypeError, "'x'"),
    (lambda a: a.update(bias=a["bias"].to(torch.float16)), TypeError, "'bias'"),
    (lambda a: a.update(bias=a["bias"][:-1]), ValueError, "'bias'"),
    (lambda a: a.update(lut=a["lut"][:, :, :5].contiguous()), ValueError, "'lut'"),
    (lambda a: a.update(codes=a["codes"].to(torch.int32)), TypeError, "'codes'"),
], ids=["rank0", "rank_mismatch", "l1_rows", "l1_3d", "l2_cols", "l1_int", "l1_l2_dtypes", "x_features",
        "x_int", "bias_dtype", "bias_shape", "lut_entries", "codes_dtype"])
def test_bad_input(device, change, exc, match):
    a = _valid(device)
    change(a)
    with pytest.raises(exc, match=match):
        _call(a)


@pytest.mark.parametrize("device", [p for p in DEVICES if p.values[0] == "cuda"])
def test_bad_input_devices_and_fp64_on_cuda(device):
    a = _valid(device)
    a["l1"] = a["l1"].cpu()
    with pytest.raises(RuntimeError, match="'l1'"):
        _call(a)
    a = _valid(device)
    a["l1"], a["l2"] = a["l1"].double(), a["l2"].double()
    with pytest.raises(TypeError, match="'l1' must be float32"):
        _call(a)


# ---------------------------------------------------------------- initialisations


def _outlier_layer(n=48, k=64, tokens=1024, seed=0):
    """A weight and calibration inputs with the structure SVDQuant targets: a few input channels
    carry activations ~30x the others (outlier channels), the weight is small and unstructured."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(tokens, k, generator=g)
    x[:, :3] *= 30.0
    return w, 2.0 * x.T @ x / tokens


def test_svd_init_with_smoothing_beats_direct_sketch_on_outlier_channels():
    w, h = _outlier_layer()
    res = lowrank_sketch(w, 4, bits=2, init="svd", hessian=h, smooth_alpha=0.5, measure_direct=True)
    info = res.info
    # the smoothed SVD branch takes the outlier directions; the residual sketch does the rest
    assert info["rel_err"] < 0.6 * info["rel_err_direct"], info
    assert info["rel_err"] < info["rel_err_lowrank"] and info["rel_err"] < info["rel_err_sketch"]
    # the figures are what they say: recompute the final error from the tensors
    w_hat = reference.lut_decode(spallm_ext.pack_codes(res.codes, 2), res.lut) + (res.l1 @ res.l2).T
    assert abs(relative_error(w, w_hat, h) - info["rel_err"]) < 1e-4


def test_svd_init_absorbs_a_low_rank_spike_data_free():
    """Without calibration: a weight = rank-2 spike + small noise. Sketching the residual after
    the SVD is far better than sketching W, whose LUTs the spike stretches."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 64, generator=g) * 0.01
    w += 0.5 * torch.randn(40, 2, generator=g) @ torch.randn(2, 64, generator=g)
    info = lowrank_sketch(w, 2, bits=2, init="svd", measure_direct=True).info
    assert info["rel_err"] < 0.3 * info["rel_err_direct"], info


def test_eora_lowers_calibration_output_error():
    w, h = _outlier_layer(seed=2)
    res = lowrank_sketch(w, 4, bits=2, init="eora", hessian=h)
    assert res.info["rel_err"] < 0.7 * res.info["rel_err_sketch"], res.info
    # EoRA is the optimal rank-r fit in the H-weighted norm: a plain SVD of the error does worse
    w_hat = reference.lut_decode(spallm_ext.pack_codes(res.codes, 2), res.lut)
    l1s, l2s = eora_fit(w - w_hat, 4, None)
    plain = relative_error(w, w_hat + (l1s @ l2s).T, h)
    assert res.info["rel_err"] < plain


def test_eora_never_hurts_and_rank_helps():
    w, h = _outlier_layer(n=32, k=32, seed=3)
    errs = [lowrank_sketch(w, r, bits=3, init="eora", hessian=h).info["rel_err"] for r in (1, 4, 16)]
    sketch = lowrank_sketch(w, 1, bits=3, init="eora", hessian=h).info["rel_err_sketch"]
    assert sketch >= errs[0] >= errs[1] >= errs[2]


def test_zeros_init_equals_plain_sketch():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 12)
    x = randn(5, 32, seed=1)
    plain = SketchedLinear.from_linear(lin, bits=3, groups_per_row=2)
    lr = LowRankSketchedLinear.from_linear(lin, 8, bits=3, groups_per_row=2, init="zeros")
    assert lr.trainable == "lowrank" and torch.count_nonzero(lr.l1) > 0 and torch.count_nonzero(lr.l2) == 0
    assert torch.equal(lr.codes, plain.codes) and torch.equal(lr.lut, plain.lut)
    assert torch.equal(lr(x), plain(x))
    wrapped = LowRankSketchedLinear.from_sketched(plain, 8)          # same thing from an existing sketch
    assert torch.equal(wrapped(x), plain(x)) and wrapped.trainable == "lowrank"


def test_from_sketched_eora_uses_the_dense_weight():
    w, h = _outlier_layer(n=16, k=32, seed=4)
    lin = torch.nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    plain = SketchedLinear.from_linear(lin, bits=2)
    mod = LowRankSketchedLinear.from_sketched(plain, 4, init="eora", weight=w, hessian=h)
    assert mod.init_info["rel_err"] < mod.init_info["rel_err_sketch"]
    assert torch.equal(mod.codes, plain.codes) and mod.trainable == "both"
    with pytest.raises(ValueError, match="needs the original dense"):
        LowRankSketchedLinear.from_sketched(plain, 4, init="eora")
    with pytest.raises(ValueError, match="use from_linear"):
        LowRankSketchedLinear.from_sketched(plain, 4, init="svd")


def test_init_argument_errors():
    w, h = _outlier_layer(n=8, k=16)
    with pytest.raises(ValueError, match="rank"):
        lowrank_sketch(w, 9, init="eora")
    with pytest.raises(ValueError, match="init"):
        lowrank_sketch(w, 2, init="lora")
    with pytest.raises(ValueError, match="needs calibration"):
        lowrank_sketch(w, 2, init="svd", smooth_alpha=0.5)
    with pytest.raises(ValueError, match="svd' only"):
        lowrank_sketch(w, 2, init="eora", hessian=h, smooth_alpha=0.5)
    with pytest.raises(ValueError, match="rank 0"):
        LowRankSketchedLinear(16, 8, 0)
    with pytest.raises(ValueError, match="trainable"):
        LowRankSketchedLinear(16, 8, 2, trainable="all")


# ---------------------------------------------------------------- module


@pytest.mark.parametrize("mode,want", [("lut", {"lut"}), ("lowrank", {"l1", "l2"}), ("both", {"lut", "l1", "l2"})])
def test_trainable_modes(mode, want):
    mod = LowRankSketchedLinear(16, 8, 2, bits=2, trainable=mode)
    with torch.no_grad():
        mod.l2.normal_()
    assert {n for n, p in mod.named_parameters() if p.requires_grad} == want
    mod(randn(3, 16, seed=1)).sum().backward()
    assert {n for n, p in mod.named_parameters() if p.grad is not None} == want
    assert mod.set_trainable("lut") is mod and mod.trainable == "lut" and not mod.l1.requires_grad


def test_module_storage_and_merge():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 24)
    mod = LowRankSketchedLinear.from_linear(lin, 8, bits=3, groups_per_row=2, init="svd")
    plain = SketchedLinear(64, 24, bits=3, groups_per_row=2)
    assert mod.storage_bytes(torch.float16, torch.float16) == plain.storage_bytes(torch.float16) + 8 * (64 + 24) * 2
    assert mod.storage_bytes() == plain.storage_bytes() + 8 * (64 + 24) * 4      # fp32 master copies
    x = randn(4, 64, seed=3)
    assert_close_rel(mod.to_linear()(x).detach(), mod(x).detach(), factor=10)
    assert "rank=8" in repr(mod) and "init=svd" in repr(mod)


def test_autocast_and_adapter_stack_paths():
    torch.manual_seed(0)
    mod = LowRankSketchedLinear.from_linear(torch.nn.Linear(32, 8), 4, bits=4, init="svd")
    x = randn(2, 3, 32, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mod(x)
    assert y.dtype == torch.bfloat16
    assert_close_rel(y, mod(x.bfloat16()))
    # a LUT stack chosen per token (multi_adapter): the sketch through SketchedLinear's path, the
    # shared branch beside it
    mod.lut_stack = torch.nn.Parameter(torch.stack([mod.lut.detach(), mod.lut.detach() * 2]))
    mod.adapter_index = torch.tensor([1, 0, 1, 1, 0, 0])
    y = mod(x)
    idx = mod.adapter_index.view(2, 3, 1)
    want = torch.where(idx == 1, spallm_ext.lut_linear_lowrank(x, mod.codes, mod.lut_stack[1].detach(), mod.l1, mod.l2, mod.bias),
                       spallm_ext.lut_linear_lowrank(x, mod.codes, mod.lut_stack[0].detach(), mod.l1, mod.l2, mod.bias))
    assert_close_rel(y.detach(), want.detach(), factor=10)

"""Python face of the torch.ops.spallm operators.

The schemas and kernels are C++ (csrc/registration.cpp, csrc/cpu, csrc/cuda). Here each op gets a
fake (meta) implementation, so torch.compile and opcheck can trace it, and lut_linear gets its
autograd formula, whose backward is two more spallm ops (lut_linear_dx, lut_grad): dense W or dW
never appear. No Python custom_op sits on the hot path.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .formats import bits_for_entries, in_features_of



def lut_linear(x: Tensor, codes: Tensor, lut: Tensor, bias: Tensor | None = None,
               adapter_index: Tensor | None = None) -> Tensor:
    """y = x W^T (+ bias) with W[r, c] = lut[r, c // (K/G), code[r, c]]; x: [..., K] -> [..., N].

    Multi-adapter batches: with ``adapter_index`` (int, one entry per token), ``lut`` is a stack
    [A, N, G, 2^b] of adapters sharing the codes, and token m uses lut[adapter_index[m]]."""
    return torch.ops.spallm.lut_linear(x, codes, lut, bias, adapter_index)


def lut_linear_dx(dy: Tensor, codes: Tensor, lut: Tensor, adapter_index: Tensor | None = None) -> Tensor:
    """dx = dy W; dy: [..., N] -> [..., K] (adapter_index as in lut_linear)."""
    return torch.ops.spallm.lut_linear_dx(dy, codes, lut, adapter_index)


def lut_grad(dy: Tensor, x: Tensor, codes: Tensor, groups_per_row: int, num_entries: int,
             adapter_index: Tensor | None = None, num_adapters: int = 0,
             deterministic: bool | None = None) -> Tensor:
    """dlut[r, g, k]: sum of (dy^T x)[r, c] over the columns c of group g whose code is k (fp32).
    With adapter_index: [num_adapters, N, G, 2^b], each token's part in its own adapter.
    ``deterministic`` (default: :func:`deterministic_grads`) forbids float atomics."""
    if deterministic is None:
        deterministic = deterministic_grads()
    return torch.ops.spallm.lut_grad(dy, x, codes, groups_per_row, num_entries, adapter_index, num_adapters,
                                     deterministic)


_DETERMINISTIC = False


def set_deterministic(enabled: bool) -> None:
    """Make every LUT gradient bit-identical run to run (no float atomics in lut_grad).

    torch.use_deterministic_algorithms(True) has the same effect; this switch is for runs that want
    deterministic LUT gradients without PyTorch's other deterministic restrictions."""
    global _DETERMINISTIC
    _DETERMINISTIC = bool(enabled)


def deterministic_grads() -> bool:
    """True when lut_grad must be deterministic: set_deterministic(True) or
    torch.are_deterministic_algorithms_enabled()."""
    return _DETERMINISTIC or torch.are_deterministic_algorithms_enabled()


def lut_decode(codes: Tensor, lut: Tensor) -> Tensor:
    """Dense W [N, K] in the LUT's dtype (export, merging, debugging)."""
    return torch.ops.spallm.lut_decode(codes, lut)


def _in_features(codes: Tensor, entries: int) -> int:
    return in_features_of(codes, bits_for_entries(int(entries)))


def _check_lut_shape(codes: Tensor, lut: Tensor, stacked: bool = False) -> None:
    want = 4 if stacked else 3
    torch._check(codes.dim() == 2, lambda: f"codes must be 2-D, got {codes.dim()}-D")
    torch._check(lut.dim() == want, lambda: f"lut must be {want}-D, got {lut.dim()}-D")
    torch._check(lut.shape[-3] == codes.shape[0], lambda: "lut and codes must have the same out_features")


@torch.library.register_fake("spallm::lut_linear")
def _lut_linear_fake(x, codes, lut, bias=None, adapter_index=None):
    _check_lut_shape(codes, lut, adapter_index is not None)
    torch._check(x.shape[-1] == _in_features(codes, lut.shape[-1]), lambda: "x's last dim != in_features")
    return x.new_empty((*x.shape[:-1], lut.shape[-3]))


@torch.library.register_fake("spallm::lut_linear_dx")
def _lut_linear_dx_fake(dy, codes, lut, adapter_index=None):
    _check_lut_shape(codes, lut, adapter_index is not None)
    torch._check(dy.shape[-1] == lut.shape[-3], lambda: "dy's last dim != out_features")
    return dy.new_empty((*dy.shape[:-1], _in_features(codes, lut.shape[-1])))


@torch.library.register_fake("spallm::lut_grad")
def _lut_grad_fake(dy, x, codes, groups_per_row, num_entries, adapter_index=None, num_adapters=0,
                   deterministic=False):
    torch._check(codes.dim() == 2, lambda: "codes must be 2-D")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = (codes.shape[0], groups_per_row, num_entries)
    if adapter_index is not None:
        shape = (num_adapters, *shape)
    return x.new_empty(shape, dtype=dtype)


@torch.library.register_fake("spallm::lut_decode")
def _lut_decode_fake(codes, lut):
    _check_lut_shape(codes, lut)
    return lut.new_empty((codes.shape[0], _in_features(codes, lut.shape[-1])))


def _setup_context(ctx, inputs, output):
    x, codes, lut, bias, adapter_index = inputs
    ctx.save_for_backward(x, codes, lut, adapter_index)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy):
    x, codes, lut, adapter_index = ctx.saved_tensors
    dx = dlut = dbias = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.spallm.lut_linear_dx(dy, codes, lut, adapter_index)
    if ctx.needs_input_grad[2]:
        num_adapters = lut.shape[0] if adapter_index is not None else 0
        dlut = torch.ops.spallm.lut_grad(dy, x, codes, lut.shape[-2], lut.shape[-1], adapter_index,
                                         num_adapters, deterministic_grads()).to(lut.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0, dtype=acc).to(ctx.bias_dtype)
    return dx, None, dlut, dbias, None


torch.library.register_autograd("spallm::lut_linear", _backward, setup_context=_setup_context)


def _decode_setup_context(ctx, inputs, output):
    codes, lut = inputs
    ctx.save_for_backward(codes)
    ctx.lut_shape, ctx.lut_dtype = tuple(lut.shape), lut.dtype


def _decode_backward(ctx, dw):
    # lut_decode is for export and debugging, so its backward may use the dense dW it is handed:
    # each weight's gradient goes to the LUT entry it was read from.
    (codes,) = ctx.saved_tensors
    from .reference import lut_gather_index

    n, g, e = ctx.lut_shape
    idx = lut_gather_index(codes, g, e)
    acc = torch.float64 if dw.dtype == torch.float64 else torch.float32
    dlut = torch.zeros(n, g * e, dtype=acc, device=dw.device).scatter_add_(1, idx, dw.to(acc))
    return None, dlut.view(n, g, e).to(ctx.lut_dtype)


torch.library.register_autograd("spallm::lut_decode", _decode_backward, setup_context=_decode_setup_context)


# ---------------------------------------------------------------------------------------------
# lut_linear_lowrank: the sketch plus a low-rank branch, y = x W^T + (x l1) l2 (+ bias).
# Kernels: csrc/lowrank.cpp (lut_linear + two GEMMs, CPU and CUDA) until a fused CUDA kernel
# replaces the CUDA one. The backward reuses lut_linear_dx and lut_grad for the sketch and plain
# matmuls for the branch; everything accumulates in fp32 (fp64 for fp64 x), as the forward does.
# ---------------------------------------------------------------------------------------------


def lut_linear_lowrank(x: Tensor, codes: Tensor, lut: Tensor, l1: Tensor, l2: Tensor,
                       bias: Tensor | None = None) -> Tensor:
    """y = x W^T + (x l1) l2 (+ bias); x [..., K], l1 [K, rank], l2 [rank, N] -> y [..., N].

    l1 and l2 share one dtype (fp32, bf16 or fp16; fp64 on CPU), independent of x's; the bias has
    x's dtype. Accumulates in fp32 and rounds to x's dtype once."""
    return torch.ops.spallm.lut_linear_lowrank(x, codes, lut, l1, l2, bias)


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.register_fake("spallm::lut_linear_lowrank")
def _lut_linear_lowrank_fake(x, codes, lut, l1, l2, bias=None):
    _check_lut_shape(codes, lut)
    k, n = _in_features(codes, lut.shape[-1]), lut.shape[0]
    torch._check(x.shape[-1] == k, lambda: "x's last dim != in_features")
    torch._check(l1.dim() == 2 and l2.dim() == 2, lambda: "l1 and l2 must be 2-D")
    torch._check(l1.shape[0] == k, lambda: "l1 must be [in_features, rank]")
    torch._check(l2.shape[1] == n, lambda: "l2 must be [rank, out_features]")
    torch._check(l1.shape[1] == l2.shape[0], lambda: "l1 and l2 disagree on the rank")
    return x.new_empty((*x.shape[:-1], n))


def _lowrank_setup_context(ctx, inputs, output):
    x, codes, lut, l1, l2, bias = inputs
    ctx.save_for_backward(x, codes, lut, l1, l2)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _lowrank_backward(ctx, dy):
    x, codes, lut, l1, l2 = ctx.saved_tensors
    # needs_input_grad has one entry per argument the caller passed (bias may be left out)
    need_x, _, need_lut, need_l1, need_l2, need_bias = (*ctx.needs_input_grad, False)[:6]
    acc = _acc_dtype(dy)
    k, n = x.shape[-1], dy.shape[-1]
    dy2 = dy.reshape(-1, n).to(acc)
    x2 = x.reshape(-1, k).to(acc)
    l1a, l2a = l1.to(acc), l2.to(acc)
    dx = dlut = dl1 = dl2 = dbias = None
    u = dy2 @ l2a.T if (need_x or need_l1) else None                      # dy l2^T: [M, rank]
    if need_x:
        # lut_linear_dx in dy's own dtype, as SketchedLinear's backward calls it (bf16/fp16 dy takes
        # the tensor-core kernel on CUDA, an fp32 dy would not); the branch's part is added in fp32.
        dxq = torch.ops.spallm.lut_linear_dx(dy.reshape(-1, n), codes, lut, None)
        dx = torch.addmm(dxq.to(acc), u, l1a.T).to(x.dtype).reshape(x.shape)
    if need_lut:
        dlut = torch.ops.spallm.lut_grad(dy, x, codes, lut.shape[-2], lut.shape[-1], None, 0,
                                         deterministic_grads()).to(lut.dtype)
    if need_l1:
        dl1 = (x2.T @ u).to(l1.dtype)                                       # x^T (dy l2^T): [K, rank]
    if need_l2:
        dl2 = ((x2 @ l1a).T @ dy2).to(l2.dtype)                             # (x l1)^T dy: [rank, N]
    if ctx.bias_dtype is not None and need_bias:
        dbias = dy2.sum(0).to(ctx.bias_dtype)
    return dx, None, dlut, dl1, dl2, dbias


torch.library.register_autograd("spallm::lut_linear_lowrank", _lowrank_backward,
                                setup_context=_lowrank_setup_context)

"""Pure-PyTorch reference of every spallm op: what the tests compare the CPU and CUDA kernels with.

Written for clarity, not speed: it builds the dense W (and dW) that the real kernels never build,
and accumulates in float64.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .formats import bits_for_entries, in_features_of, unpack_codes


def lut_gather_index(codes: Tensor, groups_per_row: int, num_entries: int) -> Tensor:
    """Flat index into lut.view(out, G * 2^bits) of every weight: g(c) * 2^bits + code."""
    bits = bits_for_entries(num_entries)
    k = unpack_codes(codes, bits).long()
    in_features = k.shape[1]
    group = torch.arange(in_features, device=codes.device) // (in_features // groups_per_row)
    return group * (1 << bits) + k


def lut_decode(codes: Tensor, lut: Tensor) -> Tensor:
    """Dense W [out, in] in the LUT's dtype."""
    idx = lut_gather_index(codes, lut.shape[1], lut.shape[2])
    return torch.gather(lut.reshape(lut.shape[0], -1), 1, idx)


def _acc(t: Tensor) -> Tensor:
    return t.to(torch.float64)


def _per_adapter(fn, t: Tensor, lut: Tensor, adapter_index: Tensor, out_features: int) -> Tensor:
    """Run fn(rows, lut[a]) on each adapter's tokens of t [..., F] and put the results back."""
    flat = t.reshape(-1, t.shape[-1])
    idx = adapter_index.reshape(-1)
    out = None
    for a in range(lut.shape[0]):
        rows = (idx == a).nonzero().flatten()
        ya = fn(flat[rows], lut[a])
        if out is None:
            out = flat.new_zeros(flat.shape[0], out_features, dtype=ya.dtype)
        out[rows] = ya
    return out.reshape(*t.shape[:-1], out_features)


def lut_linear(x: Tensor, codes: Tensor, lut: Tensor, bias: Tensor | None = None,
               adapter_index: Tensor | None = None) -> Tensor:
    if adapter_index is not None:
        return _per_adapter(lambda xs, la: lut_linear(xs, codes, la, bias), x, lut, adapter_index, lut.shape[-3])
    w = _acc(lut_decode(codes, lut))
    y = _acc(x) @ w.T
    if bias is not None:
        y = y + _acc(bias)
    return y.to(x.dtype)


def lut_linear_dx(dy: Tensor, codes: Tensor, lut: Tensor, adapter_index: Tensor | None = None) -> Tensor:
    if adapter_index is not None:
        k = in_features_of(codes, bits_for_entries(lut.shape[-1]))
        return _per_adapter(lambda d, la: lut_linear_dx(d, codes, la), dy, lut, adapter_index, k)
    return (_acc(dy) @ _acc(lut_decode(codes, lut))).to(dy.dtype)


def lut_grad(dy: Tensor, x: Tensor, codes: Tensor, groups_per_row: int, num_entries: int,
             adapter_index: Tensor | None = None, num_adapters: int = 0) -> Tensor:
    if adapter_index is not None:
        idx = adapter_index.reshape(-1)
        dyf, xf = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        return torch.stack([lut_grad(dyf[idx == a], xf[idx == a], codes, groups_per_row, num_entries)
                            for a in range(num_adapters)])
    n = codes.shape[0]
    dw = _acc(dy).reshape(-1, n).T @ _acc(x).reshape(-1, x.shape[-1])
    idx = lut_gather_index(codes, groups_per_row, num_entries)
    dlut = torch.zeros(n, groups_per_row * num_entries, dtype=torch.float64, device=dw.device)
    dlut.scatter_add_(1, idx, dw)
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return dlut.reshape(n, groups_per_row, num_entries).to(out_dtype)


def lut_linear_lowrank(x: Tensor, codes: Tensor, lut: Tensor, l1: Tensor, l2: Tensor,
                       bias: Tensor | None = None) -> Tensor:
    """x W^T + (x l1) l2 (+ bias) in float64, rounded to x's dtype."""
    xa = _acc(x)
    y = xa @ _acc(lut_decode(codes, lut)).T + (xa @ _acc(l1)) @ _acc(l2)
    if bias is not None:
        y = y + _acc(bias)
    return y.to(x.dtype)

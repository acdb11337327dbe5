"""Pure-PyTorch reference of every spallm op: what the tests compare the CPU and CUDA kernels with.

Written for clarity, not speed: it builds the dense W (and dW) that the real kernels never build,
and accumulates in float64.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .formats import unpack_codes


def lut_gather_index(codes: Tensor, groups_per_row: int, num_entries: int) -> Tensor:
    """Flat index into lut.view(out, G * 2^bits) of every weight: g(c) * 2^bits + code."""
    bits = {4: 2, 8: 3, 16: 4}[num_entries]
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


def lut_linear(x: Tensor, codes: Tensor, lut: Tensor, bias: Tensor | None = None) -> Tensor:
    w = _acc(lut_decode(codes, lut))
    y = _acc(x) @ w.T
    if bias is not None:
        y = y + _acc(bias)
    return y.to(x.dtype)


def lut_linear_dx(dy: Tensor, codes: Tensor, lut: Tensor) -> Tensor:
    return (_acc(dy) @ _acc(lut_decode(codes, lut))).to(dy.dtype)


def lut_grad(dy: Tensor, x: Tensor, codes: Tensor, groups_per_row: int, num_entries: int) -> Tensor:
    n = codes.shape[0]
    dw = _acc(dy).reshape(-1, n).T @ _acc(x).reshape(-1, x.shape[-1])
    idx = lut_gather_index(codes, groups_per_row, num_entries)
    dlut = torch.zeros(n, groups_per_row * num_entries, dtype=torch.float64, device=dw.device)
    dlut.scatter_add_(1, idx, dw)
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return dlut.reshape(n, groups_per_row, num_entries).to(out_dtype)

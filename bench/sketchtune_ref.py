"""The official SketchTune training path, reimplemented in plain PyTorch as a benchmark baseline.

What the official code (LeanModels/SketchTune, tailor_utils.Sub4BitMatMul with its CuPy kernels)
does per sketched linear layer, and what this module does the same way:
  * the LUT (`quant_grid`) is a bf16 parameter, no fp32 master copy;
  * forward: decode the dense bf16 W [N, K] from codes and LUT, y = x W^T;
  * backward: decode W again, build the dense dW = dy^T x in bf16, reduce each (row, group)'s
    columns into its 2^b buckets with fp32 accumulation (rounded to bf16), then dx = dy W.
    W and dW are both alive while dW is reduced, as there.
Where it differs (the official gather / scatter kernels are CuPy, which the GPU machine lacks):
  * decode is an index_select through a flat int32 index (row * G * 2^b + group * 2^b + code)
    built once per layer, or spallm_ext.lut_decode (`--ref-decode lut_decode`), which reads the
    packed codes as the official gather kernel does;
  * the bucket reduction is index_add_ into an fp32 buffer over row chunks of dW (each chunk
    cast to fp32), instead of one thread block per (row, group).
The index costs 4 bytes per weight of persistent memory (it is built before the memory
baseline, so it shows in the row's model_mb, not in its step peak).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import spallm_ext
from spallm_ext.reference import lut_gather_index

# Rows of dW cast to fp32 at a time in the bucket reduction: bounds the fp32 copy at
# ROW_CHUNK * K * 4 bytes (16 MB at K = 4096) while keeping the loop short.
ROW_CHUNK = 1024
DECODE = {"mode": "index"}  # "index" or "lut_decode"; set by bench_train's --ref-decode


def _decode(codes: Tensor, lut: Tensor, flat_index: Tensor) -> Tensor:
    if DECODE["mode"] == "lut_decode":
        return spallm_ext.lut_decode(codes, lut)
    return lut.reshape(-1).index_select(0, flat_index.reshape(-1)).view(flat_index.shape)


class _SketchTuneMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, lut: Tensor, codes: Tensor, flat_index: Tensor) -> Tensor:
        w = _decode(codes, lut, flat_index)
        ctx.save_for_backward(x, lut, codes, flat_index)
        return x @ w.T

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, lut, codes, flat_index = ctx.saved_tensors
        w = _decode(codes, lut, flat_index)
        dlut = None
        if ctx.needs_input_grad[1]:
            n, k = w.shape
            dw = dy.reshape(-1, n).T @ x.reshape(-1, k)            # dense dW [N, K], bf16
            acc = torch.zeros(lut.numel(), dtype=torch.float32, device=lut.device)
            for r0 in range(0, n, ROW_CHUNK):
                r1 = min(n, r0 + ROW_CHUNK)
                acc.index_add_(0, flat_index[r0:r1].reshape(-1), dw[r0:r1].reshape(-1).float())
            del dw
            dlut = acc.view(lut.shape).to(lut.dtype)
        dx = dy @ w if ctx.needs_input_grad[0] else None
        return dx, dlut, None, None


class SketchTuneRefLinear(nn.Module):
    """y = x W^T through the official decode -> matmul -> dense dW -> scatter path."""

    def __init__(self, codes: Tensor, lut: Tensor):
        super().__init__()
        n, g, e = lut.shape
        self.register_buffer("codes", codes)
        self.lut = nn.Parameter(lut.to(torch.bfloat16))
        # int32 is enough (N * G * 2^b < 2^31 for any real layer) and halves the index's memory.
        self.register_buffer("flat_index", (lut_gather_index(codes, g, e)
                                            + torch.arange(n, device=codes.device)[:, None] * (g * e)).to(torch.int32))

    @classmethod
    def from_sketched(cls, layer: spallm_ext.SketchedLinear) -> "SketchTuneRefLinear":
        if layer.bias is not None:
            raise ValueError("the benchmark's projections have no bias")
        return cls(layer.codes, layer.lut.detach())

    def forward(self, x: Tensor) -> Tensor:
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            x = x.to(torch.get_autocast_dtype(dev))
        return _SketchTuneMatmul.apply(x, self.lut, self.codes, self.flat_index)

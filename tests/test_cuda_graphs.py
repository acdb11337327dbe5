"""The single-LUT ops launch without host syncs, so a CUDA graph can capture them (decode loops
replay them as one graph). The multi-adapter path syncs (index range check) and is not capturable."""
from __future__ import annotations

import pytest
import torch

import spallm_ext
from spallm_ext import kernels

from conftest import CUDA_MARKS, make_sketch

pytestmark = CUDA_MARKS


def _plans(fn) -> list[str]:
    """The first word of last_cuda_plan() after each of fn's calls."""
    out = []
    for call in fn:
        call()
        out.append(kernels.last_cuda_plan().split()[0])
    return out


# K = 128 with G = 4 (groups of 32 columns) takes the exact CUDA-core kernels; K = 256 (groups of
# 64) the tensor-core ones, with one 64-column tile per group so the atomic lut_grad is exact.
@pytest.mark.parametrize("k,plans", [(128, ["simple", "simple", "simple"]),
                                     (256, ["mma_regs_direct", "mma", "mma"])])
def test_lut_linear_and_backward_ops_replay_in_a_cuda_graph(k, plans):
    codes, lut = make_sketch(64, k, 4, 4, device="cuda", seed=1)
    x = torch.randn(3, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(3, 64, device="cuda", dtype=torch.bfloat16)
    assert _plans([lambda: spallm_ext.lut_linear(x, codes, lut), lambda: spallm_ext.lut_linear_dx(dy, codes, lut),
                   lambda: spallm_ext.lut_grad(dy, x, codes, 4, 16)]) == plans
    # the low-rank op with K split, so t = x l1 comes from the kernel's extra blocks (workspace
    # allocated inside the capture, from the graph's pool)
    codes2, lut2 = make_sketch(64, 512, 4, 4, device="cuda", seed=2)
    x2 = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    l1, l2 = torch.randn(512, 8, device="cuda") * 0.05, torch.randn(8, 64, device="cuda") * 0.05
    spallm_ext.lut_linear_lowrank(x2, codes2, lut2, l1, l2)
    assert "t=on-chip" in kernels.last_cuda_plan(), kernels.last_cuda_plan()
    ops = lambda: (spallm_ext.lut_linear(x, codes, lut), spallm_ext.lut_linear_dx(dy, codes, lut),  # noqa: E731
                   spallm_ext.lut_grad(dy, x, codes, 4, 16), spallm_ext.lut_linear_lowrank(x2, codes2, lut2, l1, l2))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops()  # warm-up outside the capture, as torch.cuda.graphs recommends
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = ops()
    x.copy_(torch.randn_like(x))
    dy.copy_(torch.randn_like(dy))
    x2.copy_(torch.randn_like(x2))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, ops()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # same kernels, same inputs: identical

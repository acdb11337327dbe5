"""Every CUDA forward path (simple, mma, mma_regs, mma_regs_direct, decode_gemm) against the reference, forced one at
a time, plus the dispatch itself: which path a call takes, fallbacks, split-K, CUDA graphs.

"mma", "mma_regs" and "decode_gemm" round W to the activation dtype (as a bf16/fp16 nn.Linear's weight is), so
besides the usual relative-norm check against the exact reference, each output element is compared
with the reference computed from the rounded LUT: a single mis-decoded weight moves an element far
more than fp32 accumulation plus one output rounding can.
"""
from __future__ import annotations

import pytest
import torch

import spallm_ext
from spallm_ext import kernels, reference

from conftest import ALL_BITS, CUDA_MARKS, assert_close_rel, dtype_id, make_sketch, randn

pytestmark = CUDA_MARKS

HALF_DTYPES = (torch.bfloat16, torch.float16)
# The decodes of the fused kernel: W tiles through shared memory, or fragments in registers (codes
# through a shared-memory ring, or loaded straight into registers).
MMA_PATHS = ("mma", "mma_regs", "mma_regs_direct")


def _check_elementwise(out: torch.Tensor, x, codes, lut, bias, act_dtype) -> None:
    """out vs the fp64 reference with W (and bias) rounded as the fast paths round them."""
    ref = reference.lut_linear(x.double(), codes, lut.to(act_dtype).double(),
                               None if bias is None else bias.double())
    scale = ref.abs().max().item() + 1e-6
    err = (out.double() - ref).abs().max().item()
    # one rounding of the output (2^-8 relative for bf16) plus fp32 accumulation of K terms
    assert err <= 2.0 ** -7 * scale, f"max elementwise error {err:.3e} vs scale {scale:.3e}"


def _run(path: str, x, codes, lut, bias=None):
    with kernels.use_cuda_kernel(path):
        y = spallm_ext.lut_linear(x, codes, lut, bias)
        plan = kernels.last_cuda_plan()
    return y, plan


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("act_dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("lut_dtype", (torch.float32, torch.bfloat16, torch.float16), ids=dtype_id)
@pytest.mark.parametrize("path,m,n,k,groups", [
    ("mma", 1, 200, 1024, 4), ("mma", 7, 128, 256, 1), ("mma", 16, 1000, 512, 8), ("mma", 33, 96, 4096, 64),
    ("mma", 64, 130, 128, 2), ("mma", 130, 256, 192, 3), ("mma", 600, 72, 640, 10),
    # register decode: both token tiles, ragged rows, group size 64 (a LUT refill every step),
    # one group, a long K with many groups
    ("mma_regs", 1, 200, 1024, 4), ("mma_regs", 7, 128, 256, 1), ("mma_regs", 16, 1000, 512, 8),
    ("mma_regs", 17, 130, 128, 2), ("mma_regs", 32, 96, 4096, 64), ("mma_regs", 3, 256, 192, 3),
    # codes in registers (16-token tiles, M <= 16): its 4-deep register ring full, partly used
    # (K-steps per split not a multiple of 4) and never filled
    ("mma_regs_direct", 1, 200, 1024, 4), ("mma_regs_direct", 5, 264, 576, 3),
    ("mma_regs_direct", 16, 1000, 512, 8), ("mma_regs_direct", 16, 96, 4096, 64),
    ("mma_regs_direct", 2, 130, 192, 1)])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_mma_matches_reference(bits, act_dtype, lut_dtype, path, m, n, k, groups, with_bias):
    codes, lut = make_sketch(n, k, bits, groups, lut_dtype=lut_dtype, device="cuda", seed=m + n + bits)
    x = randn(m, k, dtype=act_dtype, device="cuda", seed=1)
    bias = randn(n, dtype=act_dtype, device="cuda", seed=2) if with_bias else None
    y, plan = _run(path, x, codes, lut, bias)
    assert plan.startswith(path + " "), plan
    assert y.dtype == act_dtype and y.shape == (m, n)
    assert_close_rel(y, reference.lut_linear(x, codes, lut, bias))
    _check_elementwise(y, x, codes, lut, bias, act_dtype)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("mode", ["zeros", "equal", "alternating", "max"])
@pytest.mark.parametrize("path", MMA_PATHS)
def test_mma_adversarial_codes(bits, mode, path):
    codes, lut = make_sketch(256, 512, bits, 4, device="cuda", mode=mode, seed=bits)
    x = randn(5, 512, dtype=torch.bfloat16, device="cuda", seed=3)
    y, plan = _run(path, x, codes, lut)
    assert plan.startswith(path + " "), plan
    _check_elementwise(y, x, codes, lut, None, torch.bfloat16)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("act_dtype", (torch.float32,) + HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m,n,k,groups", [(40, 200, 1024, 4), (3, 64, 96, 3), (700, 130, 512, 1)])
def test_decode_gemm_matches_reference(bits, act_dtype, m, n, k, groups):
    codes, lut = make_sketch(n, k, bits, groups, device="cuda", seed=bits + m)
    x = randn(m, k, dtype=act_dtype, device="cuda", seed=4)
    bias = randn(n, dtype=act_dtype, device="cuda", seed=5)
    y, plan = _run("decode_gemm", x, codes, lut, bias)
    assert plan.startswith("decode_gemm"), plan
    assert_close_rel(y, reference.lut_linear(x, codes, lut, bias))
    if act_dtype != torch.float32:
        _check_elementwise(y, x, codes, lut, bias, act_dtype)
    dy = randn(m, n, dtype=act_dtype, device="cuda", seed=6)
    with kernels.use_cuda_kernel("decode_gemm"):
        dx = spallm_ext.lut_linear_dx(dy, codes, lut)
        assert kernels.last_cuda_plan().startswith("decode_gemm")
    assert_close_rel(dx, reference.lut_linear_dx(dy, codes, lut))


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("lut_dtype", (torch.float32, torch.bfloat16, torch.float16), ids=dtype_id)
def test_fast_decode_is_bit_exact(bits, lut_dtype):
    codes, lut = make_sketch(300, 1024, bits, 16, lut_dtype=lut_dtype, device="cuda", seed=bits)
    fast = spallm_ext.lut_decode(codes, lut)
    with kernels.use_cuda_kernel("simple"):
        simple = spallm_ext.lut_decode(codes, lut)
    assert torch.equal(fast, simple)
    assert torch.equal(fast.cpu(), reference.lut_decode(codes.cpu(), lut.cpu()))


def test_paths_agree_through_the_module():
    torch.manual_seed(0)
    mod = spallm_ext.SketchedLinear(512, 384, bits=4, groups_per_row=4).cuda()
    x = torch.randn(2, 8, 512, device="cuda", dtype=torch.bfloat16)  # 16 tokens: every path takes them
    outs = {}
    for path in ("simple", "mma", "mma_regs", "mma_regs_direct", "decode_gemm"):
        with kernels.use_cuda_kernel(path):
            outs[path] = mod(x)
            assert kernels.last_cuda_plan().startswith(path + " "), kernels.last_cuda_plan()
    for path in ("mma", "mma_regs", "mma_regs_direct", "decode_gemm"):
        assert_close_rel(outs[path].float(), outs["simple"].float(), torch.bfloat16, factor=2)


def test_auto_dispatch_choices():
    codes, lut = make_sketch(512, 1024, 4, 4, device="cuda")
    for m, expect in [(1, "mma_regs_direct "), (16, "mma_regs_direct "), (17, "mma_regs "), (32, "mma_regs "),
                      (33, "mma "), (100, "mma "),
                      (2048, "decode_gemm")]:
        spallm_ext.lut_linear(randn(m, 1024, dtype=torch.bfloat16, device="cuda"), codes, lut)
        assert kernels.last_cuda_plan().startswith(expect), (m, kernels.last_cuda_plan())
    # fp32 activations: no tensor-core path; small M runs the exact kernel
    spallm_ext.lut_linear(randn(2, 1024, device="cuda"), codes, lut)
    assert kernels.last_cuda_plan().startswith("simple")
    spallm_ext.lut_linear(randn(64, 1024, device="cuda"), codes, lut)
    assert kernels.last_cuda_plan().startswith("decode_gemm")
    for m, expect in [(1, "mma "), (200, "mma "), (4096, "decode_gemm")]:
        spallm_ext.lut_linear_dx(randn(m, 512, dtype=torch.bfloat16, device="cuda"), codes, lut)
        assert kernels.last_cuda_plan().startswith(expect), (m, kernels.last_cuda_plan())


def test_mma_rejects_what_it_cannot_run_and_falls_back():
    # in_features % 64 != 0, then a group size that is not a multiple of 64, then misaligned x:
    # a forced mma must fall back (with the reason) and still give the right answer.
    cases = [(96, 1, 0), (256, 8, 0), (256, 1, 1)]
    for k, groups, offset in cases:
        codes, lut = make_sketch(64, k, 4, groups, device="cuda", seed=k)
        base = randn(4 * k + offset, dtype=torch.bfloat16, device="cuda")
        x = base[offset:].view(4, k)
        y, plan = _run("mma", x, codes, lut)
        assert not plan.startswith("mma"), plan
        assert "mma needs" in plan
        assert_close_rel(y, reference.lut_linear(x, codes, lut))


@pytest.mark.parametrize("path", MMA_PATHS)
def test_split_k_is_used_and_deterministic(path):
    codes, lut = make_sketch(128, 8192, 4, 4, device="cuda", seed=7)
    x = randn(1, 8192, dtype=torch.bfloat16, device="cuda", seed=8)
    bias = randn(128, dtype=torch.bfloat16, device="cuda", seed=9)
    a, plan = _run(path, x, codes, lut, bias)
    assert plan.startswith(path + " "), plan
    assert "splits=" in plan and int(plan.split("splits=")[1].split()[0]) > 1, plan
    b, _ = _run(path, x, codes, lut, bias)
    assert torch.equal(a, b)
    _check_elementwise(a, x, codes, lut, bias, torch.bfloat16)


@pytest.mark.parametrize("path", MMA_PATHS)
def test_mma_under_cuda_graph(path):
    codes, lut = make_sketch(384, 2048, 4, 4, device="cuda", seed=1)
    x = randn(4, 2048, dtype=torch.bfloat16, device="cuda", seed=2)
    with kernels.use_cuda_kernel(path):
        eager = spallm_ext.lut_linear(x, codes, lut)
        assert kernels.last_cuda_plan().startswith(path + " ")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            spallm_ext.lut_linear(x, codes, lut)  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = spallm_ext.lut_linear(x, codes, lut)
        x.copy_(randn(4, 2048, dtype=torch.bfloat16, device="cuda", seed=3))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, spallm_ext.lut_linear(x, codes, lut))
    assert not torch.equal(out, eager)


def test_mma_many_tiles_partial_edges():
    # 32 row tiles x 4 token tiles of 128, the last one partial: the epilogue's edge masks on both
    # axes and offsets past one tile in each direction.
    codes, lut = make_sketch(4100, 256, 4, 1, device="cuda", seed=11)
    x = randn(500, 256, dtype=torch.bfloat16, device="cuda", seed=12)
    y, plan = _run("mma", x, codes, lut)
    assert plan.startswith("mma block_m=128"), plan
    _check_elementwise(y, x, codes, lut, None, torch.bfloat16)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("act_dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m,n,k,groups", [(1, 128, 64, 1), (33, 200, 512, 4), (1000, 136, 1024, 2),
                                          (77, 1000, 256, 4)])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_grad_mma_matches_reference(bits, act_dtype, m, n, k, groups, deterministic):
    codes, _ = make_sketch(n, k, bits, groups, device="cuda", seed=bits + n)
    x = randn(m, k, dtype=act_dtype, device="cuda", seed=1)
    dy = randn(m, n, dtype=act_dtype, device="cuda", seed=2)
    got = spallm_ext.lut_grad(dy, x, codes, groups, 1 << bits, deterministic=deterministic)
    assert kernels.last_cuda_plan().startswith("mma"), kernels.last_cuda_plan()
    assert_close_rel(got, reference.lut_grad(dy, x, codes, groups, 1 << bits), torch.float32, factor=2)
    again = spallm_ext.lut_grad(dy, x, codes, groups, 1 << bits, deterministic=deterministic)
    if deterministic:
        assert torch.equal(got, again)


def test_grad_mma_follows_torch_deterministic_switch():
    codes, lut = make_sketch(256, 1024, 4, 4, device="cuda", seed=3)
    lut.requires_grad_(True)
    # 500 tokens: the forward stays on the mma path (cuBLAS would need CUBLAS_WORKSPACE_CONFIG
    # under torch's deterministic mode), the backward is lut_grad's.
    x = randn(500, 1024, dtype=torch.bfloat16, device="cuda", seed=4)
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            lut.grad = None
            spallm_ext.lut_linear(x, codes, lut).float().square().sum().backward()
            grads.append(lut.grad.clone())
        assert torch.equal(grads[0], grads[1])
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("n,k,groups", [(130, 256, 1), (128, 96, 1), (128, 256, 8)])
def test_grad_falls_back_where_mma_cannot_run(n, k, groups):
    codes, _ = make_sketch(n, k, 4, groups, device="cuda", seed=n)
    x = randn(20, k, dtype=torch.bfloat16, device="cuda", seed=1)
    dy = randn(20, n, dtype=torch.bfloat16, device="cuda", seed=2)
    got = spallm_ext.lut_grad(dy, x, codes, groups, 16)
    assert kernels.last_cuda_plan().startswith("simple"), kernels.last_cuda_plan()
    assert_close_rel(got, reference.lut_grad(dy, x, codes, groups, 16), torch.float32, factor=2)


def _lowrank_plan_parts(plan: str) -> dict:
    return dict(part.split("=", 1) for part in plan.split(" (")[0].split()[1:])


def _check_lowrank(y, x, codes, lut, l1, l2, bias, act_dtype, fused: bool) -> None:
    branch = x.double() @ l1.double() @ l2.double()
    ref = reference.lut_linear(x.double(), codes, lut.double(), None if bias is None else bias.double()) + branch
    assert_close_rel(y, ref.to(act_dtype))
    if fused:
        # one rounding of y, W rounded to the activation dtype (and on chip l1 too, ~2^-9 of the
        # branch): elementwise close to the rounded-W reference plus branch
        ref_w = reference.lut_linear(x.double(), codes, lut.to(act_dtype).double(),
                                     None if bias is None else bias.double()) + branch
        err = (y.double() - ref_w).abs().max().item()
        assert err <= 2.0 ** -7 * (ref_w.abs().max().item() + 1e-6), err


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("act_dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m,n,k,rank", [(1, 200, 1024, 16), (9, 256, 512, 32), (300, 136, 256, 64),
                                        (2000, 128, 256, 8), (40, 200, 512, 100), (16, 1000, 512, 130)])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("t_mode", kernels.LOWRANK_T_MODES)
def test_lowrank_fused_matches_reference(bits, act_dtype, m, n, k, rank, with_bias, t_mode):
    codes, lut = make_sketch(n, k, bits, 4, device="cuda", seed=bits + m)
    x = randn(m, k, dtype=act_dtype, device="cuda", seed=1)
    l1 = randn(k, rank, device="cuda", seed=2) * 0.05
    l2 = randn(rank, n, device="cuda", seed=3) * 0.05
    bias = randn(n, dtype=act_dtype, device="cuda", seed=4) if with_bias else None
    with kernels.use_lowrank_t(t_mode):
        y = spallm_ext.lut_linear_lowrank(x, codes, lut, l1, l2, bias)
        plan = kernels.last_cuda_plan()
    assert plan.startswith("mma" if m <= 512 else "decode_gemm"), plan
    if m <= 512:
        parts = _lowrank_plan_parts(plan)
        on_chip = t_mode == "auto" and int(parts["splits"]) > 1 and int(parts["block_m"]) <= 64
        assert parts["t"] == ("on-chip" if on_chip else "gemm"), plan
    _check_lowrank(y, x, codes, lut, l1, l2, bias, act_dtype, fused=m <= 512)


# t = x l1 on chip in both decodes' kernels, every token tile that carries t blocks (16, 32, 64),
# l1 in each dtype and strided (a column slice of a wider matrix, and a transposed view), ranks
# that leave the last 64-row t block and the reduction's 32-rank chunks ragged.
@pytest.mark.parametrize("path,m", [("mma_regs", 1), ("mma_regs", 20), ("mma_regs_direct", 2), ("mma", 3), ("mma", 30),
                                    ("mma", 50)])
@pytest.mark.parametrize("l1_layout", ["contiguous", "column_slice", "transposed"])
@pytest.mark.parametrize("lr_dtype", (torch.float32, torch.bfloat16, torch.float16), ids=dtype_id)
@pytest.mark.parametrize("rank", [1, 33, 70])
def test_lowrank_t_on_chip(path, m, l1_layout, lr_dtype, rank):
    n, k, bits = 300, 1024, 4
    codes, lut = make_sketch(n, k, bits, 8, device="cuda", seed=rank + m)
    x = randn(m, k, dtype=torch.bfloat16, device="cuda", seed=5)
    # scaled and cast before the view is taken: an elementwise op on a column slice returns a
    # contiguous tensor, which would test the contiguous layout again
    if l1_layout == "contiguous":
        l1 = (randn(k, rank, device="cuda", seed=6) * 0.05).to(lr_dtype)
    elif l1_layout == "column_slice":
        l1 = (randn(k, rank + 5, device="cuda", seed=6) * 0.05).to(lr_dtype)[:, 2:rank + 2]
        assert l1.stride() == (rank + 5, 1)
    else:
        l1 = (randn(rank, k, device="cuda", seed=6) * 0.05).to(lr_dtype).t()
        assert l1.stride() == (1, k)
    l2 = (randn(rank, n, device="cuda", seed=7) * 0.05).to(lr_dtype)
    bias = randn(n, dtype=torch.bfloat16, device="cuda", seed=8)
    with kernels.use_cuda_kernel(path):
        y = spallm_ext.lut_linear_lowrank(x, codes, lut, l1, l2, bias)
        plan = kernels.last_cuda_plan()
        with kernels.use_lowrank_t("gemm"):
            y_gemm = spallm_ext.lut_linear_lowrank(x, codes, lut, l1, l2, bias)
    assert plan.startswith(path + " ") and "t=on-chip" in plan, plan
    _check_lowrank(y, x, codes, lut, l1, l2, bias, torch.bfloat16, fused=True)
    assert_close_rel(y.float(), y_gemm.float(), torch.bfloat16, factor=2)


def test_lowrank_t_mode_switch_is_checked():
    with pytest.raises(ValueError, match="mode"):
        kernels.set_lowrank_t("sometimes")
    assert kernels.lowrank_t() == "auto"


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("m,adapters", [(64, 16), (5, 8), (300, 3), (1, 4), (700, 64), (40, 2)])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("path", ("auto",) + MMA_PATHS)
def test_multi_adapter_single_launch(bits, m, adapters, with_bias, path):
    n, k, groups = 200, 512, 4
    codes, lut = make_sketch(n, k, bits, groups, device="cuda", seed=bits)
    stack = torch.stack([lut + 0.1 * randn(*lut.shape, device="cuda", seed=a) for a in range(adapters)])
    # adapters unused by any token (index skips the last one) and an uneven split; 700 tokens over
    # 64 adapters puts segments longer and shorter than a token tile side by side
    index = (torch.arange(m, device="cuda") * 7) % max(1, adapters - 1)
    x = randn(m, k, dtype=torch.bfloat16, device="cuda", seed=5)
    bias = randn(n, dtype=torch.bfloat16, device="cuda", seed=6) if with_bias else None
    with kernels.use_cuda_kernel(path):
        y = spallm_ext.lut_linear(x, codes, stack, bias, index)
    # one launch for every adapter, not the per-adapter calls (whose plans also start with mma)
    plan = kernels.last_cuda_plan()
    assert plan.startswith("mma") and "adapters=one-launch" in plan, plan
    for a in index.unique().tolist():
        rows = (index == a).nonzero().flatten()
        _check_elementwise(y[rows], x[rows], codes, stack[a], bias, torch.bfloat16)
    with kernels.use_cuda_kernel("simple"):
        y_simple = spallm_ext.lut_linear(x, codes, stack, bias, index)
    assert_close_rel(y.float(), y_simple.float(), torch.bfloat16, factor=2)


def test_multi_adapter_bad_index_still_errors_clearly():
    codes, lut = make_sketch(128, 256, 4, 1, device="cuda")
    stack = lut.unsqueeze(0).repeat(3, 1, 1, 1)
    x = randn(4, 256, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="adapter_index"):
        spallm_ext.lut_linear(x, codes, stack, None, torch.tensor([0, 1, 3, 0], device="cuda"))
    with pytest.raises(ValueError, match="adapter_index"):
        spallm_ext.lut_linear(x, codes, stack, None, torch.tensor([0, 1], device="cuda"))


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("act_dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("lut_dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
@pytest.mark.parametrize("m,n,k,groups", [(1, 200, 1024, 4), (16, 64, 128, 2), (45, 1000, 256, 1),
                                          (300, 136, 512, 8), (7, 8, 4096, 64),
                                          # in_features an odd multiple of 64 (SmolLM2's 576): the last
                                          # 128-column block is half outside W
                                          (5, 200, 576, 9), (40, 136, 192, 3), (300, 64, 320, 1)])
def test_dx_mma_matches_reference(bits, act_dtype, lut_dtype, m, n, k, groups):
    codes, lut = make_sketch(n, k, bits, groups, lut_dtype=lut_dtype, device="cuda", seed=bits + n)
    dy = randn(m, n, dtype=act_dtype, device="cuda", seed=3)
    with kernels.use_cuda_kernel("mma"):
        dx = spallm_ext.lut_linear_dx(dy, codes, lut)
        plan = kernels.last_cuda_plan()
    assert plan.startswith("mma"), plan
    assert_close_rel(dx, reference.lut_linear_dx(dy, codes, lut))
    ref_w = reference.lut_linear_dx(dy.double(), codes, lut.to(act_dtype).double())
    err = (dx.double() - ref_w).abs().max().item()
    assert err <= 2.0 ** -7 * (ref_w.abs().max().item() + 1e-6), err


def test_dx_mma_split_is_deterministic():
    codes, lut = make_sketch(8192, 256, 4, 4, device="cuda", seed=5)
    dy = randn(2, 8192, dtype=torch.bfloat16, device="cuda", seed=6)
    a = spallm_ext.lut_linear_dx(dy, codes, lut)
    plan = kernels.last_cuda_plan()
    assert plan.startswith("mma") and int(plan.split("splits=")[1].split()[0]) > 1, plan
    assert torch.equal(a, spallm_ext.lut_linear_dx(dy, codes, lut))
    assert_close_rel(a, reference.lut_linear_dx(dy, codes, lut))


def _misaligned(m: int, k: int, seed: int) -> torch.Tensor:
    """A contiguous bf16 [m, k] view that starts 6 bytes into its buffer (not 16-byte aligned)."""
    buf = randn(m * k + 3, dtype=torch.bfloat16, device="cuda", seed=seed)
    t = buf[3:].view(m, k)
    assert t.is_contiguous() and t.data_ptr() % 16 != 0
    return t


@pytest.mark.parametrize("m", [4, 40])
def test_misaligned_activations_keep_the_tensor_core_kernels(m):
    # A contiguous view at an odd offset is copied once to an aligned buffer rather than sending
    # the call to the slow paths (the kernels' 16-byte loads need the alignment).
    n, k = 256, 512
    codes, lut = make_sketch(n, k, 4, 4, device="cuda", seed=m)
    x, dy = _misaligned(m, k, 1), _misaligned(m, n, 2)
    y = spallm_ext.lut_linear(x, codes, lut)
    assert kernels.last_cuda_plan().startswith("mma"), kernels.last_cuda_plan()
    _check_elementwise(y, x, codes, lut, None, torch.bfloat16)
    dx = spallm_ext.lut_linear_dx(dy, codes, lut)
    assert kernels.last_cuda_plan().startswith("mma"), kernels.last_cuda_plan()
    assert_close_rel(dx, reference.lut_linear_dx(dy, codes, lut))
    g = spallm_ext.lut_grad(dy, x, codes, 4, 16)
    assert kernels.last_cuda_plan().startswith("mma"), kernels.last_cuda_plan()
    assert_close_rel(g, reference.lut_grad(dy, x, codes, 4, 16), torch.float32, factor=2)
    l1, l2 = randn(k, 8, device="cuda", seed=3) * 0.05, randn(8, n, device="cuda", seed=4) * 0.05
    yl = spallm_ext.lut_linear_lowrank(x, codes, lut, l1, l2)
    assert kernels.last_cuda_plan().startswith("mma"), kernels.last_cuda_plan()
    assert_close_rel(yl, reference.lut_linear_lowrank(x, codes, lut, l1, l2))

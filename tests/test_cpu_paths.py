"""The CPU paths (csrc/cpu/lut_ops_cpu.cpp): "portable" (scalar decode + BLAS), "avx2" (vector
decode; a fused in-register pass up to 16 tokens), "avx512" (the same, 16 codes per step, fused
up to 4096 tokens) and "bf16" (as "auto", plus bf16 tiles for bf16 models), each against the
reference, against each other, and the choice itself. "avx2" and "bf16" run wherever the CPU has
AVX2 (CI's x86 machines do), "avx512" where it has AVX-512F; elsewhere the tests check that asking
for them fails clearly and that the next path down is used."""
from __future__ import annotations

import pytest
import torch

import spallm_ext
from spallm_ext import kernels, reference

from conftest import ALL_BITS, assert_close_rel, make_sketch, randn

HAS_AVX2 = "avx2" in kernels.cpu_kernels()
HAS_AVX512 = "avx512" in kernels.cpu_kernels()
HAS_AVX512BF16 = "avx512bf16" in kernels.cpu_kernels()
# "portable", and "avx2", "avx512", "bf16", "avx512bf16" where this CPU has them
PATHS = kernels.cpu_kernels()[1:]
# Whether "auto" takes the bf16 tiles: native bf16 dot products and torch's bf16 matmul on oneDNN.
AUTO_BF16 = (bool(spallm_ext.build_info()["cpu_bf16"]) and torch.backends.mkldnn.is_available()
             and torch.backends.mkldnn.enabled)

# (bits, groups, in_features): group sizes 8, 16, 64, 256 (vector chunks never straddle a group)
VECTOR_SHAPES = [(4, 1, 8), (4, 4, 64), (4, 2, 512), (3, 1, 8), (3, 8, 128), (3, 1, 256),
                 (2, 2, 16), (2, 4, 256), (2, 1, 64)]
# every token count of the fused pass's blocking (AVX2: 4-token blocks plus a 1-3 token tail; AVX-512:
# 8-token blocks plus 1-7, several blocks over each 32-row chunk) and past AVX2's limit of 16 tokens
# (AVX-512's, 4096, has its own test)
TOKENS = [1, 2, 3, 4, 5, 6, 7, 8, 13, 16, 17, 40, 64, 65]
GEMV_MAX_TOKENS = {"avx2": 16, "avx512": 4096}
BF16_GEMV_MAX_TOKENS = 32
BF16_GEMV_MIN_TOKENS = 1


@pytest.fixture(autouse=True)
def _restore_cpu_kernel():
    before = kernels.cpu_kernel()
    yield
    kernels.set_cpu_kernel(before)


def vector_isa(path: str, group_size: int) -> str | None:
    """The vector kernels a path runs for this group size: the widest the CPU has that fits it."""
    if path == "portable" or not HAS_AVX2 or group_size % 8:
        return None
    return "avx512" if HAS_AVX512 and path != "avx2" and group_size % 16 == 0 else "avx2"


def expected_plan(path: str, m: int, group_size: int, acc: torch.dtype, x_dtype: torch.dtype = torch.float32,
                  forward: bool = True, bf16_gemv_min: int = BF16_GEMV_MIN_TOKENS) -> str:
    """The plan of lut_linear (forward) / lut_linear_dx with m tokens whose activations (x, or dy)
    are x_dtype."""
    isa = vector_isa(path, group_size)
    if isa is None or acc != torch.float32:
        return "portable_tiles"
    bf16_dot = path == "avx512bf16" or (path == "auto" and HAS_AVX512BF16)
    if forward and bf16_dot and x_dtype == torch.bfloat16 and bf16_gemv_min <= m <= BF16_GEMV_MAX_TOKENS and \
            group_size % 32 == 0:
        return "avx512bf16_gemv"
    bf16_tiles = path == "bf16" or (path == "auto" and AUTO_BF16)
    if bf16_tiles and m >= (16 if isa == "avx512" else 8) and x_dtype == torch.bfloat16:
        return "bf16_tiles"
    return f"{isa}_gemv" if m <= GEMV_MAX_TOKENS[isa] else f"{isa}_tiles"


def lut_as_run(lut: torch.Tensor, plan: str) -> torch.Tensor:
    """The LUT whose W a call multiplied: the bf16 tiles and the bf16 dot-product pass round an fp32 /
    fp16 LUT to bf16 (as the CUDA tensor-core kernels and autocast do); every other path uses its
    values exactly."""
    return lut.bfloat16() if plan in ("bf16_tiles", "avx512bf16_gemv") else lut


def assert_one_bf16_rounding_mm(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                                bias: torch.Tensor | None = None) -> None:
    """y (bf16) is a @ b (+ bias) computed exactly and rounded once to bf16, up to fp32 summation
    order: within half a bf16 ulp of the fp64 result plus a small multiple of fp32 rounding of the
    terms. A second rounding, a wrong W or a wrong tile exceeds it."""
    assert y.dtype == torch.bfloat16
    exact = a.double() @ b.double() + (0 if bias is None else bias.double())
    terms = a.double().abs() @ b.double().abs() + (0 if bias is None else bias.double().abs())
    bound = 2.0**-8 * exact.abs() + 2.0**-18 * terms
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3e}"


def assert_one_bf16_rounding(y: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, lut: torch.Tensor,
                             bias: torch.Tensor | None = None) -> None:
    """y = x W^T (+ bias) with W decoded from (codes, lut), rounded once to bf16."""
    assert_one_bf16_rounding_mm(y, x, reference.lut_decode(codes, lut).T, bias)


def test_path_names_and_errors():
    assert kernels.cpu_kernels()[:2] == ("auto", "portable")
    assert kernels.cpu_kernel() == "auto"
    with kernels.use_cpu_kernel("portable"):
        assert kernels.cpu_kernel() == "portable"
    assert kernels.cpu_kernel() == "auto"
    with pytest.raises(ValueError, match="kernel must be one of"):
        kernels.set_cpu_kernel("sse9")
    with pytest.raises(ValueError, match="kernel must be one of"):
        kernels.set_cpu_kernel(4)
    if HAS_AVX2:
        assert kernels.cpu_kernels() == (("auto", "portable", "avx2") + (("avx512",) if HAS_AVX512 else ()) + ("bf16",)
                                         + (("avx512bf16",) if HAS_AVX512BF16 else ()))
        for name in kernels.cpu_kernels():
            kernels.set_cpu_kernel(name)
            assert kernels.cpu_kernel() == name
        assert spallm_ext.build_info()["cpu_simd"] == ("avx512" if HAS_AVX512 else "avx2+fma")
    else:
        assert kernels.cpu_kernels() == ("auto", "portable")
        for name in ("avx2", "avx512", "bf16"):
            with pytest.raises(ValueError, match="not available on this CPU"):
                kernels.set_cpu_kernel(name)
        assert kernels.cpu_kernel() == "auto"
        assert spallm_ext.build_info()["cpu_simd"] == "none"
    if HAS_AVX2 and not HAS_AVX512:
        with pytest.raises(ValueError, match="not available on this CPU"):
            kernels.set_cpu_kernel("avx512")
        assert spallm_ext.build_info()["cpu_bf16"] is False


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's mkldnn.flags, not ours
def test_auto_is_the_best_path_this_cpu_has():
    best = "avx512" if HAS_AVX512 else "avx2" if HAS_AVX2 else None
    gemv = f"{best}_gemv" if best else "portable_tiles"
    codes, lut = make_sketch(8, 64, 4, 2)  # groups of 32 columns: the widest kernels take them
    spallm_ext.lut_linear(randn(3, 64), codes, lut)
    assert kernels.last_cpu_plan() == gemv
    # Groups of 8 columns are too narrow for AVX-512: AVX2 takes them.
    codes8, lut8 = make_sketch(8, 64, 4, 8)
    spallm_ext.lut_linear(randn(3, 64), codes8, lut8)
    assert kernels.last_cpu_plan() == ("avx2_gemv" if HAS_AVX2 else "portable_tiles")
    # A bf16 model: where this CPU multiplies bf16 natively, the bf16 dot-product pass up to 32
    # tokens (AVX512-BF16), then bf16 tiles (from 8 tokens beside AVX2, 16 beside AVX-512 without
    # the dot products).
    lut16 = lut.bfloat16()
    first = BF16_GEMV_MAX_TOKENS + 1 if HAS_AVX512BF16 else 16 if HAS_AVX512 else 8
    small = "avx512bf16_gemv" if HAS_AVX512BF16 else gemv
    spallm_ext.lut_linear(randn(first - 1, 64, dtype=torch.bfloat16), codes, lut16)
    assert kernels.last_cpu_plan() == small
    spallm_ext.lut_linear(randn(first, 64, dtype=torch.bfloat16), codes, lut16)
    assert kernels.last_cpu_plan() == expected_plan("auto", first, 32, torch.float32, torch.bfloat16)
    assert kernels.last_cpu_plan() == ("bf16_tiles" if AUTO_BF16 and HAS_AVX2 else gemv)
    # ... and never when torch's bf16 matmul does not run on oneDNN.
    with torch.backends.mkldnn.flags(enabled=False):
        spallm_ext.lut_linear(randn(first, 64, dtype=torch.bfloat16), codes, lut16)
    assert kernels.last_cpu_plan() == gemv


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits,groups,k", VECTOR_SHAPES, ids=[f"b{b}-g{g}-k{k}" for b, g, k in VECTOR_SHAPES])
@pytest.mark.parametrize("m", TOKENS, ids=[f"m{m}" for m in TOKENS])
def test_lut_linear_matches_reference(path, bits, groups, k, m):
    n = 13
    codes, lut = make_sketch(n, k, bits, groups, seed=bits * 1000 + k + m)
    x, bias = randn(m, k, seed=m), randn(n, seed=m + 1)
    kernels.set_cpu_kernel(path)
    y = spallm_ext.lut_linear(x, codes, lut, bias)
    assert kernels.last_cpu_plan() == expected_plan(path, m, k // groups, torch.float32)
    assert_close_rel(y, reference.lut_linear(x, codes, lut, bias))
    dy = randn(m, n, seed=m + 2)
    dx = spallm_ext.lut_linear_dx(dy, codes, lut)
    assert kernels.last_cpu_plan() == f"{vector_isa(path, k // groups) or 'portable'}_tiles"
    assert_close_rel(dx, reference.lut_linear_dx(dy, codes, lut))
    # Decoding is a table lookup: both paths must give the reference's weights bit for bit.
    assert torch.equal(spallm_ext.lut_decode(codes, lut), reference.lut_decode(codes, lut))


@pytest.mark.skipif(not HAS_AVX512, reason="the AVX-512 pass's limit; AVX2's (16 tokens) is in TOKENS")
@pytest.mark.parametrize("m", [40, 4096, 4097], ids=lambda m: f"m{m}")
def test_avx512_pass_row_chunks_and_token_limit(m):
    """70 rows: two 32-row chunks and a 6-row one (two-row groups), each passed over by every
    8-token block; up to 4096 tokens the fused pass runs, one more takes the tiles."""
    n, k = 70, 64
    codes, lut = make_sketch(n, k, 4, 2, seed=m)
    x, bias = randn(m, k, seed=m + 1), randn(n, seed=m + 2)
    kernels.set_cpu_kernel("avx512")
    y = spallm_ext.lut_linear(x, codes, lut, bias)
    assert kernels.last_cpu_plan() == expected_plan("avx512", m, k // 2, torch.float32)
    assert kernels.last_cpu_plan() == ("avx512_gemv" if m <= 4096 else "avx512_tiles")
    assert_close_rel(y, reference.lut_linear(x, codes, lut, bias))


# The bf16 dot-product pass (AVX512-BF16): group sizes 32 (one step per group), 64 and 256, every
# token count of its 8-token blocks and tails up to its limit and one past it, 13 rows (the
# two-row blocks and a single-row tail), every bit width, LUT in fp32 (rounded to bf16 once) and bf16.
BF16_DOT_SHAPES = [(4, 2, 64), (4, 1, 64), (3, 4, 256), (3, 1, 256), (2, 8, 256), (2, 1, 32)]


@pytest.mark.parametrize("bits,groups,k", BF16_DOT_SHAPES, ids=[f"b{b}-g{g}-k{k}" for b, g, k in BF16_DOT_SHAPES])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 9, 15, 16, 20, 32, 33], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("lut_dtype", [torch.float32, torch.bfloat16], ids=["lut32", "lut16b"])
def test_bf16_dot_pass(bits, groups, k, m, lut_dtype):
    n = 13
    codes, lut = make_sketch(n, k, bits, groups, lut_dtype=lut_dtype, seed=bits * 100 + k + m)
    x, bias = randn(m, k, dtype=torch.bfloat16, seed=m), randn(n, dtype=torch.bfloat16, seed=m + 1)
    path = "avx512bf16" if HAS_AVX512BF16 else PATHS[-1]
    kernels.set_cpu_kernel(path)
    # Every token count the dot products can be tuned to take, single tokens included.
    with kernels.use_dispatch_thresholds("cpu", bf16_gemv_min_tokens=1):
        y = spallm_ext.lut_linear(x, codes, lut, bias)
        plan = expected_plan(path, m, k // groups, torch.float32, torch.bfloat16, bf16_gemv_min=1)
        assert kernels.last_cpu_plan() == plan
    assert plan == "avx512bf16_gemv" or not HAS_AVX512BF16 or m > BF16_GEMV_MAX_TOKENS
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert_one_bf16_rounding(y, x, codes, lut_as_run(lut, plan), bias)
    # the same sums as the fp32 pass on the rounded LUT, up to fp32 summation order
    with kernels.use_cpu_kernel("portable"):
        y32 = spallm_ext.lut_linear(x.float(), codes, lut_as_run(lut, plan).float(), bias.float())
    assert_close_rel(y.float(), y32.bfloat16().float(), torch.bfloat16)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("lut_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["lut32", "lut16b", "lut16"])
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("m", [5, 9], ids=["m5", "m9"])
def test_dtypes(path, act_dtype, lut_dtype, bits, m):
    codes, lut = make_sketch(24, 128, bits, 2, lut_dtype=lut_dtype, seed=bits)
    x = randn(m, 128, dtype=act_dtype, seed=3)
    kernels.set_cpu_kernel(path)
    y = spallm_ext.lut_linear(x, codes, lut)
    acc = torch.float64 if act_dtype == torch.float64 else torch.float32
    plan = expected_plan(path, m, 64, acc, act_dtype)
    assert kernels.last_cpu_plan() == plan
    assert_close_rel(y, reference.lut_linear(x, codes, lut))
    if act_dtype == torch.bfloat16:
        assert_one_bf16_rounding(y, x, codes, lut_as_run(lut, plan))
    assert torch.equal(spallm_ext.lut_decode(codes, lut), reference.lut_decode(codes, lut))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["zeros", "max", "alternating", "equal"])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_adversarial_codes(path, mode, bits):
    # "max" reads only the top table entry (for 4 bits: the upper register and the blend).
    codes, lut = make_sketch(9, 64, bits, 1, mode=mode, seed=bits)
    x = randn(2, 64, seed=1)
    kernels.set_cpu_kernel(path)
    assert_close_rel(spallm_ext.lut_linear(x, codes, lut), reference.lut_linear(x, codes, lut))
    assert torch.equal(spallm_ext.lut_decode(codes, lut), reference.lut_decode(codes, lut))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_paths_agree_and_repeat_bit_for_bit(bits):
    codes, lut = make_sketch(300, 512, bits, 4, seed=bits)
    x = randn(6, 512, seed=2)
    outs = {}
    for path in PATHS:
        kernels.set_cpu_kernel(path)
        outs[path] = spallm_ext.lut_linear(x, codes, lut)
        assert torch.equal(outs[path], spallm_ext.lut_linear(x, codes, lut)), f"{path}: not repeatable"
    assert_close_rel(outs[PATHS[-1]], outs["portable"].double().float(), factor=1.0)
    # Each (token, row) sums in a fixed order whatever the thread count.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = spallm_ext.lut_linear(x, codes, lut)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, outs[PATHS[-1]])


def test_multi_adapter_and_lowrank_take_the_same_paths():
    codes, lut = make_sketch(16, 64, 4, 2, seed=5)
    stack = torch.stack([lut, lut * 2, -lut])
    x, index = randn(7, 64, seed=6), torch.tensor([0, 2, 1, 1, 0, 2, 2])
    l1, l2 = randn(64, 3, seed=7), randn(3, 16, seed=8)
    for path in PATHS:
        kernels.set_cpu_kernel(path)
        y = spallm_ext.lut_linear(x, codes, stack, adapter_index=index)
        assert_close_rel(y, reference.lut_linear(x, codes, stack, adapter_index=index))
        y = torch.ops.spallm.lut_linear_lowrank(x, codes, lut, l1, l2)
        assert_close_rel(y, reference.lut_linear_lowrank(x, codes, lut, l1, l2))


def test_sketched_linear_forward_and_backward_on_both_paths():
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 24)
    layer = spallm_ext.SketchedLinear.from_linear(dense, bits=4, groups_per_row=2)
    x = torch.randn(3, 64)
    grads = {}
    for path in PATHS:
        kernels.set_cpu_kernel(path)
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        y = layer(xx)
        y.square().sum().backward()
        grads[path] = (y.detach(), xx.grad, layer.lut.grad.clone())
    for a, b in zip(grads["portable"], grads[PATHS[-1]]):
        assert_close_rel(b, a)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("m", [1, 6, 20], ids=["m1", "m6", "m20"])
def test_non_finite_lut_entries(path, bits, m):
    """An Inf that row 3 uses makes column 3 non-finite and nothing else; a NaN in an entry no code
    refers to changes nothing (the vector lookup never does arithmetic on unselected entries)."""
    n, k, groups = 6, 64, 2
    codes_int = torch.randint(0, (1 << bits) - 1, (n, k), generator=torch.Generator().manual_seed(bits))
    codes = spallm_ext.pack_codes(codes_int, bits)  # never uses the last entry
    lut = randn(n, groups, 1 << bits, seed=1)
    x = randn(m, k, seed=2).abs() + 0.5  # positive: Inf * x stays Inf
    kernels.set_cpu_kernel(path)
    clean = spallm_ext.lut_linear(x, codes, lut)
    lut_nan = lut.clone()
    lut_nan[:, :, -1] = float("nan")
    assert torch.equal(spallm_ext.lut_linear(x, codes, lut_nan), clean)
    lut_inf = lut.clone()
    lut_inf[3, 1, int(codes_int[3, k - 1])] = float("inf")
    y = spallm_ext.lut_linear(x, codes, lut_inf)
    assert torch.isinf(y[:, 3]).all()
    others = [i for i in range(n) if i != 3]
    assert torch.equal(y[:, others], clean[:, others])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lut_dtype", [torch.float32, torch.bfloat16], ids=["lut32", "lut16b"])
def test_several_row_tiles(path, dtype, lut_dtype):
    """300 x 4096 is two row tiles of the decode (2^20 weights each): every tile must decode its own
    codes and LUT rows and add its own part of the bias. The bf16 lut_linear_dx splits W into
    column slabs instead (3488 + 608 columns here, the first ending inside a 1024-column group):
    each slab must decode its own columns and groups. lut_grad reduces dW in row tiles again."""
    codes, lut = make_sketch(300, 4096, 4, 4, lut_dtype=lut_dtype, seed=11)
    x, dy, bias = randn(20, 4096, dtype=dtype, seed=12), randn(20, 300, dtype=dtype, seed=13), randn(300, dtype=dtype, seed=14)
    kernels.set_cpu_kernel(path)
    y = spallm_ext.lut_linear(x, codes, lut, bias)
    plan = expected_plan(path, 20, 1024, torch.float32, dtype)
    assert kernels.last_cpu_plan() == plan
    assert_close_rel(y, reference.lut_linear(x, codes, lut, bias))
    if dtype == torch.bfloat16:
        assert_one_bf16_rounding(y, x, codes, lut_as_run(lut, plan), bias)
    dx = spallm_ext.lut_linear_dx(dy, codes, lut)
    dx_plan = expected_plan(path, 20, 1024, torch.float32, dtype, forward=False)
    assert kernels.last_cpu_plan() == (dx_plan if dx_plan == "bf16_tiles" else dx_plan.replace("_gemv", "_tiles"))
    assert_close_rel(dx, reference.lut_linear_dx(dy, codes, lut))
    if dtype == torch.bfloat16:
        assert_one_bf16_rounding_mm(dx, dy, reference.lut_decode(codes, lut_as_run(lut, dx_plan)))
    # lut_grad: two row tiles of dW (256 + 44 rows), each reduced into its own rows' buckets.
    dlut = spallm_ext.lut_grad(dy, x, codes, 4, 16)
    assert_close_rel(dlut, reference.lut_grad(dy.float(), x.float(), codes, 4, 16), dtype)
    if plan == "bf16_tiles":
        assert_bf16_lut_grad(dlut, dy, x, codes, 4, 4)


def force_bf16_tiles() -> bool:
    """Force the "bf16" path; without AVX2 check that it is refused clearly and say so."""
    if HAS_AVX2:
        kernels.set_cpu_kernel("bf16")
        return True
    with pytest.raises(ValueError, match="not available on this CPU"):
        kernels.set_cpu_kernel("bf16")
    return False


@pytest.mark.parametrize("bits,groups,k", VECTOR_SHAPES, ids=[f"b{b}-g{g}-k{k}" for b, g, k in VECTOR_SHAPES])
@pytest.mark.parametrize("m", [8, 9, 16, 17, 40], ids=["m8", "m9", "m16", "m17", "m40"])
def test_bf16_tiles(bits, groups, k, m):
    """The bf16 tiles (forced, so they run on any AVX2 CPU; from 8 tokens beside the AVX2 kernels,
    16 beside the AVX-512 ones): 3-D input with bias, one rounding, and the bf16 decode bit for bit
    the reference's (the values are the LUT's own)."""
    if not force_bf16_tiles():
        return
    n = 13
    codes, lut = make_sketch(n, k, bits, groups, lut_dtype=torch.bfloat16, seed=bits * 100 + k + m)
    x, bias = randn(1, m, k, dtype=torch.bfloat16, seed=m), randn(n, dtype=torch.bfloat16, seed=m + 1)
    y = spallm_ext.lut_linear(x, codes, lut, bias)
    assert kernels.last_cpu_plan() == expected_plan("bf16", m, k // groups, torch.float32, torch.bfloat16)
    assert y.shape == (1, m, n)
    assert_close_rel(y, reference.lut_linear(x, codes, lut, bias))
    assert_one_bf16_rounding(y[0], x[0], codes, lut, bias)
    assert torch.equal(spallm_ext.lut_decode(codes, lut), reference.lut_decode(codes, lut))
    assert torch.equal(y, spallm_ext.lut_linear(x, codes, lut, bias)), "not repeatable"


@pytest.mark.parametrize("mode", ["zeros", "max", "alternating", "equal"])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_bf16_tiles_adversarial_and_non_finite(mode, bits):
    """Adversarial codes through the bf16 decode, and an Inf / a NaN in the bf16 LUT: the decode
    moves bit patterns, so an Inf stays in its column and an unused NaN changes nothing."""
    if not force_bf16_tiles():
        return
    n, k = 9, 64
    codes, lut = make_sketch(n, k, bits, 1, mode=mode, lut_dtype=torch.bfloat16, seed=bits)
    x = randn(16, k, dtype=torch.bfloat16, seed=1).abs() + 0.5
    clean = spallm_ext.lut_linear(x, codes, lut)
    assert kernels.last_cpu_plan() == "bf16_tiles"
    assert_one_bf16_rounding(clean, x, codes, lut)
    assert torch.equal(spallm_ext.lut_decode(codes, lut), reference.lut_decode(codes, lut))
    used = spallm_ext.unpack_codes(codes, bits)
    lut_bad = lut.clone()
    lut_bad[4, 0, int(used[4, 0])] = float("inf")
    unused = [e for e in range(1 << bits) if not (used == e).any()]
    if unused:
        lut_bad[:, :, unused[0]] = float("nan")
    y = spallm_ext.lut_linear(x, codes, lut_bad)
    assert torch.isinf(y[:, 4]).all()
    others = [i for i in range(n) if i != 4]
    assert torch.equal(y[:, others], clean[:, others])


def assert_bf16_lut_grad(dlut: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, bits: int,
                         groups: int) -> None:
    """dlut (fp32) sums, per (row, group, code), dW = dy^T x with each dW element rounded once to
    bf16 after an fp32 accumulation: within a bf16 half-ulp of each |dW| plus fp32 rounding of the
    terms, summed over the bucket. A missing or wrong tile, a wrong bucket or a bf16 sum exceeds it."""
    n, k = dy.shape[1], x.shape[1]
    e = 1 << bits
    index = (torch.arange(k) // (k // groups) * e).expand(n, k) + spallm_ext.unpack_codes(codes, bits).long()

    def buckets(w: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n, groups * e, dtype=torch.float64).scatter_add_(1, index, w).view(n, groups, e)

    dw = dy.double().T @ x.double()
    exact = buckets(dw)
    bound = buckets(2.0**-8 * dw.abs() + 2.0**-18 * (dy.double().abs().T @ x.double().abs())) + 1e-30
    assert dlut.dtype == torch.float32
    err = (dlut.double() - exact).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3e}"


@pytest.mark.parametrize("bits,groups,k", VECTOR_SHAPES, ids=[f"b{b}-g{g}-k{k}" for b, g, k in VECTOR_SHAPES])
@pytest.mark.parametrize("lut_dtype", [torch.float32, torch.bfloat16], ids=["lut32", "lut16b"])
@pytest.mark.parametrize("m", [7, 16, 40], ids=["m7", "m16", "m40"])
def test_bf16_backward(bits, groups, k, lut_dtype, m):
    """lut_linear_dx and lut_grad with bf16 dy and x on the bf16 path: bf16 GEMMs on W decoded to
    bf16 (an fp32 LUT rounded once) and on bf16 dW tiles, from the same token count as the forward;
    below it fp32 work. dx is one rounding of dy W, dLUT an fp32 sum of once-rounded dW."""
    if not force_bf16_tiles():
        return
    n = 13
    codes, lut = make_sketch(n, k, bits, groups, lut_dtype=lut_dtype, seed=bits * 10 + k + m)
    dy, x = randn(m, n, dtype=torch.bfloat16, seed=m), randn(1, m, k, dtype=torch.bfloat16, seed=m + 1)
    plan = expected_plan("bf16", m, k // groups, torch.float32, torch.bfloat16)
    dx = spallm_ext.lut_linear_dx(dy, codes, lut)
    assert kernels.last_cpu_plan() == (plan if plan == "bf16_tiles" else plan.replace("_gemv", "_tiles"))
    assert dx.dtype == torch.bfloat16 and dx.shape == (m, k)
    assert_one_bf16_rounding_mm(dx, dy, reference.lut_decode(codes, lut_as_run(lut, plan)))
    dlut = spallm_ext.lut_grad(dy, x, codes, groups, 1 << bits)
    assert kernels.last_cpu_plan() == ("bf16_tiles" if plan == "bf16_tiles" else "portable_tiles")
    assert_close_rel(dlut, reference.lut_grad(dy.float(), x[0].float(), codes, groups, 1 << bits), torch.bfloat16)
    if plan == "bf16_tiles":
        assert_bf16_lut_grad(dlut, dy, x[0], codes, bits, groups)
    assert torch.equal(dlut, spallm_ext.lut_grad(dy, x, codes, groups, 1 << bits)), "not repeatable"


def test_autocast_training_step_takes_bf16_tiles():
    """A SketchedLinear with its fp32 master LUT, trained under CPU autocast: forward, dx and dLUT
    all run as bf16 tiles, and the gradients stay within bf16 rounding of the fp32 step's."""
    if not force_bf16_tiles():
        return
    torch.manual_seed(0)
    layer = spallm_ext.SketchedLinear.from_linear(torch.nn.Linear(256, 96), bits=4, groups_per_row=4)
    x = torch.randn(4, 12, 256)
    grads = {}
    for mode in ("fp32", "autocast"):
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            y = layer(xx)
            assert y.dtype == (torch.bfloat16 if mode == "autocast" else torch.float32)
            if mode == "autocast":
                assert kernels.last_cpu_plan() == "bf16_tiles"
        y.float().square().sum().backward()
        if mode == "autocast":
            assert kernels.last_cpu_plan() == "bf16_tiles"  # lut_grad ran last, after lut_linear_dx
        assert layer.lut.grad.dtype == torch.float32 and xx.grad.dtype == torch.float32
        grads[mode] = (y.float(), xx.grad, layer.lut.grad.clone())
    for got, ref in zip(grads["autocast"], grads["fp32"]):
        assert_close_rel(got, ref, torch.bfloat16, factor=4.0)

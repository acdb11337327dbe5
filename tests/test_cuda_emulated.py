"""The CUDA kernels of csrc/cuda/, run on the CPU by the SIMT emulator (tests/simt/simt.h), against
the reference. CPU tests: they need a C++ compiler, not a GPU.

Each case calls an entry point of csrc/cuda/kernels.h with an explicit configuration (decode,
token tile, K split, low-rank branch, adapter segments), so every kernel variant runs, not only the
ones today's dispatch would pick. The emulator executes the kernels' own source with CUDA's
semantics for barriers, warp collectives (mma.sync, ldmatrix, shuffles) and cp.async, under
AddressSanitizer and UBSan; output buffers start as NaN, so an element a kernel never writes fails
the comparison. Cases rotate through thread orders and cp.async completion modes (early / late);
test_schedules_give_identical_results runs some under all of them and wants bit-identical output,
which is what a race or a missing cp.async wait would break.

What this does not check: speed, and the hardware's own behaviour where the emulator models it
(the fragment layouts of mma / ldmatrix follow the PTX ISA; the mma adds in double). Those are
for the GPU runs (test_cuda_kernels.py, compute-sanitizer).
"""
from __future__ import annotations

import pytest
import torch

import simt_cases as simt
from spallm_ext import reference
from conftest import make_sketch, randn

HALF = (torch.bfloat16, torch.float16)
LUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Thread order (forward / reverse / shuffled), warps in lockstep or each running alone to the next
# barrier, and cp.async copies landing at the wait (destination poisoned until then) or at once.
SCHEDULES = ({"order": 0, "late_copies": 1, "warp_serial": 0}, {"order": 1, "late_copies": 0, "warp_serial": 1},
             {"order": 2, "late_copies": 1, "warp_serial": 1, "seed": 7},
             {"order": 2, "late_copies": 0, "warp_serial": 0, "seed": 11},
             {"order": 0, "late_copies": 0, "warp_serial": 1})


def _code(dtype: torch.dtype) -> int:
    return simt.DTYPE_CODE[dtype]


def _problem(codes, m, n, k, groups, bits) -> dict:
    return dict(M=m, N=n, K=k, G=groups, row_bytes=codes.shape[1], bits=bits)


def _run_one(op: str, ints: dict, tensors: dict, schedule: dict) -> dict:
    (out,) = simt.run_cases([(op, {**ints, **schedule}, tensors)])
    assert out["status"] == 0, f"{op} returned cudaError_t {out['status']}"
    return out


def _assert_elementwise(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """One rounding of the output (2^-8 relative for bf16) plus fp32 accumulation: a single
    mis-decoded weight, token or partial moves an element far more than that."""
    assert torch.isfinite(out).all(), f"{what}: non-finite elements (never written, or NaN read)"
    scale = ref.abs().max().item() + 1e-6
    err = (out.double() - ref).abs().max().item()
    assert err <= 2.0 ** -7 * scale, f"{what}: max elementwise error {err:.3e} vs scale {scale:.3e}"


# MmaConfig as the harness reads it: the tile decode, the register decode with its shared-memory
# code ring, and the register decode with codes loaded straight into registers (mma_regs_direct).
DECODES = {"tile": 0, "regs": 1, "direct": 2}


def _forward_case(x, codes, lut, bias, *, bits, groups, block_m, splits, regs, schedule, extra_ints=None,
                  extra=None):
    m, k = x.shape
    n = codes.shape[0]
    ints = dict(_problem(codes, m, n, k, groups, bits), act=_code(x.dtype), lut_type=_code(lut.dtype),
                block_m=block_m, splits=splits, regs=int(regs), **(extra_ints or {}))
    out = _run_one("linear_mma", ints, dict(x=x, codes=codes, lut=lut, bias=bias, **(extra or {})), schedule)
    return simt.as_tensor(out["y"], x.dtype, (m, n)), out


# (decode, token tile, K splits, M, N, K, groups): every decode at every token tile it has, K
# split evenly and unevenly, rows past N (N not a multiple of 128), tokens past the tile, group
# sizes of one K-step (a LUT refill every step) and of several. The direct decode's register ring
# (16-token tiles only) is 4 K-steps deep, its loop unrolled by 4: splits of 1 to 5, 9 and 64
# steps cover a ring never filled, filled exactly, and a partly used last round.
FORWARD_CONFIGS = [
    ("regs", 16, 1, 1, 136, 256, 2),
    ("regs", 16, 2, 16, 128, 192, 3),
    ("regs", 32, 3, 20, 72, 512, 1),
    ("direct", 16, 1, 1, 136, 256, 2),
    ("direct", 16, 2, 16, 128, 192, 3),
    ("direct", 16, 3, 14, 72, 512, 1),
    ("direct", 16, 2, 3, 264, 576, 3),
    ("direct", 16, 1, 9, 130, 576, 1),
    ("tile", 16, 1, 5, 136, 256, 4),
    ("tile", 32, 2, 32, 200, 256, 2),
    ("tile", 64, 1, 50, 136, 192, 3),
    ("tile", 128, 2, 130, 136, 256, 1),
    # the GPU suite's shapes: a long K with a LUT refill every step, many row tiles, many groups
    ("regs", 16, 4, 1, 200, 1024, 4),
    ("regs", 32, 1, 32, 96, 4096, 64),
    ("direct", 16, 4, 1, 200, 1024, 4),
    ("direct", 16, 1, 16, 96, 4096, 64),
    ("tile", 64, 2, 33, 96, 4096, 64),
    ("tile", 128, 1, 130, 256, 192, 3),
]


@pytest.mark.parametrize("decode,block_m", [("regs", 16), ("direct", 16), ("tile", 32)])
@pytest.mark.parametrize("act", HALF, ids=str)
@pytest.mark.parametrize("lut_dtype", LUT_DTYPES, ids=str)
def test_mma_forward_every_dtype_pair(decode, block_m, act, lut_dtype):
    codes, lut = make_sketch(136, 256, 4, 2, lut_dtype=lut_dtype, seed=4)
    x = randn(7, 256, dtype=act, seed=5)
    bias = randn(136, dtype=act, seed=6)
    y, _ = _forward_case(x, codes, lut, bias, bits=4, groups=2, block_m=block_m, splits=1, regs=DECODES[decode],
                         schedule=SCHEDULES[0])
    assert y.dtype == act
    ref = reference.lut_linear(x.double(), codes, lut.to(act).double(), bias.double())
    _assert_elementwise(y, ref, f"{decode} {act} x, {lut_dtype} LUT")


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("config", range(len(FORWARD_CONFIGS)),
                         ids=["-".join(map(str, c)) for c in FORWARD_CONFIGS])
def test_mma_forward_matches_reference(bits, config):
    decode, block_m, splits, m, n, k, groups = FORWARD_CONFIGS[config]
    i = config * 3 + bits
    act = HALF[i % 2]
    lut_dtype = LUT_DTYPES[i % 3]
    codes, lut = make_sketch(n, k, bits, groups, lut_dtype=lut_dtype, seed=i)
    x = randn(m, k, dtype=act, seed=i + 1)
    bias = randn(n, dtype=act, seed=i + 2) if i % 2 else None
    y, out = _forward_case(x, codes, lut, bias, bits=bits, groups=groups, block_m=block_m, splits=splits,
                           regs=DECODES[decode], schedule=SCHEDULES[i % len(SCHEDULES)])
    assert out["launches"] == (2 if splits > 1 else 1)
    # W rounded to the activation dtype, as the tensor-core paths round it
    ref = reference.lut_linear(x.double(), codes, lut.to(act).double(), None if bias is None else bias.double())
    _assert_elementwise(y, ref, f"{decode} block_m={block_m} splits={splits}")


@pytest.mark.parametrize("bits", (3, 4))
@pytest.mark.parametrize("mode", ["zeros", "equal", "alternating", "max"])
@pytest.mark.parametrize("decode", ["regs", "direct", "tile"])
def test_mma_forward_adversarial_codes(bits, mode, decode):
    codes, lut = make_sketch(128, 256, bits, 2, mode=mode, seed=bits)
    x = randn(9, 256, dtype=torch.bfloat16, seed=3)
    y, _ = _forward_case(x, codes, lut, None, bits=bits, groups=2, block_m=16, splits=2, regs=DECODES[decode],
                         schedule=SCHEDULES[bits % 2])
    _assert_elementwise(y, reference.lut_linear(x.double(), codes, lut.to(torch.bfloat16).double()), mode)


# The low-rank branch: t = x l1 precomputed (added in the epilogue without a split, in the low-rank
# reduction with one) or on chip (extra block columns, K split), l1 in each dtype, contiguous or
# transposed, ranks that leave the last 64-row t block and the 32-rank reduction chunks ragged.
LOWRANK_CONFIGS = [
    ("t", "regs", 16, 1, 3, 16, "contiguous", torch.float32),
    ("t", "tile", 64, 2, 40, 33, "contiguous", torch.float32),
    ("l1", "regs", 16, 2, 1, 33, "contiguous", torch.bfloat16),
    ("l1", "regs", 32, 3, 20, 70, "transposed", torch.float32),
    ("t", "direct", 16, 2, 20, 16, "contiguous", torch.float32),
    ("l1", "direct", 16, 2, 1, 33, "transposed", torch.float16),
    ("l1", "tile", 16, 2, 5, 1, "transposed", torch.float16),
    ("l1", "tile", 32, 2, 30, 64, "contiguous", torch.bfloat16),
    ("l1", "tile", 64, 3, 50, 70, "contiguous", torch.float32),
]


@pytest.mark.parametrize("config", range(len(LOWRANK_CONFIGS)),
                         ids=["-".join(str(v).replace("torch.", "") for v in c) for c in LOWRANK_CONFIGS])
def test_mma_lowrank_matches_reference(config):
    t_mode, decode, block_m, splits, m, rank, layout, l1_dtype = LOWRANK_CONFIGS[config]
    n, k, bits, groups = 136, 256, 4, 2
    codes, lut = make_sketch(n, k, bits, groups, seed=config)
    x = randn(m, k, dtype=torch.bfloat16, seed=config + 1)
    bias = randn(n, dtype=torch.bfloat16, seed=config + 2) if config % 2 else None
    if layout == "contiguous":
        l1 = randn(k, rank, seed=config + 3)
    else:
        l1 = randn(rank, k, seed=config + 3).t()
    l1 = (l1 * 0.1).to(l1_dtype)
    l2 = randn(rank, n, seed=config + 4) * 0.1
    ints = dict(rank=rank)
    extra = dict(l2=l2)
    if t_mode == "t":
        extra["t"] = (x.float() @ l1.float()).contiguous()
    else:
        # the kernel reads l1 through its strides from the base of its storage
        storage = l1 if layout == "contiguous" else l1.t().contiguous()
        extra["l1"] = storage
        ints.update(l1_type=_code(l1_dtype), l1_stride_k=l1.stride(0), l1_stride_r=l1.stride(1))
    y, out = _forward_case(x, codes, lut, bias, bits=bits, groups=groups, block_m=block_m, splits=splits,
                           regs=DECODES[decode], schedule=SCHEDULES[config % len(SCHEDULES)], extra_ints=ints,
                           extra=extra)
    assert out["launches"] == (2 if splits > 1 else 1)
    # on chip, l1 is rounded to the activation dtype like W
    l1_used = l1.to(torch.bfloat16) if t_mode == "l1" else l1
    ref = (reference.lut_linear(x.double(), codes, lut.to(torch.bfloat16).double(),
                                None if bias is None else bias.double())
           + x.double() @ l1_used.double() @ l2.double())
    _assert_elementwise(y, ref, f"low-rank {t_mode}")


@pytest.mark.parametrize("decode,block_m,splits", [("regs", 16, 1), ("regs", 32, 2), ("direct", 16, 2), ("direct", 16, 1),
                                                        ("tile", 16, 2), ("tile", 64, 1)])
def test_mma_multi_adapter_segments(decode, block_m, splits):
    n, k, bits, groups, adapters = 136, 256, 4, 2, 4
    codes, lut = make_sketch(n, k, bits, groups, seed=5)
    stack = torch.stack([lut + 0.5 * randn(*lut.shape, seed=a) for a in range(adapters)])
    # tokens already grouped by adapter (the op sorts them on the device first): an empty segment,
    # one longer than a token tile, one of a single token
    lengths = [17, 0, 40, 1]
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)
    m = int(offsets[-1])
    x = randn(m, k, dtype=torch.bfloat16, seed=6)
    bias = randn(n, dtype=torch.bfloat16, seed=7)
    y, _ = _forward_case(x, codes, stack, bias, bits=bits, groups=groups, block_m=block_m, splits=splits,
                         regs=DECODES[decode], schedule=SCHEDULES[splits],
                         extra_ints=dict(adapters=adapters, lut_stride=lut.numel()), extra=dict(offsets=offsets))
    for a in range(adapters):
        rows = slice(int(offsets[a]), int(offsets[a + 1]))
        if lengths[a] == 0:
            continue
        ref = reference.lut_linear(x[rows].double(), codes, stack[a].to(torch.bfloat16).double(), bias.double())
        _assert_elementwise(y[rows], ref, f"adapter {a}")


# dx = dy W: every token tile, W's rows split or not, in_features an odd multiple of 64 (the last
# 128-column block half outside W), out_features a multiple of 8 but not of 64.
DX_CONFIGS = [(16, 1, 1, 136, 256, 2), (32, 2, 20, 72, 192, 3), (64, 3, 40, 200, 320, 1), (128, 1, 130, 64, 128, 2),
              (16, 2, 5, 200, 576, 9), (32, 1, 7, 8, 1024, 16)]


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("config", range(len(DX_CONFIGS)), ids=["-".join(map(str, c)) for c in DX_CONFIGS])
def test_dx_mma_matches_reference(bits, config):
    block_m, splits, m, n, k, groups = DX_CONFIGS[config]
    i = config * 3 + bits
    act, lut_dtype = HALF[i % 2], LUT_DTYPES[i % 3]
    codes, lut = make_sketch(n, k, bits, groups, lut_dtype=lut_dtype, seed=i)
    dy = randn(m, n, dtype=act, seed=i + 1)
    ints = dict(_problem(codes, m, n, k, groups, bits), act=_code(act), lut_type=_code(lut_dtype), block_m=block_m,
                splits=splits)
    out = _run_one("dx_mma", ints, dict(dy=dy, codes=codes, lut=lut), SCHEDULES[i % len(SCHEDULES)])
    dx = simt.as_tensor(out["dx"], act, (m, k))
    _assert_elementwise(dx, reference.lut_linear_dx(dy.double(), codes, lut.to(act).double()), "dx")


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("m,n,k,groups", [(1, 128, 64, 1), (33, 136, 256, 2), (70, 64, 192, 3)])
def test_grad_mma_matches_reference(bits, deterministic, m, n, k, groups):
    act = HALF[(bits + m) % 2]
    codes, _ = make_sketch(n, k, bits, groups, seed=bits + n)
    x = randn(m, k, dtype=act, seed=1)
    dy = randn(m, n, dtype=act, seed=2)
    ints = dict(_problem(codes, m, n, k, groups, bits), act=_code(act), deterministic=int(deterministic))
    out = _run_one("grad_mma", ints, dict(dy=dy, x=x, codes=codes), SCHEDULES[(bits + m) % len(SCHEDULES)])
    dlut = simt.as_tensor(out["dlut"], torch.float32, (n, groups, 1 << bits))
    ref = reference.lut_grad(dy.double(), x.double(), codes, groups, 1 << bits).double()
    assert torch.isfinite(dlut).all()
    # fp32 sums of bf16 products: elementwise, relative to the largest bucket
    err = (dlut.double() - ref).abs().max().item()
    assert err <= 1e-5 * (ref.abs().max().item() + 1e-6) * max(1, m * k // groups) ** 0.5, err


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("lut_dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.float16, torch.float16),
                                                 (torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_fast_decode_is_exact(bits, lut_dtype, out_dtype):
    n, k, groups = 37, 512, 8
    codes, lut = make_sketch(n, k, bits, groups, lut_dtype=lut_dtype, seed=bits)
    ints = dict(_problem(codes, 0, n, k, groups, bits), lut_type=_code(lut_dtype), out_type=_code(out_dtype))
    out = _run_one("decode_fast", ints, dict(codes=codes, lut=lut), SCHEDULES[bits % 2])
    w = simt.as_tensor(out["w"], out_dtype, (n, k))
    assert torch.equal(w, reference.lut_decode(codes, lut).to(out_dtype))


@pytest.mark.parametrize("act,lut_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16),
                                           (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("bits", (3, 4))
def test_simple_kernels_match_reference(act, lut_dtype, bits):
    m, n, k, groups = 11, 40, 96, 3
    codes, lut = make_sketch(n, k, bits, groups, lut_dtype=lut_dtype, seed=bits)
    x = randn(m, k, dtype=act, seed=1)
    dy = randn(m, n, dtype=act, seed=2)
    bias = randn(n, dtype=act, seed=3)
    base = dict(_problem(codes, m, n, k, groups, bits), act=_code(act), lut_type=_code(lut_dtype))
    outs = simt.run_cases([("linear", base, dict(x=x, codes=codes, lut=lut, bias=bias)),
                           ("dx", base, dict(dy=dy, codes=codes, lut=lut)),
                           ("grad", base, dict(dy=dy, x=x, codes=codes)),
                           ("decode", base, dict(codes=codes, lut=lut))])
    assert [o["status"] for o in outs] == [0, 0, 0, 0]
    tol = 1e-5 if act == torch.float32 else 2.0 ** -7
    y = simt.as_tensor(outs[0]["y"], act, (m, n)).double()
    ref = reference.lut_linear(x.double(), codes, lut.double(), bias.double())
    assert (y - ref).abs().max().item() <= tol * ref.abs().max().item()
    dx = simt.as_tensor(outs[1]["dx"], act, (m, k)).double()
    ref = reference.lut_linear_dx(dy.double(), codes, lut.double())
    assert (dx - ref).abs().max().item() <= tol * ref.abs().max().item()
    dlut = simt.as_tensor(outs[2]["dlut"], torch.float32, (n, groups, 1 << bits)).double()
    ref = reference.lut_grad(dy.double(), x.double(), codes, groups, 1 << bits)
    assert (dlut - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    w = simt.as_tensor(outs[3]["w"], lut_dtype, (n, k))
    assert torch.equal(w, reference.lut_decode(codes, lut))


def test_schedules_give_identical_results():
    """The deterministic kernels (everything but lut_grad's atomic mode) give bit-identical output
    whatever the thread order and whenever cp.async copies land."""
    codes, lut = make_sketch(136, 256, 3, 2, seed=1)
    x = randn(20, 256, dtype=torch.bfloat16, seed=2)
    dy = randn(20, 136, dtype=torch.bfloat16, seed=3)
    l1 = randn(256, 33, seed=4) * 0.1
    l2 = randn(33, 136, seed=5) * 0.1
    p = _problem(codes, 20, 136, 256, 2, 3)
    act = dict(act=_code(torch.bfloat16), lut_type=0)
    cases = [
        ("linear_mma", dict(p, **act, block_m=32, splits=2, regs=1), dict(x=x, codes=codes, lut=lut)),
        ("linear_mma", dict(p, **act, block_m=64, splits=3, regs=0), dict(x=x, codes=codes, lut=lut)),
        ("linear_mma", dict(p, **act, block_m=16, splits=2, regs=0, rank=33, l1_type=0, l1_stride_k=33, l1_stride_r=1),
         dict(x=x, codes=codes, lut=lut, l1=l1, l2=l2)),
        ("dx_mma", dict(p, **act, block_m=32, splits=2), dict(dy=dy, codes=codes, lut=lut)),
        ("grad_mma", dict(p, **act, deterministic=1), dict(dy=dy, x=x, codes=codes)),
    ]
    runs = [simt.run_cases([(op, {**ints, **s}, t) for op, ints, t in cases]) for s in SCHEDULES]
    for c, (op, _, _) in enumerate(cases):
        first = runs[0][c]
        assert first["status"] == 0
        for r in runs[1:]:
            key = next(k for k in first if isinstance(first[k], bytes))
            assert r[c][key] == first[key], f"{op} case {c}: output depends on the schedule"


def test_bad_configurations_are_refused():
    codes, lut = make_sketch(128, 256, 4, 2, seed=1)
    x = randn(4, 256, dtype=torch.bfloat16, seed=2)
    p = dict(_problem(codes, 4, 128, 256, 2, 4), act=_code(torch.bfloat16), lut_type=0)
    outs = simt.run_cases([
        ("linear_mma", dict(p, block_m=48, splits=1, regs=0), dict(x=x, codes=codes, lut=lut)),   # no such tile
        ("linear_mma", dict(p, block_m=64, splits=1, regs=1), dict(x=x, codes=codes, lut=lut)),   # regs: 16 / 32
        ("linear_mma", dict(p, block_m=16, splits=2, regs=0, act=0), dict(x=x.float(), codes=codes, lut=lut)),
    ])
    assert [o["status"] for o in outs] == [1, 1, 1]  # cudaErrorInvalidValue, before any launch
    assert [o["launches"] for o in outs] == [0, 0, 0]


def test_emulator_exposes_races_and_early_reads():
    """The emulator itself: a read of shared memory another thread writes without a barrier depends
    on the thread order, and a read of a cp.async destination before the wait sees the poison
    (tests/simt/selftest.cu breaks each rule on purpose)."""
    data = torch.arange(256, dtype=torch.float32)
    outs = simt.run_cases([("selftest", dict(which=0, order=0), {}), ("selftest", dict(which=0, order=1), {}),
                           ("selftest", dict(which=1, late_copies=0), dict(**{"in": data})),
                           ("selftest", dict(which=1, late_copies=1), dict(**{"in": data}))])
    barrier_fwd, barrier_rev, early, late = (simt.as_tensor(o["out"], torch.float32, (64,)) for o in outs)
    assert torch.equal(barrier_fwd, torch.ones(64))       # thread 0 happened to run first
    assert barrier_rev[1:].isnan().all() and barrier_rev[0] == 1  # the others read before it wrote
    assert torch.equal(early, data[::4])
    assert late.isnan().all()


# The dispatch of csrc/cuda/dispatch.cpp, for described devices, then the kernels it picked (the
# steps of ops.cpp without torch; decode_gemm's GEMM runs on the host): every plan the rules can
# make for these shapes must be one the kernels run correctly.
DEVICES = {
    "h100": dict(sm_count=132, major=9, minor=0, smem_per_block=232448),
    "sm86": dict(sm_count=84, major=8, minor=6, smem_per_block=101376),  # no room for 128-token tiles
    "sm75": dict(sm_count=40, major=7, minor=5, smem_per_block=65536),   # no mma path
}


def _expected_forward_plan(device: str, m: int, act: torch.dtype) -> tuple[str, int]:
    half = act != torch.float32
    if device == "sm75" or not half:
        return ("decode_gemm", 0) if m >= 32 else ("simple", 0)
    if m > 512:
        return "decode_gemm", 0
    if m <= 16:
        return "mma_regs_direct", 16
    if m <= 32:
        return "mma_regs", 32
    block_m = 64 if m <= 64 else 128
    return "mma", 64 if device == "sm86" else block_m


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,act", [(m, torch.bfloat16) for m in (1, 16, 17, 33, 65, 600)]
                         + [(1, torch.float16), (65, torch.float16), (1, torch.float32), (40, torch.float32)],
                         ids=str)
def test_dispatch_plans_run(device, m, act):
    n, k, bits, groups = 136, 256, 4, 2
    codes, lut = make_sketch(n, k, bits, groups, seed=m)
    x = randn(m, k, dtype=act, seed=1)
    bias = randn(n, dtype=act, seed=2)
    ints = dict(_problem(codes, m, n, k, groups, bits), act=_code(act), lut_type=0, **DEVICES[device])
    out = _run_one("linear_auto", ints, dict(x=x, codes=codes, lut=lut, bias=bias), SCHEDULES[m % len(SCHEDULES)])
    path, block_m, splits = out["plan"].decode().split()
    want_path, want_block = _expected_forward_plan(device, m, act)
    assert path == want_path and (want_block == 0 or int(block_m) == want_block), out["plan"]
    y = simt.as_tensor(out["y"], act, (m, n))
    w_lut = lut.to(act) if path != "simple" else lut
    _assert_elementwise(y, reference.lut_linear(x.double(), codes, w_lut.double(), bias.double()), out["plan"].decode())


# Tuned thresholds (csrc/cuda/thresholds.h, set by spallm_ext.kernels / tuning files) move the
# boundaries between the paths, and only where the kernel can still carry the call out.
@pytest.mark.parametrize("m,thresholds,want", [
    (8, dict(direct_max_tokens=4), ("mma_regs", 16)),          # past direct's setting: the code ring
    (8, dict(direct_max_tokens=0, regs_max_tokens=0), ("mma", 16)),
    (24, dict(regs_max_tokens=16), ("mma", 32)),
    (12, dict(direct_max_tokens=16, regs_max_tokens=8), ("mma_regs_direct", 16)),  # direct is asked first
    (40, dict(mma_max_tokens=32), ("decode_gemm", 0)),
    (600, dict(mma_max_tokens=1024), ("mma", 128)),
    (1, dict(mma_max_tokens=0), ("decode_gemm", 0)),
], ids=str)
def test_dispatch_thresholds_move_the_plan(m, thresholds, want):
    n, k, bits, groups = 136, 256, 4, 2
    codes, lut = make_sketch(n, k, bits, groups, seed=m)
    x = randn(m, k, dtype=torch.bfloat16, seed=1)
    ints = dict(_problem(codes, m, n, k, groups, bits), act=_code(torch.bfloat16), lut_type=0, **DEVICES["h100"],
                **thresholds)
    out = _run_one("linear_auto", ints, dict(x=x, codes=codes, lut=lut), SCHEDULES[m % len(SCHEDULES)])
    path, block_m, _ = out["plan"].decode().split()
    assert (path, int(block_m) if want[1] else 0) == want, out["plan"]
    y = simt.as_tensor(out["y"], torch.bfloat16, (m, n))
    _assert_elementwise(y, reference.lut_linear(x.double(), codes, lut.to(torch.bfloat16).double()), out["plan"].decode())


@pytest.mark.parametrize("m,thresholds,want", [
    (40, dict(dx_mma_max_tokens=32), "decode_gemm"),
    (40, dict(mma_max_tokens=32), "mma"),               # the forward's setting leaves dx alone
    (600, dict(dx_mma_max_tokens=1024), "mma"),
], ids=str)
def test_dispatch_dx_threshold(m, thresholds, want):
    n, k, bits, groups = 136, 256, 3, 2
    codes, lut = make_sketch(n, k, bits, groups, seed=m)
    dy = randn(m, n, dtype=torch.bfloat16, seed=2)
    ints = dict(_problem(codes, m, n, k, groups, bits), act=_code(torch.bfloat16), lut_type=0, **DEVICES["h100"],
                **thresholds)
    (out,) = simt.run_cases([("dx_auto", ints, dict(dy=dy, codes=codes, lut=lut))])
    assert out["status"] == 0 and out["plan"].decode().split()[0] == want, out["plan"]
    dx = simt.as_tensor(out["dx"], torch.bfloat16, (m, k))
    _assert_elementwise(dx, reference.lut_linear_dx(dy.double(), codes, lut.to(torch.bfloat16).double()), "dx")


def test_dispatch_fp32_decode_threshold():
    n, k, bits, groups = 136, 256, 2, 2
    for m, setting, want in ((8, 8, "decode_gemm"), (8, 9, "simple"), (40, 64, "simple")):
        codes, lut = make_sketch(n, k, bits, groups, seed=m)
        x = randn(m, k, dtype=torch.float32, seed=1)
        ints = dict(_problem(codes, m, n, k, groups, bits), act=_code(torch.float32), lut_type=0,
                    **DEVICES["h100"], decode_min_tokens=setting)
        out = _run_one("linear_auto", ints, dict(x=x, codes=codes, lut=lut), SCHEDULES[0])
        assert out["plan"].decode().split()[0] == want, (m, setting, out["plan"])
        _assert_elementwise(simt.as_tensor(out["y"], torch.float32, (m, n)),
                            reference.lut_linear(x.double(), codes, lut.double()), want)


@pytest.mark.parametrize("device", ["h100", "sm86"])
@pytest.mark.parametrize("m", [1, 40, 600])
def test_dispatch_backward_plans_run(device, m):
    n, k, bits, groups = 136, 256, 3, 2
    codes, lut = make_sketch(n, k, bits, groups, seed=m)
    x = randn(m, k, dtype=torch.bfloat16, seed=1)
    dy = randn(m, n, dtype=torch.bfloat16, seed=2)
    ints = dict(_problem(codes, m, n, k, groups, bits), act=_code(torch.bfloat16), lut_type=0, **DEVICES[device])
    dx_out, grad_out = simt.run_cases([("dx_auto", ints, dict(dy=dy, codes=codes, lut=lut)),
                                       ("grad_auto", ints, dict(dy=dy, x=x, codes=codes))])
    assert dx_out["status"] == 0 and grad_out["status"] == 0
    assert dx_out["plan"].decode().split()[0] == ("decode_gemm" if m > 512 else "mma"), dx_out["plan"]
    assert grad_out["plan"].decode().split()[0] == "mma", grad_out["plan"]
    dx = simt.as_tensor(dx_out["dx"], torch.bfloat16, (m, k))
    _assert_elementwise(dx, reference.lut_linear_dx(dy.double(), codes, lut.to(torch.bfloat16).double()), "dx")
    dlut = simt.as_tensor(grad_out["dlut"], torch.float32, (n, groups, 1 << bits)).double()
    ref = reference.lut_grad(dy.double(), x.double(), codes, groups, 1 << bits).double()
    assert (dlut - ref).abs().max().item() <= 1e-5 * ref.abs().max().item() * m ** 0.5


# Shared-memory bank conflicts of the marked accesses (mma.cuh smem_load / smem_store, every
# ldmatrix and every cp.async store): the tiles' arrival, the decode's lookups, its W-tile stores, code-word reads, ldmatrix on the swizzled
# tiles and lut_grad's dW reads are designed conflict-free, whatever the codes. Two known
# exceptions are pinned: the 3-bit register decode (with its code ring; the direct variant has no
# code tile) reads each lane's 6 code bytes as two words at
# 24-byte row strides, and translates of the words {0, 1, 3, 4} cannot tile the 32 banks, so every
# such read takes two wavefronts; and the tile / dx kernels' code tiles, padded to an odd word
# stride so that the decode's row-per-lane reads are conflict-free, arrive by 4-byte cp.async
# written row after row, which wraps onto used banks: two wavefronts per request where one would do
# (csrc/cuda/README.md).
@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("kernel", ["regs16", "regs32", "direct16", "tile16", "tile64", "tile128", "dx32",
                                    "dx128", "grad"])
def test_shared_memory_accesses_are_conflict_free(bits, kernel):
    codes, lut = make_sketch(256, 256, bits, 2, mode="random", seed=bits)
    x = randn(20, 256, dtype=torch.bfloat16, seed=1)
    dy = randn(20, 256, dtype=torch.bfloat16, seed=2)
    p = dict(_problem(codes, 20, 256, 256, 2, bits), act=_code(torch.bfloat16), lut_type=0)
    if kernel.startswith(tuple(DECODES)):
        decode = kernel.rstrip("0123456789")
        case = ("linear_mma", dict(p, block_m=int(kernel[len(decode):]), splits=1, regs=DECODES[decode]),
                dict(x=x, codes=codes, lut=lut))
    elif kernel.startswith("dx"):
        case = ("dx_mma", dict(p, block_m=int(kernel[2:]), splits=1), dict(dy=dy, codes=codes, lut=lut))
    else:
        case = ("grad_mma", dict(p, deterministic=1), dict(dy=dy, x=x, codes=codes))
    (out,) = simt.run_cases([case])
    assert out["status"] == 0 and out["smem.divergent"] == 0
    sites = {k.split(".")[1] for k in out if k.startswith("smem.") and k.count(".") == 2}
    expected = {"regs": {"lane_codes", "lut_lookup", "x_regs"}, "direct": {"lut_lookup", "x_regs"}, "tile": {"code_words", "lut_lookup", "w_store", "ldmatrix"},
                "dx": {"code_words", "lut_lookup", "w_store", "ldmatrix"}, "grad": {"grad_dw", "ldmatrix"}}
    # every tile arrives by cp.async: x / dy tiles in 16-byte units, the register decode's code rows
    # in 16- or 8-byte pieces, the tile and dx kernels' padded code tiles in 4-byte words; the direct
    # decode copies x only
    copies = {"regs": {"cp_async_16"} if bits != 3 else {"cp_async_16", "cp_async_8"}, "direct": {"cp_async_16"},
              "tile": {"cp_async_16", "cp_async_4"}, "dx": {"cp_async_16", "cp_async_4"}, "grad": {"cp_async_16"}}
    expected = {k: v | copies[k] for k, v in expected.items()}
    assert sites == expected[kernel.rstrip("0123456789")]
    for site in sites:
        wavefronts, ideal = out[f"smem.{site}.wavefronts"], out[f"smem.{site}.ideal"]
        factor = 2 if (site, bits) == ("lane_codes", 3) or site == "cp_async_4" else 1
        assert wavefronts == factor * ideal, f"{site}: {wavefronts} wavefronts, conflict-free needs {ideal}"


@pytest.mark.parametrize("decode", ["regs", "direct"])
def test_register_decode_copies_only_the_tokens_it_has(decode):
    """At M = 1 the register decodes copy one x row per K-step (8 lanes of one warp: a partial warp
    access, accounted with the other lanes inactive), not a zero-filled 16-token tile."""
    n, k, bits = 256, 256, 4
    codes, lut = make_sketch(n, k, bits, 2, seed=3)
    x = randn(1, k, dtype=torch.bfloat16, seed=4)
    y, out = _forward_case(x, codes, lut, None, bits=bits, groups=2, block_m=16, splits=1, regs=DECODES[decode],
                           schedule=SCHEDULES[0])
    _assert_elementwise(y, reference.lut_linear(x.double(), codes, lut.to(torch.bfloat16).double()), decode)
    blocks, steps = n // 128, k // 64
    x_copies = blocks * steps  # one 128-byte row: one wavefront each
    code_copies = 0 if decode == "direct" else blocks * steps * 128 * 32 // 128
    assert out["smem.cp_async_16.wavefronts"] == out["smem.cp_async_16.ideal"] == x_copies + code_copies
    assert out["smem.divergent"] > 0


@pytest.mark.parametrize("m,adapters", [(64, 4), (9, 3), (600, 2), (1100, 2)])
def test_dispatch_multi_adapter_plans_run(m, adapters):
    """plan_lut_linear_adapters (the variant and tile follow the average segment) and the one-launch
    kernel it picks, for tokens already grouped by adapter as the op groups them."""
    n, k, bits, groups = 136, 256, 4, 2
    codes, lut = make_sketch(n, k, bits, groups, seed=m)
    stack = torch.stack([lut + 0.5 * randn(*lut.shape, seed=a) for a in range(adapters)])
    lengths = [m // adapters + (1 if a < m % adapters else 0) for a in range(adapters)]
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)
    x = randn(m, k, dtype=torch.float16, seed=1)
    ints = dict(_problem(codes, m, n, k, groups, bits), act=_code(torch.float16), lut_type=0, adapters=adapters,
                lut_stride=lut.numel(), **DEVICES["h100"])
    out = _run_one("linear_auto", ints, dict(x=x, codes=codes, lut=stack, offsets=offsets), SCHEDULES[m % 5])
    path, block_m, _ = out["plan"].decode().split()
    segment = -(-m // adapters)
    if segment > 512:
        assert path == "decode_gemm"  # the op then serves each adapter by itself (csrc/multi_adapter.cpp)
        assert simt.as_tensor(out["y"], torch.float16, (m, n)).isnan().all()  # and the harness ran nothing
        return
    want_block = 16 if segment <= 16 else 32 if segment <= 32 else 64 if segment <= 64 else 128
    want_path = "mma_regs_direct" if segment <= 16 else "mma_regs" if segment <= 32 else "mma"
    assert path == want_path and int(block_m) == want_block, out["plan"]
    y = simt.as_tensor(out["y"], torch.float16, (m, n))
    for a in range(adapters):
        rows = slice(int(offsets[a]), int(offsets[a + 1]))
        ref = reference.lut_linear(x[rows].double(), codes, stack[a].to(torch.float16).double())
        _assert_elementwise(y[rows], ref, f"adapter {a}")

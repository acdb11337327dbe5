"""Which CUDA (and CPU) kernel runs the ops, for tests, benchmarks and debugging.

The automatic choice (csrc/cuda/dispatch.cpp) picks, per call, between

* ``"mma"``: the fused LUT gather-GEMM on tensor cores (bf16/fp16 activations, sm_80+),
* ``"mma_regs"``: its small-M variant (M <= 32), each lane decoding its own mma fragments in
  registers (the default for 16 < M <= 32),
* ``"mma_regs_direct"``: the same with each lane's codes loaded from global memory straight into
  registers rather than through a shared-memory ring (M <= 16, and the default there),
* ``"decode_gemm"``: decode W once into the activation dtype, then cuBLAS (large M, fp32),
* ``"simple"``: the exact CUDA-core kernels (any dtype and shape).

Forcing a path applies wherever that path supports the call (shape, dtype, alignment, GPU);
elsewhere the automatic choice still runs. Results agree across paths within the activation
dtype's rounding: the "mma*" paths and "decode_gemm" round W to bf16/fp16 as a bf16/fp16 nn.Linear does.

The token counts at which the automatic choice switches path are the dispatch thresholds
(:func:`dispatch_thresholds`, :func:`set_dispatch_thresholds`); :mod:`spallm_ext.tuning` measures
them on the machine at hand.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from . import _C

PATHS = ("auto", "simple", "mma", "mma_regs", "mma_regs_direct", "decode_gemm")


def set_cuda_kernel(name: str) -> None:
    """Force a CUDA path for every following call in this process ("auto" restores the default)."""
    if not isinstance(name, str) or not _C.set_cuda_kernel(name):
        raise ValueError(f"kernel must be one of {PATHS}, got {name!r}")


def cuda_kernel() -> str:
    """The forced CUDA path, "auto" when none."""
    return _C.cuda_kernel()


@contextlib.contextmanager
def use_cuda_kernel(name: str) -> Iterator[None]:
    """Run the block with a forced CUDA path, then restore the previous one."""
    previous = cuda_kernel()
    set_cuda_kernel(name)
    try:
        yield
    finally:
        set_cuda_kernel(previous)


def last_cuda_plan() -> str:
    """What the last CUDA lut_linear / lut_linear_dx call on this thread ran, and why."""
    return _C.last_cuda_plan()


LOWRANK_T_MODES = ("auto", "gemm")


def set_lowrank_t(mode: str) -> None:
    """How the fused CUDA ``lut_linear_lowrank`` gets t = x @ l1, for every following call.

    ``"auto"`` (default): in extra blocks of the LUT kernel that read the same x tiles, whenever the
    call splits K (small M) with token tiles of at most 64; otherwise a skinny GEMM first.
    ``"gemm"``: always the skinny GEMM (what the benchmark compares against). Results agree within
    fp32 accumulation order, except that on chip l1 is rounded to x's dtype for the tensor cores.
    """
    if not isinstance(mode, str) or not _C.set_lowrank_t(mode):
        raise ValueError(f"mode must be one of {LOWRANK_T_MODES}, got {mode!r}")


def lowrank_t() -> str:
    """The current ``lut_linear_lowrank`` t mode."""
    return _C.lowrank_t()


@contextlib.contextmanager
def use_lowrank_t(mode: str) -> Iterator[None]:
    """Run the block with a ``lut_linear_lowrank`` t mode, then restore the previous one."""
    previous = lowrank_t()
    set_lowrank_t(mode)
    try:
        yield
    finally:
        set_lowrank_t(previous)


CPU_PATHS = ("auto", "portable", "avx2", "avx512", "bf16", "avx512bf16")


def cpu_kernels() -> tuple[str, ...]:
    """The CPU paths this machine can run: always "auto" and "portable"; "avx2" and "bf16" where the
    CPU has AVX2 and FMA, "avx512" where it has AVX-512F, "avx512bf16" where it also has AVX512-BF16
    (detected at run time; the build itself runs on any x86-64 or other CPU)."""
    return tuple(_C.cpu_kernels())


def set_cpu_kernel(name: str) -> None:
    """Force the CPU path for every following call in this process.

    ``"auto"`` (default): the widest vector kernels the CPU has (``"avx512"``, else ``"avx2"``),
    else ``"portable"``; and where the CPU also multiplies bf16 natively (AVX512-BF16), a bf16
    model's forward takes the bf16 dot-product pass (as ``"avx512bf16"``) at few tokens and the
    bf16 tiles (as ``"bf16"``, if torch's bf16 matmul runs on oneDNN) at more.
    ``"avx2"``: eight codes decoded per vector instruction sequence; up to 16 tokens W is decoded in
    registers straight into FMAs (no decoded tile, no BLAS call), more tokens decode tiles for BLAS.
    All work in fp32. Forced, it runs the AVX2 kernels on an AVX-512 CPU too.
    ``"avx512"``: the same with sixteen codes per step and every LUT in one register; the fused
    pass serves up to 4096 tokens (it beats decode + BLAS at every size measured on a 2-core
    AVX-512 machine). Needs group sizes that are multiples of 16 (others take AVX2).
    ``"bf16"``: as ``"auto"``, except that bf16 activations (a bf16 model, or any model under CPU
    autocast) from 8 (AVX2) or 16 (AVX-512) tokens on take bf16 tiles: W decoded to bf16 (exact
    for a bf16 LUT, an fp32 / fp16 LUT rounded once, as on the CUDA tensor cores and under
    autocast) for torch's bf16 matmul, fp32 accumulation and one rounding; the backward likewise
    (lut_linear_dx over column slabs of W, lut_grad from bf16 dW tiles summed in fp32). Forced, it
    runs on any AVX2 CPU, but is only fast with native bf16.
    ``"avx512bf16"``: as ``"avx512"``, except that a bf16 model's forward (bf16 x) at up to 32
    tokens runs the fused pass on bf16 dot products (vdpbf16ps: 32 weights per instruction and
    token, the tokens read as bf16): W rounded to bf16 once, fp32 sums, one rounding of y. Needs
    group sizes that are multiples of 32.
    ``"portable"``: scalar decode of W tiles, then BLAS. fp64 work (gradcheck), group sizes that are
    not multiples of 8 and non-x86 CPUs always take it. Results agree within fp32 rounding.
    """
    if not isinstance(name, str) or name not in CPU_PATHS:
        raise ValueError(f"kernel must be one of {CPU_PATHS}, got {name!r}")
    if not _C.set_cpu_kernel(name):
        raise ValueError(f"CPU kernel {name!r} is not available on this CPU (it has {cpu_kernels()})")


def cpu_kernel() -> str:
    """The forced CPU path, "auto" when none."""
    return _C.cpu_kernel()


@contextlib.contextmanager
def use_cpu_kernel(name: str) -> Iterator[None]:
    """Run the block with a forced CPU path, then restore the previous one."""
    previous = cpu_kernel()
    set_cpu_kernel(name)
    try:
        yield
    finally:
        set_cpu_kernel(previous)


def last_cpu_plan() -> str:
    """What the last CPU lut_linear / lut_linear_dx / lut_grad on this thread ran: "avx512_gemv",
    "avx512_tiles", "avx2_gemv", "avx2_tiles", "bf16_tiles" or "portable_tiles" ("none" before the
    first call; lut_grad's fp32 work, which decodes nothing, reports "portable_tiles")."""
    return _C.last_cpu_plan()


# Dispatch thresholds: the token counts at which the automatic choice changes path. Their built-in
# values are fixed in the native library (CUDA: csrc/cuda/thresholds.h, CPU: csrc/cpu/lut_ops_cpu.cpp);
# `spallm-ext tune` measures them on the machine at hand (spallm_ext.tuning).
THRESHOLD_DEVICES = ("cuda", "cpu")


def _threshold_rows(device: str) -> list[tuple[str, int, int, int, int]]:
    if device not in THRESHOLD_DEVICES:
        raise ValueError(f"device must be one of {THRESHOLD_DEVICES}, got {device!r}")
    return list(_C.cuda_thresholds() if device == "cuda" else _C.cpu_thresholds())


def dispatch_thresholds(device: str, *, builtin: bool = False) -> dict[str, int]:
    """The dispatch thresholds of ``device`` ("cuda" or "cpu") in force now (``builtin=True``: the
    library's own values).

    CUDA (forward ``lut_linear``, bf16/fp16 activations, shapes the tensor-core kernels take):
    ``direct_max_tokens`` (``mma_regs_direct`` up to this M, at most 16), ``regs_max_tokens``
    (``mma_regs`` up to this M, at most 32), ``mma_max_tokens`` (a tensor-core LUT kernel up to this
    M, ``decode_gemm`` beyond), ``dx_mma_max_tokens`` (the same for ``lut_linear_dx``), and
    ``decode_min_tokens`` (where no tensor-core kernel runs: ``decode_gemm`` from this M, the simple
    kernels below). CPU: ``gemv_max_tokens`` (the fused vector pass up to this M, decode + BLAS
    beyond), ``bf16_min_tokens`` (bf16 activations take the bf16 tiles from this M, where the CPU
    path uses them), ``bf16_gemv_min_tokens`` and ``bf16_gemv_max_tokens`` (a bf16 model's forward
    on AVX512-BF16 dot products between these M; outside, the fp32 pass or the bf16 tiles). Thresholds never change results beyond the rounding the paths already differ by.
    A CPU-only build lists the CUDA built-ins and cannot set them.
    """
    return {name: (base if builtin else value) for name, value, base, _, _ in _threshold_rows(device)}


def set_dispatch_thresholds(device: str, **values: int | None) -> None:
    """Set dispatch thresholds of ``device`` by name (see :func:`dispatch_thresholds`); ``None``
    restores a threshold's built-in value. Every name and value is checked before any is set."""
    rows = {name: (lo, hi) for name, _, _, lo, hi in _threshold_rows(device)}
    for name, value in values.items():
        if name not in rows:
            raise ValueError(f"unknown {device} dispatch threshold {name!r}; known: {sorted(rows)}")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{device} dispatch threshold {name!r} must be an int or None, got {value!r}")
        lo, hi = rows[name]
        if not lo <= value <= hi:
            raise ValueError(f"{device} dispatch threshold {name!r} must be in [{lo}, {hi}], got {value}")
    setter = _C.set_cuda_threshold if device == "cuda" else _C.set_cpu_threshold
    for name, value in values.items():
        why = setter(name, -1 if value is None else value)
        if why:
            raise RuntimeError(f"cannot set {device} dispatch threshold {name!r}: {why}")


def reset_dispatch_thresholds(device: str) -> None:
    """Every threshold of ``device`` back to its built-in value (a CPU-only build has nothing to
    reset for "cuda")."""
    if device == "cuda" and not _C.build_info()["cuda"]:
        return
    set_dispatch_thresholds(device, **{name: None for name in dispatch_thresholds(device)})


@contextlib.contextmanager
def use_dispatch_thresholds(device: str, **values: int | None) -> Iterator[None]:
    """Run the block with some thresholds of ``device`` set, then restore the previous values."""
    previous = dispatch_thresholds(device)
    builtin = dispatch_thresholds(device, builtin=True)
    set_dispatch_thresholds(device, **values)
    try:
        yield
    finally:
        # A threshold that was at its built-in value goes back to following it (None), not to a copy.
        set_dispatch_thresholds(device, **{n: None if previous[n] == builtin[n] else previous[n] for n in values})

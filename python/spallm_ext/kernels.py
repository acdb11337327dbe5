"""Which CUDA kernel runs the forward ops, for tests, benchmarks and debugging.

The automatic choice (csrc/cuda/dispatch.cpp) picks, per call, between

* ``"mma"``: the fused LUT gather-GEMM on tensor cores (bf16/fp16 activations, sm_80+),
* ``"mma_regs"``: its small-M variant (M <= 32), each lane decoding its own mma fragments in
  registers (the default for M <= 32),
* ``"decode_gemm"``: decode W once into the activation dtype, then cuBLAS (large M, fp32),
* ``"simple"``: the exact CUDA-core kernels (any dtype and shape).

Forcing a path applies wherever that path supports the call (shape, dtype, alignment, GPU);
elsewhere the automatic choice still runs. Results agree across paths within the activation
dtype's rounding: "mma", "mma_regs" and "decode_gemm" round W to bf16/fp16 as a bf16/fp16 nn.Linear does.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from . import _C

PATHS = ("auto", "simple", "mma", "mma_regs", "decode_gemm")


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

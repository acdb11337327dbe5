"""Time the CPU spallm ops against torch.matmul at the shapes of a SmolLM2 training step
(8 sequences x ~130 tokens through a 576 -> 1536 and a 1536 -> 576 layer), one thread.

    OMP_NUM_THREADS=1 python examples/ft_op_timing.py

Per layer a LUT-only training step runs lut_linear (forward), lut_linear_dx and lut_grad; a LoRA
step on a frozen dense base runs the forward and dx matmuls only (no dW)."""
import time

import torch

import spallm_ext
from spallm_ext import SketchedLinear


def ms(fn, reps: int = 5) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for m, k, n in ((1100, 576, 1536), (1100, 1536, 576)):
        sk = SketchedLinear.from_linear(torch.nn.Linear(k, n, bias=False))
        w, lut = sk.decode(), sk.lut.detach()
        x, dy = torch.randn(m, k), torch.randn(m, n)
        rows = {
            "matmul x W^T": ms(lambda: x @ w.T),
            "matmul dY W": ms(lambda: dy @ w),
            "matmul dY^T X (dense dW)": ms(lambda: dy.T @ x),
            "lut_linear": ms(lambda: spallm_ext.lut_linear(x, sk.codes, lut)),
            "lut_linear_dx": ms(lambda: spallm_ext.lut_linear_dx(dy, sk.codes, lut)),
            "lut_grad": ms(lambda: spallm_ext.lut_grad(dy, x, sk.codes, 1, 16)),
        }
        print(f"M={m} K={k} N={n}: " + ", ".join(f"{name} {v:.1f} ms" for name, v in rows.items()))


if __name__ == "__main__":
    main()

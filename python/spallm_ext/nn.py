"""SketchedLinear: a drop-in nn.Linear whose weight is a SpaLLM sketch (codes + trainable LUTs)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import ops
from .formats import bits_of, check_bits, pack_codes, pack_unit, row_bytes, sketch_bytes
from .sketch import Sketcher, get_sketcher


class SketchedLinear(nn.Module):
    """y = x W^T + b with W[r, c] = lut[r, c // (in_features // groups_per_row), code[r, c]].

    * ``codes``: uint8 buffer [out_features, row_bytes], the canonical packed layout
      (see spallm_ext.formats); frozen.
    * ``lut``: nn.Parameter [out_features, groups_per_row, 2^bits], kept in ``lut_dtype``
      (fp32 by default: the master copy the optimizer updates; kernels read it as it is and
      accumulate in fp32 whatever the activation dtype).
    * ``bias``: optional, frozen unless ``train_bias=True``; cast to the activation dtype per call.
    * ``lut_stack`` / ``adapter_index``: None unless spallm_ext.multi_adapter is in use:
      ``stack_adapters`` puts a stack of LUT sets [A, out, G, 2^bits] sharing these codes in
      ``lut_stack``, and inside ``use_adapters`` the forward reads ``lut_stack`` with
      ``adapter_index`` (an int: one adapter for the whole batch; or a tensor with one entry per
      sequence, i.e. per index of x's first dimension, or per token) instead of ``lut``.

    Under torch.autocast the input is cast to the autocast dtype, as nn.Linear's would be.
    Non-finite LUT values propagate like a matmul with the decoded weight: every output that
    uses a NaN/Inf entry becomes NaN/Inf, the others are untouched.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, groups_per_row: int = 1,
                 bias: bool = True, device=None, dtype: torch.dtype | None = None,
                 lut_dtype: torch.dtype = torch.float32, train_bias: bool = False):
        super().__init__()
        check_bits(bits)
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        if groups_per_row < 1 or in_features % groups_per_row:
            raise ValueError(f"in_features ({in_features}) must be divisible by groups_per_row ({groups_per_row})")
        if in_features % pack_unit(bits):
            raise ValueError(f"in_features ({in_features}) must be a multiple of {pack_unit(bits)} "
                             f"for {bits}-bit codes")
        if lut_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"lut_dtype must be a floating dtype, got {lut_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("codes", torch.zeros(out_features, row_bytes(in_features, bits),
                                                  dtype=torch.uint8, device=device))
        self.lut = nn.Parameter(torch.empty(out_features, groups_per_row, 1 << bits, device=device,
                                            dtype=lut_dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype or torch.float32),
                                     requires_grad=train_bias)
        else:
            self.register_parameter("bias", None)
        self.register_parameter("lut_stack", None)
        self.adapter_index: int | Tensor | None = None
        self.reset_parameters()

    @property
    def bits(self) -> int:
        return bits_of(self.lut)

    @property
    def groups_per_row(self) -> int:
        return self.lut.shape[1]

    @property
    def num_entries(self) -> int:
        return self.lut.shape[2]

    def reset_parameters(self) -> None:
        """nn.Linear's init, as a sketch: random codes over a LUT evenly spaced in
        [-1/sqrt(in), 1/sqrt(in)], so a fresh layer has nn.Linear's weight scale."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            levels = torch.linspace(-bound, bound, self.num_entries, device=self.lut.device)
            self.lut.copy_(levels.expand_as(self.lut))
            codes = torch.randint(0, self.num_entries, (self.out_features, self.in_features),
                                  device=self.codes.device)
            self.codes.copy_(pack_codes(codes, self.bits))
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def _inputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """x checked and cast as nn.Linear's would be under autocast, and the bias in x's dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input's last dimension is {x.shape[-1]}, expected "
                             f"in_features={self.in_features}")
        dev = x.device.type
        if torch.is_autocast_enabled(dev) and x.is_floating_point():
            x = x.to(torch.get_autocast_dtype(dev))
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return x, bias

    def forward(self, x: Tensor) -> Tensor:
        x, bias = self._inputs(x)
        index = getattr(self, "adapter_index", None)   # absent on modules pickled before stacks existed
        if index is None:
            return ops.lut_linear(x, self.codes, self.lut, bias)
        if self.lut_stack is None:
            raise RuntimeError("SketchedLinear: adapter_index is set but there is no lut_stack: "
                               "call spallm_ext.stack_adapters(model, ...) first")
        if isinstance(index, int):  # one adapter for every token: the plain single-LUT kernel
            return ops.lut_linear(x, self.codes, self.lut_stack[index], bias)
        return ops.lut_linear(x, self.codes, self.lut_stack, bias, _per_token(index, x))

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, groups_per_row: int = 1,
                    sketcher: str | Sketcher = "lloyd", lut_dtype: torch.dtype = torch.float32,
                    train_bias: bool = False, **sketch_kwargs) -> "SketchedLinear":
        """Sketch an nn.Linear. `sketcher` names a registered sketcher (spallm_ext.sketch) or is a
        callable fn(weight, bits, groups_per_row, **sketch_kwargs) -> (codes [out, in], lut [out, G, 2^bits])."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, bits=bits, groups_per_row=groups_per_row,
                  bias=linear.bias is not None, device=w.device,
                  dtype=None if linear.bias is None else linear.bias.dtype,
                  lut_dtype=lut_dtype, train_bias=train_bias)
        codes, lut = get_sketcher(sketcher)(w.float(), bits, groups_per_row, **sketch_kwargs)
        if tuple(lut.shape) != tuple(mod.lut.shape) or tuple(codes.shape) != tuple(w.shape):
            raise ValueError(f"sketcher returned codes {tuple(codes.shape)} and lut {tuple(lut.shape)}; "
                             f"expected {tuple(w.shape)} and {tuple(mod.lut.shape)}")
        with torch.no_grad():
            mod.codes.copy_(pack_codes(codes, bits))
            mod.lut.copy_(lut)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias)
        return mod

    @torch.no_grad()
    def decode(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense weight [out, in] (in the LUT's dtype unless `dtype` is given)."""
        lut = self.lut.detach()
        return ops.lut_decode(self.codes, lut if dtype is None else lut.to(dtype))

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """An nn.Linear holding the decoded weight (fp32 master precision unless `dtype`)."""
        w = self.decode(dtype)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        lin.weight.copy_(w)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def storage_bytes(self, lut_dtype: torch.dtype | None = None) -> int:
        """Bytes of the sketch: packed codes + LUTs (at their dtype, or `lut_dtype`)."""
        return sketch_bytes(self.out_features, self.in_features, self.bits, self.groups_per_row,
                            lut_dtype or self.lut.dtype)

    def extra_repr(self) -> str:
        nbytes = self.storage_bytes()
        bpw = 8.0 * nbytes / (self.in_features * self.out_features)
        stack = "" if self.lut_stack is None else f", adapters={self.lut_stack.shape[0]}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"groups_per_row={self.groups_per_row}, bias={self.bias is not None}, "
                f"lut_dtype={str(self.lut.dtype).replace('torch.', '')}, "
                f"bytes={nbytes} ({bpw:.2f} bits/weight){stack}")


def _per_token(index: Tensor, x: Tensor) -> Tensor:
    """The op's one-adapter-per-token index for x [..., K] from `index`, which holds one entry per
    token (any shape with that many entries) or, 1-D, one per sequence (x's first dimension).
    When both readings fit (x with one token per sequence) they mean the same thing."""
    tokens = math.prod(x.shape[:-1])
    if index.numel() == tokens:
        return index.reshape(-1)
    if index.dim() == 1 and x.dim() >= 2 and index.shape[0] == x.shape[0]:
        return index.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1]).reshape(-1)
    raise ValueError(f"index (the adapter index given to use_adapters) has {index.numel()} entries "
                     f"(shape {tuple(index.shape)}); an input of shape {tuple(x.shape)} needs one per "
                     f"sequence ({x.shape[0] if x.dim() >= 2 else 'n/a'}) or one per token ({tokens})")

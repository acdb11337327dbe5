"""Plain-torch NF4 (QLoRA's 4-bit NormalFloat) quantized linear layers, and a tiny LoRA wrapper.

NF4 (Dettmers et al., 2023): weights are cut into blocks of 64 consecutive values, each block is
scaled by its absolute maximum into [-1, 1] and every value is replaced by the nearest of 16 fixed
levels, placed at quantiles of a standard normal so that each level is used about equally often
by normally distributed weights. The levels are derived below from the normal quantile function
rather than typed in (QLoRA's construction: 8 quantiles on the positive side, 7 on the negative
side, and an exact zero, normalised so the extremes are +-1).

Storage here: two 4-bit codes per byte plus one fp32 absmax per block (QLoRA additionally
quantizes the absmax to 8 bits; we do not). The forward dequantizes the weight to the activation
dtype and runs one dense matmul, which is what QLoRA does on a GPU too.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NF4_BLOCK = 64
# Where the outermost quantile sits: QLoRA's offset, the mean of the 1 - 1/(2*15) and
# 1 - 1/(2*16) tail positions, so that the extreme levels are not at infinity.
_OFFSET = 0.5 * (1 - 1 / 30 + 1 - 1 / 32)


def nf4_levels() -> Tensor:
    """The 16 NF4 levels, ascending, fp32, with levels[0] = -1, levels[7] = 0, levels[15] = 1."""
    ndtri = torch.special.ndtri
    pos = ndtri(torch.linspace(_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])     # 8 values > 0
    neg = -ndtri(torch.linspace(_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])    # 7 values < 0
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).float()


NF4_LEVELS = nf4_levels()
# A value goes to level i when it lies between the midpoints around level i: bucketize against the
# 15 midpoints gives the nearest level without building a [n, 16] distance matrix.
_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


def nf4_quantize(w: Tensor, block: int = NF4_BLOCK) -> tuple[Tensor, Tensor]:
    """(packed codes uint8 [numel / 2], absmax fp32 [numel / block]) of a tensor whose element
    count is a multiple of `block` (and block even). Code i means level NF4_LEVELS[i]."""
    if block % 2 or w.numel() % block:
        raise ValueError(f"nf4_quantize: {w.numel()} elements is not a multiple of the block size {block} "
                         "(which must be even)")
    flat = w.detach().float().reshape(-1, block)
    absmax = flat.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.bucketize(flat / absmax[:, None], _MIDPOINTS.to(flat.device)).to(torch.uint8).reshape(-1)
    packed = (codes[0::2] << 4) | codes[1::2]    # high nibble = even element
    return packed, absmax


# byte -> (level of its high nibble, level of its low nibble): one gather per byte, not per code
_PAIRS = torch.stack([NF4_LEVELS[torch.arange(256) >> 4], NF4_LEVELS[torch.arange(256) & 0xF]], 1)


def nf4_dequantize(packed: Tensor, absmax: Tensor, shape, dtype: torch.dtype = torch.float32,
                   block: int = NF4_BLOCK) -> Tensor:
    vals = _PAIRS.to(packed.device)[packed.long()].reshape(-1, block) * absmax[:, None]
    return vals.reshape(shape).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """x W^T with W dequantized on the fly in forward and again in backward, as bitsandbytes'
    4-bit matmul does: autograd keeps only the 4-bit codes, never a dense copy of W per layer
    (F.linear would save the dequantized W for backward, the whole fp32 model's worth)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return F.linear(x, module.weight(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        return dy @ ctx.module.weight(dy.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer stored as NF4 (buffers only: nothing in it trains)."""

    def __init__(self, linear: nn.Linear, block: int = NF4_BLOCK):
        super().__init__()
        self.in_features, self.out_features, self.block = linear.in_features, linear.out_features, block
        packed, absmax = nf4_quantize(linear.weight, block)
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return nf4_dequantize(self.packed, self.absmax, (self.out_features, self.in_features), dtype, self.block)

    def forward(self, x: Tensor) -> Tensor:
        # The dense weight lives only for this call: the resident copy is the 4-bit one.
        y = _NF4Matmul.apply(x, self) if torch.is_grad_enabled() and x.requires_grad else \
            F.linear(x, self.weight(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def storage_bytes(self) -> int:
        return self.packed.numel() + 4 * self.absmax.numel()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}"


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the linear-like layers inside the decoder blocks (not embeddings/lm_head)."""
    from spallm_ext.convert import find_blocks
    from spallm_ext.nn import SketchedLinear

    prefix, blocks = find_blocks(model)
    return [(f"{prefix}.{i}.{n}", m) for i, b in enumerate(blocks) for n, m in b.named_modules()
            if isinstance(m, (nn.Linear, NF4Linear, SketchedLinear))]


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


@torch.no_grad()
def quantize_model_nf4(model: nn.Module, block: int = NF4_BLOCK) -> nn.Module:
    """Replace every decoder-block nn.Linear by an NF4Linear, in place (what QLoRA quantizes)."""
    for name, m in decoder_linears(model):
        if isinstance(m, nn.Linear):
            _replace(model, name, NF4Linear(m, block))
    return model


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * x A^T B^T with A [r, in] (Kaiming-uniform) and B [out, r] (zeros),
    so a fresh adapter leaves the model unchanged. The base (dense, NF4 or anything linear) is frozen."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base, self.rank, self.scaling = base, rank, alpha / rank
        for p in base.parameters():
            p.requires_grad_(False)
        dev = next(iter(base.buffers()), None)
        dev = dev.device if dev is not None else next(base.parameters()).device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # nn.Linear's init, as peft does

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scaling


def add_lora(model: nn.Module, rank: int, alpha: float) -> list[nn.Parameter]:
    """Wrap every decoder-block linear (q/k/v/o, gate/up/down for Llama) in a LoRALinear; returns
    the LoRA parameters. Freezing the rest of the model is the caller's job."""
    params = []
    for name, m in decoder_linears(model):
        wrapped = LoRALinear(m, rank, alpha)
        _replace(model, name, wrapped)
        params += [wrapped.lora_A, wrapped.lora_B]
    return params


def lora_params_per_rank(model: nn.Module) -> int:
    """Trainable parameters a rank-1 LoRA on every decoder-block linear would have."""
    return sum(m.in_features + m.out_features for _, m in decoder_linears(model))

"""A small, self-contained Llama decoder layer whose seven projections are swappable.

Used by bench_train.py to time one training step of (a) the SwiGLU MLP block and (b) the whole
decoder layer with each kind of linear layer. It follows Llama-3's structure (pre-norm RMSNorm,
q/k/v/o attention with rotary position embeddings, grouped-query attention, causal SDPA, SwiGLU
MLP, residual adds) and names the projections as transformers does (q_proj, ..., down_proj), so
peft's `target_modules` find them. Written here rather than taken from transformers so the
benchmark does not depend on that library's changing layer API.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# make_linear(in_features, out_features) -> a module mapping [..., in] to [..., out], no bias
LinearFactory = Callable[[int, int], nn.Module]


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float = 500000.0


LLAMA3_8B = LlamaShape(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128)
# Same structure at a size that runs on a CPU in milliseconds. Every in_features (64, 128) is a
# multiple of what a 4-bit sketch with 4 groups per row needs.
TINY = LlamaShape(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and round once, as Llama does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding in the rotate-half convention: pairs (i, i + d/2) rotate together."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class SwiGLU(nn.Module):
    def __init__(self, shape: LlamaShape, make_linear: LinearFactory):
        super().__init__()
        self.gate_proj = make_linear(shape.hidden, shape.intermediate)
        self.up_proj = make_linear(shape.hidden, shape.intermediate)
        self.down_proj = make_linear(shape.intermediate, shape.hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, shape: LlamaShape, make_linear: LinearFactory):
        super().__init__()
        self.shape = shape
        s = shape
        self.q_proj = make_linear(s.hidden, s.heads * s.head_dim)
        self.k_proj = make_linear(s.hidden, s.kv_heads * s.head_dim)
        self.v_proj = make_linear(s.hidden, s.kv_heads * s.head_dim)
        self.o_proj = make_linear(s.heads * s.head_dim, s.hidden)

    def _cos_sin(self, seq: int, device, dtype) -> tuple[Tensor, Tensor]:
        # Recomputed per call: [seq, head_dim] is tiny next to the projections, and it keeps the
        # module free of per-length caches that would blur the memory measurement.
        d = self.shape.head_dim
        inv = 1.0 / (self.shape.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        ang = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv)
        ang = torch.cat((ang, ang), dim=-1)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        s = self.shape
        q = self.q_proj(x).view(b, t, s.heads, s.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        cos, sin = self._cos_sin(t, x.device, q.dtype)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        # Grouped-query attention by repeating K/V heads (what transformers' repeat_kv does):
        # SDPA's enable_gqa flag is not taken by every fused backend, and a fallback to the math
        # backend would need a [heads, t, t] score matrix at t = 8192.
        rep = s.heads // s.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, s.heads * s.head_dim))


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then h + mlp(norm(h)): one Llama decoder layer."""

    def __init__(self, shape: LlamaShape, make_linear: LinearFactory, device=None, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden, device=device, dtype=dtype)
        self.self_attn = Attention(shape, make_linear)
        self.post_attention_layernorm = RMSNorm(shape.hidden, device=device, dtype=dtype)
        self.mlp = SwiGLU(shape, make_linear)

    def forward(self, x: Tensor) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x))
        return h + self.mlp(self.post_attention_layernorm(h))


def build_block(kind: str, shape: LlamaShape, make_linear: LinearFactory, device=None,
                dtype=torch.bfloat16) -> nn.Module:
    """'mlp': the SwiGLU MLP alone (gate/up/down); 'layer': a full decoder layer."""
    if kind == "mlp":
        return SwiGLU(shape, make_linear)
    if kind == "layer":
        return DecoderLayer(shape, make_linear, device=device, dtype=dtype)
    raise ValueError(f"unknown block {kind!r} (expected 'mlp' or 'layer')")


def swap_linears(block: nn.Module, convert: Callable[[str, nn.Module], nn.Module]) -> nn.Module:
    """Replace every projection (by name, see PROJECTIONS) with convert(name, old) in place."""
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if name in PROJECTIONS:
                setattr(parent, name, convert(name, child))
    return block

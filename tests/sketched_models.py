"""Small sketched models shared by the training, multi-adapter and distributed tests.

The tiny Llama needs `transformers` (part of the test extra); without it these tests fail with
models.py's install hint rather than skip, since training on a real architecture is the point.
"""
from __future__ import annotations

import torch
from torch import nn

from spallm_ext import SketchedLinear
from spallm_ext.models import tiny_llama

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def sketch_linears(model: nn.Module, bits: int = 4, groups_per_row: int = 2) -> nn.Module:
    """Replace every nn.Linear inside the decoder blocks by SketchedLinear.from_linear (data-free
    Lloyd); embeddings and lm_head stay dense, as sketch_model leaves them."""
    for block in model.model.layers:
        for name, mod in list(block.named_modules()):
            if isinstance(mod, nn.Linear) and not isinstance(mod, SketchedLinear):
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, child, SketchedLinear.from_linear(mod, bits=bits, groups_per_row=groups_per_row))
    return model


def tiny_sketched_llama(seed: int = 0, bits: int = 4, groups_per_row: int = 2, **config) -> nn.Module:
    """A tiny random Llama with sketched projections, LUTs trainable and everything else frozen."""
    model = sketch_linears(tiny_llama(seed=seed, **{**TINY, **config}), bits, groups_per_row)
    lut_only(model)
    return model


def lut_only(model: nn.Module) -> list[nn.Parameter]:
    """The LUT-only recipe: freeze every parameter but the LUTs the forward reads (a layer's LUT
    stack when it has one, else its lut); returns them."""
    for p in model.parameters():
        p.requires_grad_(False)
    train = []
    for m in model.modules():
        if isinstance(m, SketchedLinear):
            p = m.lut if m.lut_stack is None else m.lut_stack
            p.requires_grad_(True)
            train.append(p)
    return train


def lut_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def token_batch(batch: int, length: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    """Learnable token ids: each sequence counts up from a random start with a random stride, so a
    model can lower its loss on them within a few steps."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    stride = torch.randint(1, 4, (batch, 1), generator=gen)
    return (start + stride * torch.arange(length)) % vocab

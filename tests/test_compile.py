"""torch.compile(fullgraph=True) of SketchedLinear, forward and backward, against eager."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import spallm_ext

from conftest import DEVICES, assert_close_rel, randn


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = spallm_ext.SketchedLinear(24, 16, bits=3, groups_per_row=3, bias=True, train_bias=True)
        self.b = spallm_ext.SketchedLinear(16, 8, bits=4, groups_per_row=2, bias=False)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


def _grads(mod, x, fn=None):
    x = x.clone().requires_grad_(True)
    y = (mod if fn is None else fn)(x)
    (y.float() ** 2).sum().backward()
    grads = {name: p.grad.clone() for name, p in mod.named_parameters() if p.requires_grad}
    return y.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_forward_backward(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _Block().to(device)
    compiled_mod = _Block().to(device)
    compiled_mod.load_state_dict(eager.state_dict())
    # Inductor works on CPU here (it needs a C++ compiler, which the test machines have).
    compiled = torch.compile(compiled_mod, fullgraph=True, backend="inductor")
    x = randn(2, 5, 24, device=device, seed=1)

    y_e, dx_e, g_e = _grads(eager, x)
    y_c, dx_c, g_c = _grads(compiled_mod, x, compiled)
    assert_close_rel(y_c, y_e)
    assert_close_rel(dx_c, dx_e)
    assert set(g_c) == set(g_e) == {"a.lut", "a.bias", "b.lut"}
    for name in g_e:
        assert_close_rel(g_c[name], g_e[name])
    # frozen codes are buffers: untouched, no grad
    assert torch.equal(compiled_mod.a.codes, eager.a.codes)
    # a second call with another token count goes through the (possibly recompiled) graph too
    y2 = compiled(randn(7, 24, device=device, seed=2))
    assert_close_rel(y2, eager(randn(7, 24, device=device, seed=2)).detach())

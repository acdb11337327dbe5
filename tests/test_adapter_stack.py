"""Module-level multi-adapter serving and training (spallm_ext.multi_adapter): a stack of LUT sets
per SketchedLinear, chosen per sequence or per token, against running each adapter on its own."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import spallm_ext
from spallm_ext import SketchedLinear, adapter_luts, adapter_names, stack_adapters, use_adapters
from spallm_ext.adapters import load_adapter, save_adapter, sketched_modules
from spallm_ext import reference

from conftest import DEVICES, assert_close_rel, randn
from sketched_models import lut_only, tiny_sketched_llama, token_batch


def _adapter_state(model, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"{n}.lut": m.lut.detach() + scale * torch.randn(m.lut.shape, generator=gen)
            for n, m in sketched_modules(model).items()}


def _with_luts(model, state):
    """A copy of `model` whose own LUTs are `state` (one adapter, the plain single-LUT path)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for n, m in sketched_modules(other).items():
            m.lut.copy_(state[f"{n}.lut"])
    return other


def _sum_loss(model, ids):
    # summed over tokens, so a batch's gradient is exactly the sum of its sequences' gradients
    logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = tiny_sketched_llama(seed=0)
    states = {"math": _adapter_state(model, 1), "chat": _adapter_state(model, 2)}
    path = tmp_path_factory.mktemp("adapters") / "chat.safetensors"
    save_adapter(_with_luts(model, states["chat"]), path, name="chat")
    base = {f"{n}.lut": m.lut.detach().clone() for n, m in sketched_modules(model).items()}
    names = stack_adapters(model, {"math": states["math"], "chat": path})
    return model, {"base": base, **states}, names


def test_stack_layout(served):
    model, states, names = served
    assert names == ["base", "math", "chat"] == adapter_names(model)
    for n, m in sketched_modules(model).items():
        assert m.lut_stack.shape == (3, *m.lut.shape) and m.lut_stack.dtype == m.lut.dtype
        assert m.lut_stack.requires_grad and not m.lut.requires_grad   # trainability moved to the stack
        for a, name in enumerate(names):
            assert torch.equal(m.lut_stack[a], states[name][f"{n}.lut"])   # file round trip is exact
        assert "adapters=3" in repr(m)
    for a, name in enumerate(names):
        got = adapter_luts(model, name)
        assert set(got) == set(states[name]) and all(torch.equal(got[k], states[name][k]) for k in got)


def test_serving_per_sequence_and_per_token(served):
    model, states, names = served
    ids = token_batch(4, 9, seed=3)
    order = [2, 0, 1, 2]
    with torch.no_grad():
        want = torch.cat([_with_luts(model, states[names[a]])(ids[i:i + 1]).logits for i, a in enumerate(order)])
        plain = model(ids).logits
        with use_adapters(model, torch.tensor(order)):           # one entry per sequence
            per_seq = model(ids).logits
        with use_adapters(model, [names[a] for a in order]):     # the same by name
            by_name = model(ids).logits
        with use_adapters(model, torch.tensor(order)[:, None].expand(4, 9).contiguous()):  # per token
            per_tok = model(ids).logits
        with use_adapters(model, "math"):                        # one adapter for all
            all_math = model(ids).logits
        after = model(ids).logits
    for got in (per_seq, by_name, per_tok):
        assert_close_rel(got, want)
    assert_close_rel(all_math, _with_luts(model, states["math"])(ids).logits.detach())
    # outside the context each layer reads its own lut (the base) again
    assert torch.equal(after, plain)
    assert_close_rel(plain, _with_luts(model, states["base"])(ids).logits.detach())


def test_generate_with_per_sequence_adapters(served):
    """KV-cached generation: prefill sees [B, T, K], each decode step [B, 1, K]; one index per
    sequence fits both."""
    model, states, names = served
    ids = token_batch(2, 5, seed=4)
    with torch.no_grad(), use_adapters(model, torch.tensor([1, 2])):
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    for i, a in enumerate([1, 2]):
        alone = _with_luts(model, states[names[a]]).generate(ids[i:i + 1], max_new_tokens=4, do_sample=False)
        assert torch.equal(out[i:i + 1], alone)


@pytest.mark.parametrize("device", DEVICES)
def test_per_token_mixing_in_one_layer(device):
    """Tokens of one sequence on different adapters: the layer equals the op reference."""
    torch.manual_seed(0)
    layer = SketchedLinear(32, 12, bits=3, groups_per_row=4, bias=True).to(device)
    stack_adapters(layer, {"b": {"lut": layer.lut.detach() * 1.5}, "c": {"lut": layer.lut.detach() - 0.1}})
    x = randn(2, 5, 32, device=device, seed=1)
    idx = torch.tensor([[0, 1, 2, 1, 0], [2, 2, 0, 1, 1]], device=device)
    with use_adapters(layer, idx):
        y = layer(x)
    assert_close_rel(y.detach(), reference.lut_linear(x, layer.codes, layer.lut_stack.detach(), layer.bias.detach(), idx))


def test_training_mixed_batch_equals_training_each_alone():
    """Gradients and a few SGD-with-momentum steps on a batch mixing three adapters equal
    training each adapter alone on its own sequences."""
    model = tiny_sketched_llama(seed=1)
    states = {"a": _adapter_state(model, 5), "b": _adapter_state(model, 6)}
    alone = {name: _with_luts(model, st) for name, st in
             {"base": {f"{n}.lut": m.lut.detach().clone() for n, m in sketched_modules(model).items()},
              **states}.items()}
    names = stack_adapters(model, states)
    params = lut_only(model)
    assert {p.shape[0] for p in params} == {3}
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    opts = {k: torch.optim.SGD(lut_only(m), lr=1e-3, momentum=0.9) for k, m in alone.items()}
    for step in range(3):
        ids = token_batch(6, 8, seed=10 + step)
        index = torch.tensor([0, 1, 2, 2, 1, 0]).roll(step)
        opt.zero_grad()
        with use_adapters(model, index):
            _sum_loss(model, ids).backward()
        for a, name in enumerate(names):
            opts[name].zero_grad()
            _sum_loss(alone[name], ids[index == a]).backward()
        for n, m in sketched_modules(model).items():
            assert m.lut.grad is None   # the base lut is not read inside use_adapters
            for a, name in enumerate(names):
                assert_close_rel(m.lut_stack.grad[a], alone[name].get_submodule(n).lut.grad, factor=10)
        opt.step()
        for o in opts.values():
            o.step()
    for n, m in sketched_modules(model).items():
        for a, name in enumerate(names):
            assert_close_rel(m.lut_stack.detach()[a], alone[name].get_submodule(n).lut.detach())


def test_unused_adapter_gets_zero_gradient():
    model = tiny_sketched_llama(seed=2)
    stack_adapters(model, {"a": _adapter_state(model, 1), "b": _adapter_state(model, 2)})
    lut_only(model)
    with use_adapters(model, torch.tensor([0, 2, 2])):
        _sum_loss(model, token_batch(3, 6)).backward()
    for m in sketched_modules(model).values():
        g = m.lut_stack.grad
        assert not g[1].any() and g[0].abs().sum() > 0 and g[2].abs().sum() > 0


def test_save_stacked_adapter_and_unstack(tmp_path):
    model = tiny_sketched_llama(seed=3)
    before = {n: m.lut.detach().clone() for n, m in sketched_modules(model).items()}
    state = _adapter_state(model, 7)
    stack_adapters(model, {"task": state})
    path = spallm_ext.save_stacked_adapter(model, "task", tmp_path / "task.safetensors")
    for n, m in sketched_modules(model).items():
        assert torch.equal(m.lut, before[n])            # saving a row leaves lut alone
    fresh = copy.deepcopy(model)
    spallm_ext.unstack_adapters(fresh)
    meta = load_adapter(fresh, path)                     # the ordinary loader accepts it
    assert meta["name"] == "task"
    for n, m in sketched_modules(fresh).items():
        assert torch.equal(m.lut, state[f"{n}.lut"]) and m.lut_stack is None
    assert adapter_names(fresh) == [] and set(fresh.state_dict()) == set(_with_luts(fresh, state).state_dict())
    spallm_ext.unstack_adapters(model, keep="task")
    for n, m in sketched_modules(model).items():
        assert torch.equal(m.lut, state[f"{n}.lut"]) and m.lut_stack is None and m.adapter_index is None
        assert m.lut.requires_grad   # given back by unstack_adapters
    with pytest.raises(RuntimeError, match="nothing to unstack"):
        spallm_ext.unstack_adapters(model)


def test_plain_layer_unchanged_by_the_stack_api():
    """Backwards compatibility: no stack means the old state dict and the old forward."""
    torch.manual_seed(0)
    layer = SketchedLinear(16, 8, bits=4, groups_per_row=2)
    assert set(layer.state_dict()) == {"codes", "lut", "bias"}
    assert [n for n, _ in layer.named_parameters()] == ["lut", "bias"]
    x = randn(3, 16, seed=1)
    assert torch.equal(layer(x), spallm_ext.lut_linear(x, layer.codes, layer.lut, layer.bias))
    # a module pickled before stacks existed has neither attribute; its forward still works
    del layer.adapter_index
    del layer._parameters["lut_stack"]
    assert torch.equal(layer(x), spallm_ext.lut_linear(x, layer.codes, layer.lut, layer.bias))


def test_bad_input_names_the_argument(served, tmp_path):
    model, states, names = served
    ids = token_batch(3, 4)
    with pytest.raises(ValueError, match=r"index values must lie in \[0, 3\).*found 3"):
        with use_adapters(model, torch.tensor([0, 3, 1])):
            pass
    with pytest.raises(ValueError, match=r"index values.*found -1"):
        with use_adapters(model, torch.tensor([0, -1, 1])):
            pass
    with pytest.raises(TypeError, match="index must be an int64 or int32 tensor"):
        with use_adapters(model, torch.tensor([0.0, 1.0, 1.0])):
            pass
    with pytest.raises(ValueError, match=r"index\[1\]: no adapter named 'nope'"):
        with use_adapters(model, ["math", "nope", "chat"]):
            pass
    with pytest.raises(ValueError, match=r"index must lie in \[0, 3\), got 7"):
        with use_adapters(model, 7):
            pass
    with pytest.raises(ValueError, match=r"index .* has 2 entries .* one per sequence \(3\) or one per token \(12\)"):
        with torch.no_grad(), use_adapters(model, torch.tensor([0, 1])):
            model(ids)
    assert all(m.adapter_index is None for m in sketched_modules(model).values())   # restored on error
    # adapters made for other codes, or of the wrong shape
    other = tiny_sketched_llama(seed=9)
    path = save_adapter(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"adapters\['x'\].*other codes"):
        stack_adapters(model, {"x": path})
    with pytest.raises(ValueError, match=r"adapters\['x'\] is a model with other codes"):
        stack_adapters(model, {"x": other})
    with pytest.raises(FileNotFoundError, match=r"adapters\['x'\]"):
        stack_adapters(model, {"x": tmp_path / "missing.safetensors"})
    bad = dict(states["math"])
    key = next(iter(bad))
    bad[key] = bad[key][:, :1]
    with pytest.raises(ValueError, match=r"adapters\['x'\]\[.*\] has shape"):
        stack_adapters(model, {"x": bad})
    with pytest.raises(ValueError, match=r"adapters\['x'\] has no LUT for module"):
        stack_adapters(model, {"x": {key: states["math"][key]}})
    with pytest.raises(ValueError, match="names must be unique"):
        stack_adapters(model, {"base": states["math"]})
    with pytest.raises(TypeError, match="adapters must be a mapping"):
        stack_adapters(model, [states["math"]])
    # the failed calls above left the stacks as they were
    assert adapter_names(model) == names
    fresh = tiny_sketched_llama(seed=0)
    with pytest.raises(RuntimeError, match="stack_adapters"):
        with use_adapters(fresh, 0):
            pass


def test_compile_fullgraph_with_adapters():
    """use_adapters under torch.compile(fullgraph=True): per-sequence, per-token and one-adapter
    indices trace (one graph each), and outputs and stack gradients match eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(SketchedLinear(32, 16, bits=4, groups_per_row=2), torch.nn.GELU(),
                              SketchedLinear(16, 8, bits=3, groups_per_row=2))
    stack_adapters(net, {"b": {f"{i}.lut": net[i].lut.detach() * 1.3 for i in (0, 2)}})
    eager = copy.deepcopy(net)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    x = randn(3, 5, 32, seed=1)

    def run(mod, fn, idx):
        mod.zero_grad(set_to_none=True)
        with use_adapters(mod, idx):
            y = fn(x)
            y.square().sum().backward()
        return y.detach(), [mod[i].lut_stack.grad for i in (0, 2)]

    for idx in (torch.tensor([0, 1, 1]), torch.tensor([[0, 1, 0, 1, 1]] * 3), "b"):
        y_c, g_c = run(net, compiled, idx)
        y_e, g_e = run(eager, eager, idx)
        assert_close_rel(y_c, y_e)
        for a, b in zip(g_c, g_e):
            assert_close_rel(a, b)


def test_index_forms_on_a_single_layer():
    """A 0-dim index is one adapter for all; a submodule of a stacked model can be driven alone."""
    model = tiny_sketched_llama(seed=4)
    stack_adapters(model, {"a": _adapter_state(model, 1)})
    layer = model.model.layers[0].mlp.up_proj
    x = randn(2, 3, layer.in_features, seed=2)
    with torch.no_grad():
        with use_adapters(layer, torch.tensor(1)):
            y0 = layer(x)
        with use_adapters(layer, torch.tensor([1, 1])):
            y1 = layer(x)
    assert torch.equal(y0, spallm_ext.lut_linear(x, layer.codes, layer.lut_stack[1].detach()))
    assert_close_rel(y1, y0)
    with pytest.raises(ValueError, match=r"index must lie in \[0, 2\), got 2"):
        with use_adapters(layer, torch.tensor(2)):
            pass

"""LUT-only training of sketched models: deterministic gradients, gradient checkpointing,
autocast, torch.compile of a training step, a short fine-tune whose loss falls, and that only the
LUTs move. Each compares against the plain eager fp32 run (or the reference) it must reproduce."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import spallm_ext
from spallm_ext import SketchedLinear, kernels, ops, reference
from spallm_ext.adapters import sketched_modules
from spallm_ext.models import tiny_llama

from conftest import DEVICES, HAS_CUDA, assert_close_rel, randn
from sketched_models import TINY, lut_grads, lut_only, tiny_sketched_llama, token_batch


def _loss(model, ids):
    logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


@pytest.fixture
def restore_deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    spallm_ext.set_deterministic(False)
    torch.use_deterministic_algorithms(before)


# --- deterministic mode ------------------------------------------------------------------------

class _RecordLutGrad(TorchDispatchMode):
    """Records the `deterministic` argument of every spallm::lut_grad call (backward included) and,
    for spallm ops on CUDA, (op, the path it ran). The plan is read in the thread that ran the op:
    a CUDA backward runs on autograd's device thread, whose last_cuda_plan() is not the caller's."""

    def __init__(self):
        super().__init__()
        self.flags = []
        self.cuda_paths = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.spallm.lut_grad.default:
            self.flags.append(bool(args[7]) if len(args) > 7 else bool(kwargs.get("deterministic", False)))
        out = func(*args, **kwargs)
        name = func._schema.name
        if name.startswith("spallm::") and isinstance(out, torch.Tensor) and out.is_cuda:
            self.cuda_paths.append((name.removeprefix("spallm::"), kernels.last_cuda_plan().split()[0]))
        return out


def test_deterministic_switches_reach_the_backward(restore_deterministic):
    torch.use_deterministic_algorithms(False)
    layer = SketchedLinear(16, 8, bits=4, groups_per_row=2)
    x = randn(3, 16, seed=1)

    def backward_flags():
        with _RecordLutGrad() as rec:
            layer(x).square().sum().backward()
        return rec.flags

    assert not ops.deterministic_grads() and backward_flags() == [False]
    spallm_ext.set_deterministic(True)
    assert ops.deterministic_grads() and backward_flags() == [True]
    spallm_ext.set_deterministic(False)
    assert not ops.deterministic_grads()
    torch.use_deterministic_algorithms(True)
    assert ops.deterministic_grads() and backward_flags() == [True]
    torch.use_deterministic_algorithms(False)
    assert not ops.deterministic_grads() and backward_flags() == [False]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("switch", ["set_deterministic", "torch"])
def test_deterministic_lut_grads_bit_identical(device, switch, restore_deterministic):
    """Repeated backward passes (single LUT and a multi-adapter stack) give bit-identical LUT
    gradients, which also match the fp64 reference."""
    if switch == "torch":
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        spallm_ext.set_deterministic(True)
    torch.manual_seed(0)
    # On CUDA, bf16 activations and groups of 1024 columns: lut_grad runs on tensor cores with 16
    # column tiles adding into every bucket (float atomics unless deterministic); fp32 activations
    # would take the simple kernel, deterministic in any mode.
    cuda = device == "cuda"
    k, groups = (1024, 1) if cuda else (64, 4)
    layer = SketchedLinear(k, 48, bits=3, groups_per_row=groups).to(device)
    spallm_ext.stack_adapters(layer, {"b": {"lut": layer.lut.detach() * 0.5}})
    layer.lut.requires_grad_(True)   # both paths train here: the plain lut and the stack
    x = randn(4, 33, k, device=device, seed=1, dtype=torch.bfloat16 if cuda else torch.float32)
    idx = torch.randint(0, 2, (4, 33), generator=torch.Generator().manual_seed(2)).to(device)
    runs = []
    for _ in range(3):
        layer.zero_grad(set_to_none=True)
        with _RecordLutGrad() as rec:
            layer(x).square().sum().backward()
            with spallm_ext.use_adapters(layer, idx):
                layer(x).square().sum().backward()
        runs.append((layer.lut.grad.clone(), layer.lut_stack.grad.clone()))
        assert rec.flags and all(rec.flags)
        if cuda:
            grads = [path for op, path in rec.cuda_paths if op == "lut_grad"]
            assert grads and set(grads) == {"mma"}, rec.cuda_paths
    for lut_g, stack_g in runs[1:]:
        assert torch.equal(lut_g, runs[0][0]) and torch.equal(stack_g, runs[0][1])
    y = layer(x).detach()
    assert_close_rel(runs[0][0], reference.lut_grad(2 * y, x, layer.codes, groups, 8), torch.float32, factor=2)


# --- gradient checkpointing --------------------------------------------------------------------

class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = SketchedLinear(32, 64, bits=4, groups_per_row=2, bias=True, train_bias=True)
        self.down = SketchedLinear(64, 32, bits=2, groups_per_row=4, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


def _count_forwards(module: nn.Module) -> list[int]:
    count = [0]
    # a pre-hook: non-reentrant checkpointing stops its recompute as soon as the last saved
    # tensor exists, which is inside the last layer's forward, before forward hooks would run
    module.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def test_torch_checkpoint_same_grads():
    torch.manual_seed(0)
    plain = nn.Sequential(_Mlp(), _Mlp())
    ckpt = copy.deepcopy(plain)
    calls = _count_forwards(ckpt[0].up)
    x = randn(3, 7, 32, seed=1)
    xp, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    plain(xp).square().sum().backward()
    h = checkpoint(ckpt[0], xc, use_reentrant=False)
    checkpoint(ckpt[1], h, use_reentrant=False).square().sum().backward()
    assert calls[0] == 2   # the forward was recomputed in the backward
    g_p, g_c = lut_grads(plain), lut_grads(ckpt)
    assert set(g_p) == set(g_c) == {f"{i}.{n}" for i in (0, 1) for n in ("up.lut", "up.bias", "down.lut")}
    for n in g_p:
        assert torch.equal(g_c[n], g_p[n]), n
    assert torch.equal(xc.grad, xp.grad)


def _enable_hf_checkpointing(model, use_reentrant: bool):
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):    # transformers >= 5 names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_hf_gradient_checkpointing_same_lut_grads(use_reentrant):
    """A tiny Llama sketched with sketch_model, trained LUT-only with transformers' own
    checkpointing switch: the same LUT gradients as without it."""
    model = tiny_llama(seed=0, **TINY)
    spallm_ext.sketch_model(model, spallm_ext.SketchConfig(bits=4, groups_per_row=2),
                            token_batch(4, 16, seed=9), device="cpu", progress=False)
    lut_only(model)
    plain = copy.deepcopy(model).train()
    model.train()
    _enable_hf_checkpointing(model, use_reentrant)
    calls = _count_forwards(sketched_modules(model)["model.layers.0.mlp.down_proj"])
    ids = token_batch(3, 12, seed=1)
    _loss(plain, ids).backward()
    _loss(model, ids).backward()
    assert calls[0] == 2, "checkpointing did not recompute the block"
    g_p, g_c = lut_grads(plain), lut_grads(model)
    assert set(g_p) == set(g_c) == {n + ".lut" for n in sketched_modules(model)}
    for n in g_p:
        assert_close_rel(g_c[n], g_p[n], factor=0.1)


# --- autocast ------------------------------------------------------------------------------------

def test_autocast_bf16_training_step_cpu():
    """Under torch.autocast(bf16) the sketched layers compute in bf16, the LUTs and their grads
    stay fp32, and one optimizer step lands within bf16 tolerance of the fp32 step. (SGD, whose
    update is proportional to the gradient: Adam's first update is about lr * sign(grad), which
    turns any rounding of a near-zero gradient into a full-size difference.)"""
    fp32 = tiny_sketched_llama(seed=4).train()
    amp = copy.deepcopy(fp32)
    out_dtypes = set()
    for m in sketched_modules(amp).values():
        m.register_forward_hook(lambda mod, args, out: out_dtypes.add(out.dtype))
    ids = token_batch(4, 12, seed=2)
    opt32 = torch.optim.SGD(lut_only(fp32), lr=0.1)
    opt16 = torch.optim.SGD(lut_only(amp), lr=0.1)
    loss32 = _loss(fp32, ids)
    loss32.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = _loss(amp, ids)
    loss16.backward()
    assert out_dtypes == {torch.bfloat16}
    assert abs(loss16.item() - loss32.item()) < 1e-2 * abs(loss32.item())
    g32, g16 = lut_grads(fp32), lut_grads(amp)
    assert set(g16) == set(g32) == {n + ".lut" for n in sketched_modules(amp)}
    for n in g32:
        assert_close_rel(g16[n], g32[n], torch.bfloat16, factor=2)    # fp32 grads, bf16 error
    before = {n: p.detach().clone() for n, p in amp.named_parameters() if p.requires_grad}
    opt32.step()
    opt16.step()
    for (n, p32), p16 in zip(fp32.named_parameters(), amp.parameters()):
        if p32.requires_grad:
            assert p16.dtype == torch.float32
            assert_close_rel(p16.detach() - before[n], p32.detach() - before[n], torch.bfloat16, factor=2)


# --- torch.compile ------------------------------------------------------------------------------

def _train_step(params, opt, opt_step, loss_fn, ids):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(ids)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt_step()
    return loss.detach()


def test_compiled_training_steps_match_eager():
    """Three LUT-only AdamW steps with grad clipping: forward + loss compiled with
    fullgraph=True (AOTAutograd compiles the backward with it) and a compiled optimizer step,
    against the same steps in eager mode."""
    torch._dynamo.reset()
    eager = tiny_sketched_llama(seed=5, num_hidden_layers=1).train()
    compiled = copy.deepcopy(eager)
    start = {n: t.clone() for n, t in compiled.state_dict().items()}
    params_e, params_c = lut_only(eager), lut_only(compiled)
    opt_e = torch.optim.AdamW(params_e, lr=1e-2, weight_decay=0.0)
    opt_c = torch.optim.AdamW(params_c, lr=1e-2, weight_decay=0.0)
    loss_c = torch.compile(lambda ids: _loss(compiled, ids), fullgraph=True, backend="inductor")
    # torch.optim breaks the graph around step() on purpose (no_grad), so no fullgraph here
    step_c = torch.compile(opt_c.step, backend="inductor")
    for step in range(3):
        ids = token_batch(2, 8, seed=20 + step)
        l_e = _train_step(params_e, opt_e, opt_e.step, lambda i: _loss(eager, i), ids)
        l_c = _train_step(params_c, opt_c, step_c, loss_c, ids)
        assert_close_rel(l_c, l_e)
        for p_c, p_e in zip(params_c, params_e):
            assert_close_rel(p_c.grad, p_e.grad, factor=10)
    after = compiled.state_dict()
    for n, t in after.items():
        if n.endswith(".lut"):
            assert not torch.equal(t, start[n]), f"{n} did not train"
            # Adam's first steps are close to lr * sign(grad), so rounding differences in the
            # gradient stay far below one step (1e-2)
            assert (t - eager.state_dict()[n]).abs().max() < 1e-4, n
        else:
            assert torch.equal(t, start[n]), f"frozen {n} changed"


# --- a short fine-tune --------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_lut_only_finetune_loss_falls(device):
    model = tiny_sketched_llama(seed=0).to(device).train()
    params = lut_only(model)
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    ids = token_batch(8, 16, seed=0).to(device)
    losses = []
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.92 * losses[0], losses
    assert min(losses[-5:]) < min(losses[:5]), losses


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_lut_only_finetune_on_tensor_cores_cuda():
    """The short fine-tune at shapes the tensor-core kernels take (groups of 128 and 256 columns,
    128 tokens) under bf16 autocast: the forward, dx and LUT gradients run on the mma kernels, and
    the loss falls as it does on the exact kernels."""
    model = tiny_sketched_llama(seed=0, hidden_size=256, intermediate_size=512).cuda().train()
    params = lut_only(model)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    ids = token_batch(8, 16, seed=0).cuda()
    losses = []
    for step in range(20):
        opt.zero_grad(set_to_none=True)
        with _RecordLutGrad() as rec:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(ids, labels=ids).loss
            loss.backward()
        if step == 0:
            ran = set(rec.cuda_paths)
            assert {op for op, _ in ran} == {"lut_linear", "lut_linear_dx", "lut_grad"}, ran
            assert {path for _, path in ran} == {"mma"}, ran
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in params)
    assert losses[-1] < 0.92 * losses[0], losses
    assert min(losses[-5:]) < min(losses[:5]), losses


def test_only_luts_change():
    """The LUT-only recipe, with the optimizer handed every parameter (as a careless script
    would) and weight decay on: codes, frozen biases, norms, embeddings and lm_head stay
    bit-identical, frozen parameters never get a gradient, and every LUT moves."""
    model = tiny_sketched_llama(seed=6, attention_bias=True, mlp_bias=True).train()
    assert all(m.bias is not None and not m.bias.requires_grad for m in sketched_modules(model).values())
    before = {n: t.clone() for n, t in model.state_dict().items()}
    lut_only(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        ids = token_batch(4, 10, seed=step)
        model(ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    after = model.state_dict()
    assert set(after) == set(before)
    luts = {n for n in after if n.endswith(".lut")}
    assert len(luts) == 14 and any(n.endswith(".codes") for n in after)
    for n, t in after.items():
        if n in luts:
            assert not torch.equal(t, before[n]), f"{n} did not train"
        else:
            assert torch.equal(t, before[n]), f"{n} changed"
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in luts), n

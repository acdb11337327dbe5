"""The fine-tuning example (examples/finetune.py) on a tiny random Llama and a synthetic task:
every method trains (loss falls) and changes only its own parameters; the NF4 quantizer is exact
on its levels and bounded elsewhere. No real model, no download; a few seconds on a CPU."""
from __future__ import annotations

import os
import sys

import pytest
import torch


sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import spallm_ext  # noqa: E402
from spallm_ext.models import ByteTokenizer, tiny_llama  # noqa: E402

import ft_core  # noqa: E402
from ft_nf4 import NF4_LEVELS, NF4Linear, LoRALinear, nf4_dequantize, nf4_quantize, quantize_model_nf4  # noqa: E402
from ft_tasks import Batches, synthetic  # noqa: E402


# A wider init than Llama's 0.02: with the tied embedding / lm_head frozen, logits of a 0.02-init
# tiny model can barely leave uniform whatever the adapters do, and the test would measure nothing.
INIT = 0.1


def base_model(method: str):
    model = tiny_llama(seed=0, initializer_range=INIT)
    if ft_core.BASE_OF[method] == "sketch":
        calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
        spallm_ext.sketch_model(model, spallm_ext.SketchConfig(bits=4, groups_per_row=1), calib,
                                device="cpu", progress=False)
    elif ft_core.BASE_OF[method] == "nf4":
        quantize_model_nf4(model)
    return model


def snapshot(model):
    return {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}


# Rates far above the real runs': a random tiny model has to move a lot within 40 steps
LR = {"spallm": 1e-2, "spallm_bf16lut": 1e-2, "lora": 1e-2, "qlora": 1e-2}
TRAINS = {"spallm": (".lut",), "spallm_bf16lut": (".lut",), "lora": (".lora_A", ".lora_B"),
          "qlora": (".lora_A", ".lora_B")}


@pytest.mark.parametrize("method", ft_core.METHODS)
def test_method_trains_only_its_parameters(method):
    torch.manual_seed(0)
    model = base_model(method)
    params = ft_core.prepare(model, method, lora_rank=4)
    tok = ByteTokenizer(256)
    task = synthetic()
    before = snapshot(model)
    res = ft_core.train(model, params, Batches(tok, task, 16, seed=0, max_len=32), steps=40,
                        lr=LR[method], warmup=2, log_every=5)
    first, last = res["losses"][:5], res["losses"][-5:]
    assert sum(last) / 5 < 0.7 * sum(first) / 5, res["curve"]

    after = snapshot(model)
    assert set(after) == set(before)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    intended = {n for n in after if n.endswith(TRAINS[method])}
    assert changed and changed <= intended, sorted(changed - intended)[:5]
    assert ft_core.count(params) == sum(after[n].numel() for n in intended)
    if method.startswith("spallm"):
        dtype = torch.bfloat16 if method == "spallm_bf16lut" else torch.float32
        assert all(p.dtype == dtype for p in params)
        assert all(n.endswith(".codes") is False for n in changed)   # codes stay frozen
    else:
        assert {n for n in changed if n.endswith(".lora_B")}          # B left zero would mean no adapter

    ev = ft_core.evaluate(model, tok, task, batch_size=8)
    assert ev["heldout_loss"] < 5.0 and 0.0 <= ev["accuracy"] <= 1.0


def test_bf16_luts_lose_small_updates():
    """The reason for the fp32 master copy: at a small rate, most bf16 LUT entries cannot move."""
    tok, task = ByteTokenizer(256), synthetic()
    lost = {}
    for method in ("spallm", "spallm_bf16lut"):
        torch.manual_seed(0)
        model = base_model(method)
        params = ft_core.prepare(model, method)
        res = ft_core.train(model, params, Batches(tok, task, 8, seed=0, max_len=32), steps=4,
                            lr=2e-5, warmup=1, log_every=2)
        lost[method] = ft_core.mean(r["lost_frac"] for r in res["lost_updates"])
    assert lost["spallm"] < 0.01 and lost["spallm_bf16lut"] > 0.5, lost


def test_nf4_levels_and_round_trip():
    assert NF4_LEVELS.shape == (16,) and torch.all(NF4_LEVELS[1:] > NF4_LEVELS[:-1])
    assert NF4_LEVELS[0] == -1 and NF4_LEVELS[7] == 0 and NF4_LEVELS[15] == 1
    assert abs(float(NF4_LEVELS[1]) + 0.6962) < 1e-3      # QLoRA's published second level

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g) * 0.05
    packed, absmax = nf4_quantize(w)
    assert packed.dtype == torch.uint8 and packed.numel() == w.numel() // 2
    assert absmax.numel() == w.numel() // 64
    codes = torch.stack([packed >> 4, packed & 0xF], 1)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    back = nf4_dequantize(packed, absmax, w.shape)
    # every value is within half the widest gap between neighbouring levels, times its block's absmax
    half_gap = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max()) / 2
    err = (back - w).abs().reshape(-1, 64) / absmax[:, None]
    assert float(err.max()) <= half_gap + 1e-6
    assert float((back - w).norm() / w.norm()) < 0.12
    # the largest magnitude of each block and exact zeros survive exactly
    flat, bflat = w.reshape(-1, 64), back.reshape(-1, 64)
    i = flat.abs().argmax(1, keepdim=True)
    assert torch.allclose(flat.gather(1, i), bflat.gather(1, i), rtol=1e-6, atol=0)
    # values already on the grid come back bit for bit
    on_grid = NF4_LEVELS[torch.randint(0, 16, (4, 64), generator=g)] * 0.3
    on_grid[:, 0] = 0.3
    assert torch.equal(nf4_dequantize(*nf4_quantize(on_grid), on_grid.shape), on_grid)
    with pytest.raises(ValueError):
        nf4_quantize(torch.randn(10, 10))


def test_nf4_linear_matches_dequantized_matmul_and_lora_starts_at_base():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    q = NF4Linear(lin)
    x = torch.randn(3, 5, 64)
    ref = x @ q.weight().T + lin.bias
    assert torch.allclose(q(x), ref, atol=1e-6)
    xg = x.clone().requires_grad_(True)        # the re-dequantizing backward gives F.linear's dx
    q(xg).square().sum().backward()
    xr = x.clone().requires_grad_(True)
    (xr @ q.weight().T + lin.bias).square().sum().backward()
    assert torch.allclose(xg.grad, xr.grad, atol=1e-5)
    assert q.storage_bytes() < lin.weight.numel()   # < 1 byte per weight (4 bits + absmax)
    wrapped = LoRALinear(q, rank=4, alpha=8)
    assert torch.equal(wrapped(x), q(x))            # B = 0 at the start

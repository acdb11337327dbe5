"""sketch_model with a low-rank branch (SketchConfig.lowrank_*), and save/load of the resulting
LowRankSketchedLinear layers: whole sketches and adapters (safetensors)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="model conversion tests need `transformers` "
                                   "(pip install transformers)")

import spallm_ext  # noqa: E402
from spallm_ext import LowRankSketchedLinear, SketchedLinear  # noqa: E402
from spallm_ext.adapters import (codes_hash, load_adapter, load_sketched, save_adapter, save_sketched,  # noqa: E402
                                 sketched_modules)
from spallm_ext.models import tiny_llama  # noqa: E402
from spallm_ext.sketch import SketchConfig  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def converted():
    model = tiny_llama(seed=0, **TINY)
    calib = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = SketchConfig(bits=2, groups_per_row=2, refit=False, lowrank_rank=8, lowrank_init="eora")
    report = spallm_ext.sketch_model(model, cfg, calib, device="cpu", progress=False)
    return model, report


def test_sketch_model_makes_lowrank_layers(converted):
    model, report = converted
    mods = sketched_modules(model)
    assert len(mods) == 7 and all(isinstance(m, LowRankSketchedLinear) for m in mods.values())
    assert all(m.rank == 8 and m.lowrank_init == "eora" and m.trainable == "both" for m in mods.values())
    for name, info in report.layers.items():
        assert info["rel_err"] <= info["rel_err_sketch"] + 1e-6, (name, info)
    assert sum(i["rel_err"] for i in report.layers.values()) < 0.8 * sum(
        i["rel_err_sketch"] for i in report.layers.values())
    assert model.spallm_sketch_config["lowrank_rank"] == 8


def test_sketch_config_lowrank_validation():
    assert SketchConfig().lowrank_rank == 0                     # default: plain sketches, as before
    with pytest.raises(ValueError, match="lowrank_init"):
        SketchConfig(lowrank_rank=4, lowrank_init="pissa")
    with pytest.raises(ValueError, match="svd' only"):
        SketchConfig(lowrank_rank=4, lowrank_smooth_alpha=0.5)
    with pytest.raises(ValueError, match="lowrank_rank"):
        SketchConfig(lowrank_rank=-1)
    cfg = SketchConfig(lowrank_rank=4, lowrank_init="svd", lowrank_smooth_alpha=0.5, lowrank_trainable="lut")
    assert SketchConfig.from_dict(cfg.to_dict()) == cfg


def test_save_load_sketched_round_trip(converted, tmp_path):
    model, _ = converted
    save_sketched(model, tmp_path / "sk")
    fresh = tiny_llama(seed=1, **TINY)
    load_sketched(fresh, tmp_path / "sk")
    a, b = sketched_modules(model), sketched_modules(fresh)
    assert set(a) == set(b) and codes_hash(fresh) == codes_hash(model)
    for n in a:
        assert isinstance(b[n], LowRankSketchedLinear) and b[n].rank == a[n].rank
        for attr in ("codes", "lut", "l1", "l2"):
            assert torch.equal(getattr(a[n], attr), getattr(b[n], attr)), (n, attr)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_adapter_round_trip_carries_the_branch(converted, tmp_path):
    model, _ = converted
    mods = sketched_modules(model)
    saved = {n: (m.lut.detach().clone(), m.l1.detach().clone(), m.l2.detach().clone()) for n, m in mods.items()}
    path = save_adapter(model, tmp_path / "a.safetensors")
    from safetensors.torch import load_file
    keys = set(load_file(path))
    assert keys == {f"{n}.{t}" for n in mods for t in ("lut", "l1", "l2")}
    with torch.no_grad():
        for m in mods.values():
            m.lut.zero_()
            m.l2.zero_()
    load_adapter(model, path)
    for n, m in mods.items():
        assert torch.equal(m.lut, saved[n][0]) and torch.equal(m.l1, saved[n][1]) and torch.equal(m.l2, saved[n][2])
    # a model with the same codes but no branch (or another rank) has another hash: refused
    plain = tiny_llama(seed=0, **TINY)
    calib = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    spallm_ext.sketch_model(plain, SketchConfig(bits=2, groups_per_row=2, refit=False), calib, device="cpu",
                            progress=False)
    with pytest.raises(ValueError, match="other codes"):
        load_adapter(plain, path)


def test_plain_sketch_hash_unchanged_by_this_feature():
    """codes_hash of plain SketchedLinear layers is what it was before low-rank layers existed."""
    import hashlib
    mod = SketchedLinear(16, 4, bits=4)
    h = hashlib.sha256()
    h.update(b"|4x16|4|1|")
    h.update(mod.codes.numpy().tobytes())
    assert codes_hash({"": mod}) == h.hexdigest()


def test_stacking_adapter_files_keeps_the_models_low_rank_branch(tmp_path):
    # load_adapter also writes l1/l2; stacking from files must leave the live branch untouched.
    import torch
    from torch import nn

    import spallm_ext
    from spallm_ext import LowRankSketchedLinear

    torch.manual_seed(0)
    model = nn.Sequential(LowRankSketchedLinear.from_linear(nn.Linear(32, 16), 4, bits=4, groups_per_row=1))
    layer = model[0]
    l1, l2 = layer.l1.detach().clone(), layer.l2.detach().clone()
    with torch.no_grad():
        layer.lut.add_(0.5)
        layer.l1.add_(1.0)
        layer.l2.add_(1.0)
    spallm_ext.save_adapter(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        layer.lut.sub_(0.5)
        layer.l1.copy_(l1)
        layer.l2.copy_(l2)
    spallm_ext.stack_adapters(model, {"a": str(tmp_path / "a.safetensors")})
    assert torch.equal(layer.l1, l1) and torch.equal(layer.l2, l2)
    assert torch.allclose(layer.lut_stack[1], layer.lut_stack[0] + 0.5)

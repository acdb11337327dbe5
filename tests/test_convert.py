"""sketch_model on a tiny randomly initialised Llama (transformers), save/load, official import."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="model conversion tests need `transformers` "
                                   "(pip install transformers)")

import spallm_ext  # noqa: E402
from spallm_ext import SketchedLinear  # noqa: E402
from spallm_ext.adapters import codes_hash, load_official, load_sketched, save_sketched, sketched_modules  # noqa: E402
from spallm_ext.convert import sketch_model  # noqa: E402
from spallm_ext.models import tiny_llama  # noqa: E402
from spallm_ext.sketch import SketchConfig  # noqa: E402


def _calib(n=8, t=32, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sketched():
    model = tiny_llama(seed=0)
    ref = tiny_llama(seed=0)
    report = sketch_model(model, SketchConfig(bits=4, groups_per_row=2), _calib(), device="cpu",
                          progress=False)
    return model, ref, report


def test_sketch_model_converts_projections_only(sketched):
    model, ref, report = sketched
    mods = sketched_modules(model)
    assert len(mods) == 2 * 7
    assert set(report.layers) == set(mods)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, SketchedLinear)
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    # the true-sequential stages, in call order
    assert report.blocks[0]["stages"] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                          ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"],
                                          ["mlp.down_proj"]]
    for name, info in report.layers.items():
        assert 0 <= info["rel_err"] < 0.15, (name, info)
        assert info["rel_err"] <= info["rel_err_lloyd"] + 1e-9
        assert info["time_s"] >= 0 and info["tokens"] == 8 * 32
    assert report.total_s > 0 and "layers sketched" in report.summary()


def test_sketched_model_is_close_and_generates(sketched):
    model, ref, _ = sketched
    ids = _calib(2, 16, seed=5)
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert (a - b).norm() / b.norm() < 0.1
    out = model.generate(ids[:1, :6], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 11)


def test_filter_fn_and_error_feedback_helps():
    calib = _calib()
    model = tiny_llama(seed=1)
    rep = sketch_model(model, SketchConfig(bits=3), calib, filter_fn=lambda n, m: "mlp" in n, progress=False)
    assert all("mlp" in n for n in rep.layers) and len(rep.layers) == 6
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    errs = {}
    for ef in (False, True):
        m = tiny_llama(seed=1)
        r = sketch_model(m, SketchConfig(bits=3, error_feedback=ef, refit=False), calib, progress=False)
        errs[ef] = r.mean_rel_err()
    assert errs[True] < errs[False]


def test_save_load_round_trip_into_from_config(sketched, tmp_path):
    model, _, _ = sketched
    save_sketched(model, tmp_path / "sk")
    fresh = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(tmp_path / "sk"))
    load_sketched(fresh, tmp_path / "sk")
    assert codes_hash(fresh) == codes_hash(model)
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    ids = _calib(2, 16, seed=6)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh.eval()(ids).logits)
    out = fresh.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_load_sketched_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sketched(tiny_llama(), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a spallm sketch directory"):
        load_sketched(tiny_llama(), tmp_path / "empty")
    with pytest.raises(ValueError, match="no SketchedLinear"):
        save_sketched(tiny_llama(), tmp_path / "x")


def test_official_layout_import_decodes_to_same_weights(sketched, tmp_path):
    model, _, _ = sketched
    mods = sketched_modules(model)
    official = {n: spallm_ext.to_official(m.codes, m.lut.detach()) for n, m in mods.items()}
    # also a 2-bit layer in SketchTune's 4-bit container
    w2 = torch.randint(0, 4, (32, 64))
    lut2 = torch.randn(32, 1, 4).sort(-1).values
    official["model.layers.0.self_attn.k_proj"] = spallm_ext.to_official(spallm_ext.pack_codes(w2, 2), lut2)
    path = tmp_path / "official.pt"
    torch.save({f"{n}.{leaf}": t for n, pair in official.items()
                for leaf, t in zip(("quant_grid", "weight_codes"), pair)}, path)
    for source in (official, path):
        fresh = tiny_llama(seed=3)
        done = load_official(fresh, source)
        assert sorted(done) == sorted(mods)
        new = sketched_modules(fresh)
        for n, m in mods.items():
            if n == "model.layers.0.self_attn.k_proj":
                assert new[n].bits == 2
                assert torch.equal(new[n].decode(), lut2.gather(2, w2[:, None, :]).squeeze(1))
            else:
                assert torch.equal(new[n].decode(), m.decode())

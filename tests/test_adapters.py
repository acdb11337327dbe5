"""Adapters (LUT sets) on disk: exact round trips, refusal on other codes, no pickle."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="adapter tests sketch a tiny transformers Llama (pip install transformers)")

from spallm_ext.adapters import codes_hash, load_adapter, read_adapter_metadata, save_adapter, sketched_modules  # noqa: E402
from spallm_ext.convert import sketch_model  # noqa: E402
from spallm_ext.models import tiny_llama  # noqa: E402
from spallm_ext.sketch import SketchConfig  # noqa: E402


def _sketched(seed=0, bits=3):
    m = tiny_llama(seed=seed)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(seed))
    sketch_model(m, SketchConfig(bits=bits, groups_per_row=2, refit=False), calib, progress=False)
    return m


def test_adapter_round_trip_exact(tmp_path):
    m = _sketched()
    with torch.no_grad():   # "fine-tune": perturb the LUTs
        for mod in sketched_modules(m).values():
            mod.lut.add_(torch.randn_like(mod.lut) * 1e-3)
    want = {n: mod.lut.detach().clone() for n, mod in sketched_modules(m).items()}
    path = save_adapter(m, tmp_path / "a.safetensors", name="mine")
    with open(path, "rb") as f:
        assert b"spallm-adapter" in f.read(4096)
    with torch.no_grad():
        for mod in sketched_modules(m).values():
            mod.lut.zero_()
    meta = load_adapter(m, path)
    assert meta["name"] == "mine" and meta["codes_hash"] == codes_hash(m)
    assert meta["sketch_config"]["bits"] == 3
    for n, mod in sketched_modules(m).items():
        assert torch.equal(mod.lut, want[n])
    # only LUTs are in the file
    from safetensors.torch import load_file
    assert all(k.endswith(".lut") for k in load_file(path))


def test_adapter_refused_on_other_codes(tmp_path):
    a = _sketched(seed=0)
    b = _sketched(seed=1)     # same architecture and shapes, other codes
    path = save_adapter(a, tmp_path / "a.safetensors")
    before = {n: m.lut.detach().clone() for n, m in sketched_modules(b).items()}
    with pytest.raises(ValueError, match="made for other codes"):
        load_adapter(b, path)
    for n, m in sketched_modules(b).items():
        assert torch.equal(m.lut, before[n])
    c = _sketched(seed=0, bits=2)
    with pytest.raises(ValueError, match="other codes|does not fit"):
        load_adapter(c, path)


def test_adapter_bad_files(tmp_path):
    m = _sketched()
    with pytest.raises(FileNotFoundError):
        load_adapter(m, tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors"):
        read_adapter_metadata(junk)
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a spallm adapter"):
        load_adapter(m, other)


def test_adapter_fp16_storage(tmp_path):
    m = _sketched()
    path = save_adapter(m, tmp_path / "h.safetensors", lut_dtype=torch.float16)
    from safetensors.torch import load_file
    assert all(t.dtype == torch.float16 for t in load_file(path).values())
    load_adapter(m, path)

"""CLI smoke tests on a tiny Llama saved to a temp dir (in-process main(argv), plus one subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="CLI tests use a tiny transformers Llama (pip install transformers)")

from spallm_ext.cli import main  # noqa: E402
from spallm_ext.models import tiny_llama  # noqa: E402

TEXT = ("Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. "
        "The evil that men do lives after them; the good is oft interred with their bones. ") * 20


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "tiny"
    tiny_llama(seed=0).save_pretrained(model_dir)
    text = root / "text.txt"
    text.write_text(TEXT)
    out = root / "sketch"
    rc = main(["sketch", "--model", str(model_dir), "--out", str(out), "--bits", "3", "--groups", "2",
               "--calib", str(text), "--calib-seqs", "4", "--seq-len", "32", "--device", "cpu"])
    assert rc == 0
    return root, model_dir, text, out


def test_sketch_info_ppl_generate(dirs, capsys):
    root, model_dir, text, out = dirs
    assert (out / "spallm_config.json").is_file() and (out / "sketch_report.json").is_file()
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "sketch" and info["modules"] == 14 and info["sketch_config"]["bits"] == 3
    assert 3.0 < info["bits_per_weight_fp16_lut"] < 8.0
    assert main(["ppl", str(out), "--text", str(text), "--seq-len", "32", "--max-tokens", "256"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["ppl"] > 1 and res["tokens"] == 256
    assert main(["generate", str(out), "--prompt", "Friends", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("Friends")


def test_ppl_and_generate_in_bf16(dirs, capsys):
    """--dtype bfloat16 casts the LUTs and dense parts (codes stay) and the perplexity stays that
    of the fp32 run within bf16 rounding."""
    root, model_dir, text, out = dirs
    args = ["ppl", str(out), "--text", str(text), "--seq-len", "32", "--max-tokens", "256"]
    capsys.readouterr()
    assert main(args) == 0
    fp32 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(args + ["--dtype", "bfloat16"]) == 0
    bf16 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    import spallm_ext
    from spallm_ext import kernels
    native = spallm_ext.build_info()["cpu_bf16"] and torch.backends.mkldnn.is_available()
    if native and torch.backends.mkldnn.enabled:  # else the fp32 paths, covered by test_cpu_paths
        assert kernels.last_cpu_plan() == "bf16_tiles"
    assert fp32["dtype"] == "float32" and bf16["dtype"] == "bfloat16"
    assert bf16["ppl"] != fp32["ppl"] and abs(bf16["ppl"] / fp32["ppl"] - 1) < 0.05
    assert main(["generate", str(out), "--prompt", "Friends", "--max-new-tokens", "4", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.startswith("Friends")
    with pytest.raises(SystemExit):
        main(["generate", str(out), "--prompt", "Friends", "--dtype", "int8"])


def test_generate_with_adapter_and_wrong_adapter(dirs, capsys, tmp_path):
    from spallm_ext.adapters import save_adapter, sketched_modules
    from spallm_ext.convert import sketch_model
    from spallm_ext.models import load_model
    from spallm_ext.sketch import SketchConfig
    root, model_dir, text, out = dirs
    model, _ = load_model(str(out))
    with torch.no_grad():
        for m in sketched_modules(model).values():
            m.lut.mul_(1.01)
    good = save_adapter(model, tmp_path / "good.safetensors")
    assert main(["generate", str(out), "--prompt", "Friends", "--max-new-tokens", "3", "--adapter", good]) == 0
    assert main(["info", good]) == 0
    assert '"kind": "adapter"' in capsys.readouterr().out
    other = tiny_llama(seed=0)
    sketch_model(other, SketchConfig(bits=3, groups_per_row=2, seed=0, act_order=False),
                 torch.randint(0, 256, (2, 32)), progress=False)
    bad = save_adapter(other, tmp_path / "bad.safetensors")
    assert main(["generate", str(out), "--prompt", "Friends", "--adapter", bad]) == 2
    assert "made for other codes" in capsys.readouterr().err


def test_clear_errors(dirs, capsys, tmp_path):
    root, model_dir, text, out = dirs
    assert main(["ppl", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["info", str(model_dir)]) == 2                     # a model dir, not a sketch
    assert "not a spallm sketch directory" in capsys.readouterr().err
    assert main(["sketch", "--model", str(model_dir), "--out", str(tmp_path / "o"), "--bits", "5",
                 "--calib", str(text)]) == 2
    assert "bad sketch config" in capsys.readouterr().err
    assert main(["sketch", "--model", str(tmp_path / "nomodel"), "--out", str(tmp_path / "o"),
                 "--calib", str(text)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["sketch", "--model", str(model_dir), "--out", str(tmp_path / "o"),
                 "--calib", str(tmp_path / "nocalib.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bogus"])


def test_console_entry_point_runs():
    """`python -m spallm_ext.cli` (what the spallm-ext console script calls) starts and helps."""
    r = subprocess.run([sys.executable, "-m", "spallm_ext.cli", "--help"], capture_output=True, text=True,
                       timeout=120, env={**os.environ})
    assert r.returncode == 0 and "sketch" in r.stdout and "generate" in r.stdout


def test_tune_on_a_sketch_directory(dirs, tmp_path, capsys):
    """`tune --sketch DIR` times the saved model's own layer shapes, bits and groups per row."""
    from spallm_ext import kernels, tuning

    _, _, _, out = dirs
    path = tmp_path / "tuning.json"
    try:
        assert main(["tune", "--device", "cpu", "--sketch", str(out), "--tokens", "1,4", "--budget-ms", "1",
                     "--out", str(path)]) == 0
        saved = tuning.load_tuning(path, apply=False)
        meta = json.loads((out / "spallm_config.json").read_text())["modules"].values()
        assert sorted(map(tuple, saved.meta["shapes"])) == sorted({(m["out_features"], m["in_features"]) for m in meta})
        assert saved.meta["bits"] == 3 and saved.meta["groups_per_row"] == 2
        capsys.readouterr()
        assert main(["tune", "--device", "cpu", "--sketch", str(out), "--shapes", "64x64"]) == 2
        assert "not both" in capsys.readouterr().err
        assert main(["tune", "--device", "cpu", "--sketch", str(tmp_path / "nowhere")]) == 2
    finally:
        kernels.reset_dispatch_thresholds("cpu")

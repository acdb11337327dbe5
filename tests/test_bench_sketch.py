"""CPU smoke test of bench/bench_sketch.py (issue 3's sketching-speed benchmark, run at Llama-3-8B
shapes on the GPU machine): at SmolLM2's shapes it sketches every projection of each timed block,
reports each layer's error, and extrapolates the whole model from the blocks it timed."""
from __future__ import annotations

import json

import pytest

from conftest import load_bench


def test_smollm2_shapes_on_cpu(tmp_path, one_thread):
    bench = load_bench("bench_sketch")
    out = tmp_path / "sketch.json"
    assert bench.main(["--device", "cpu", "--shape", "smollm2", "--blocks", "2", "--tokens", "256",
                       "--no-refit", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("device", "torch", "commit", "config", "rows", "per_block_s", "model_estimate_s"):
        assert key in res, key
    assert "partial" not in res and res["blocks_timed"] == 2 and res["model_blocks"] == 30
    hidden, inter, kv, _ = bench.SHAPES["smollm2"]
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    assert sorted((r["block"], r["layer"], r["out"], r["in"]) for r in res["rows"]) == sorted(
        (b, name, n, k) for b in range(2) for name, (n, k) in shapes.items())
    for r in res["rows"]:
        assert r["seconds"] > 0 and 0 < r["rel_err"] < 0.5, r
        assert set(r["stages_s"]) == {"hessian_s", "lloyd_s", "feedback_s"}  # --no-refit: no refit stage
    total = sum(r["seconds"] for r in res["rows"])
    assert res["per_block_s"] == pytest.approx(total / 2)
    assert res["model_estimate_s"] == pytest.approx(res["per_block_s"] * 30)

"""CPU smoke test of bench/bench_lowrank.py (the GPU benchmark of the low-rank op): the script runs
at tiny shapes on the CPU, writes the documented schema, and the op it times agrees with the
unfused baseline it is compared with."""
from __future__ import annotations

import json
import math

from conftest import load_bench


def test_cpu_smoke(tmp_path, one_thread):
    bench = load_bench("bench_lowrank")
    out = tmp_path / "lowrank.json"
    bench.main(["--cpu-smoke", "--bits", "2", "4", "--out", str(out)])
    res = json.loads(out.read_text())
    for key in ("device", "torch", "commit", "rows", "lowrank_dtype", "cpu_smoke"):
        assert key in res, key
    rows = res["rows"]
    shapes, ms, ranks = bench.SMOKE_SHAPES, bench.SMOKE_MS, bench.SMOKE_RANKS
    want = {("cublas_bf16", m, n, k, 16, 0) for n, k in shapes for m in ms}
    want |= {("spallm", m, n, k, b, 0) for n, k in shapes for m in ms for b in (2, 4)}
    want |= {(i, m, n, k, b, r) for i in ("unfused", "spallm_lowrank", "spallm_lowrank_tgemm")
             for n, k in shapes for m in ms
             for b in (2, 4) for r in ranks}
    assert {(r["impl"], r["M"], r["N"], r["K"], r["bits"], r["rank"]) for r in rows} == want
    for r in rows:
        assert r["median_us"] > 0 and math.isfinite(r["median_us"]) and r["groups_per_row"] >= 0
        if r["impl"] == "spallm_lowrank":
            # what the lowrank call itself ran, not a later call's plan ("none" before any CPU call)
            assert isinstance(r["plan"], str) and r["plan"] and not r["plan"].startswith("none"), r
            # bf16 output vs the unfused path's bf16 output: a few bf16 ulps at most
            assert r["rel_err_vs_unfused"] < 2e-2, r

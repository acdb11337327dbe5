"""CPU smoke test of bench/bench_forward.py (the GPU forward benchmark of issue 4): the script runs
at tiny shapes on the CPU, writes the documented schema with every row it promises, the kernels it
times agree with the reference, and the JSON written after each shape survives a run that stops
part-way (as one cut off by the GPU machine's time limit does)."""
from __future__ import annotations

import json
import math

import pytest

from conftest import load_bench


def rows_of(res):
    return {(r["impl"], r["M"]) for r in res["rows"]}


def test_cpu_smoke(tmp_path, one_thread):
    bench = load_bench("bench_forward")
    out = tmp_path / "forward.json"
    bench.main(["--cpu-smoke", "--bits", "4", "2", "--out", str(out)])
    res = json.loads(out.read_text())
    for key in ("device", "torch", "cuda", "commit", "rows", "cpu_smoke", "shapes_done"):
        assert key in res, key
    assert "partial" not in res
    assert res["shapes_done"] == [list(s) for s in bench.SMOKE_SHAPES]
    rows = res["rows"]
    shapes, ms, (a,) = bench.SMOKE_SHAPES, bench.SMOKE_MS, bench.SMOKE_ADAPTERS
    want = {("cublas_bf16", m, n, k, 16, 0, 1) for n, k in shapes for m in ms}
    want |= {("spallm", m, n, k, b, g, 1) for n, k in shapes for m in ms for b in (4, 2) for g in (1, 4)}
    want |= {("sketchtune_ref", m, n, k, 4, g, 1) for n, k in shapes for m in ms for g in (1, 4)}
    want |= {("spallm", m, n, k, 4, g, a) for n, k in shapes for m in ms if m >= a for g in (1, 4)}
    got = [(r["impl"], r["M"], r["N"], r["K"], r["bits"], r["groups_per_row"], r["adapters"]) for r in rows]
    assert len(got) == len(set(got)) and set(got) == want
    for r in rows:
        for key in ("median_us", "gbps", "tflops", "speedup_vs_cublas"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        if r["impl"] == "spallm":
            assert isinstance(r["plan"], str) and r["plan"] not in ("", "none"), r
            # bf16 output against the fp32/fp64 reference: a few bf16 ulps
            assert 0 <= r["rel_err"] < 1e-2, r


def test_partial_results_survive_a_cut_off_run(tmp_path, one_thread, monkeypatch):
    """The results of the shapes finished before the run stops are on disk, marked partial."""
    bench = load_bench("bench_forward")
    out = tmp_path / "forward.json"
    calls = []
    real = bench.random_sketch

    def stop_at_second_shape(n, k, *args, **kwargs):
        calls.append((n, k))
        if (n, k) == bench.SMOKE_SHAPES[1]:
            raise KeyboardInterrupt  # what a killed run looks like from inside
        return real(n, k, *args, **kwargs)

    monkeypatch.setattr(bench, "random_sketch", stop_at_second_shape)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--cpu-smoke", "--bits", "4", "--groups", "1", "--adapters", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["partial"] is True and res["shapes_done"] == [list(bench.SMOKE_SHAPES[0])]
    n, k = bench.SMOKE_SHAPES[0]
    assert rows_of(res) == {(i, m) for i in ("cublas_bf16", "spallm", "sketchtune_ref") for m in bench.SMOKE_MS}
    assert all((r["N"], r["K"]) == (n, k) for r in res["rows"])


def test_shapes_argument(tmp_path, one_thread):
    bench = load_bench("bench_forward")
    out = tmp_path / "forward.json"
    bench.main(["--cpu-smoke", "--shapes", "24x64", "--ms", "2", "--bits", "3", "--groups", "2",
                "--adapters", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {(r["impl"], r["N"], r["K"], r["M"]) for r in rows} == {
        ("cublas_bf16", 24, 64, 2), ("spallm", 24, 64, 2), ("sketchtune_ref", 24, 64, 2)}
    for bad in ("24x", "0x64", "24x64x2", "axb"):
        with pytest.raises(SystemExit):
            bench.main(["--cpu-smoke", "--shapes", bad, "--out", str(out)])

"""Shared pieces of the spallm_ext benchmarks: timing, metadata, JSON output.

CUDA timings use CUDA events with the L2 flushed before every timed call (a 256 MB memset, as
triton.testing.do_bench does) and take the median of many runs; CPU timings use perf_counter.
Ratios to baselines are only meaningful within one results file: every baseline is measured in
the same process as the kernel it is compared with.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        # Result files written by an earlier benchmark of the same run, and prose, do not change the
        # code measured.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results", ":(exclude,glob)**/*.md"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return os.environ.get("SPALLM_COMMIT", "unknown")


def metadata(device: str) -> dict:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        name = f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": os.environ.get("SPALLM_COMMIT") or git_commit(),
        "date": time.strftime("%Y-%m-%d"),
    }


def time_cpu(fn, *, min_runs: int = 5, min_seconds: float = 0.5, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + min_seconds
    while len(times) < min_runs or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return {"median_us": statistics.median(times) * 1e6, "min_us": min(times) * 1e6, "runs": len(times)}


_flush_buf = None


def time_cuda(fn, *, runs: int = 100, warmup: int = 10, flush_l2: bool = True) -> dict:
    """Median of `runs` event-timed calls, L2 flushed before each (so weights come from HBM)."""
    global _flush_buf
    if flush_l2 and _flush_buf is None:
        _flush_buf = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for s, e in zip(starts, ends):
        if flush_l2:
            _flush_buf.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    return {"median_us": statistics.median(times), "min_us": min(times), "runs": runs}


def runs_for(fn, budget_ms: float, lo: int = 5, hi: int = 100) -> int:
    """How many timed runs of `fn` fit a budget of `budget_ms` (one warm call, one measured)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return int(max(lo, min(hi, budget_ms / max(start.elapsed_time(end), 1e-3))))


def time_cuda_graph(fn, *, runs: int = 100, warmup: int = 3, flush_l2: bool = True) -> dict:
    """time_cuda of one replay of `fn` captured in a CUDA graph: for calls of a few microseconds,
    where Python and launch overhead between the kernels of one call would otherwise be timed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    out = time_cuda(graph.replay, runs=runs, warmup=warmup, flush_l2=flush_l2)
    out["cuda_graph"] = True
    return out


def timer(device: str, budget_ms: float, graph_below_us: float | None = None):
    """A function that times a call within ``budget_ms`` and returns time_cpu / time_cuda's dict.
    On CUDA the runs are fitted to the budget (runs_for) and calls under ``graph_below_us`` are
    re-timed as CUDA-graph replays, so the launch gaps between one call's kernels do not count."""
    if device == "cpu":
        return lambda fn: time_cpu(fn, min_runs=3, min_seconds=budget_ms / 1e3, warmup=1)

    def timed(fn):
        t = time_cuda(fn, runs=runs_for(fn, budget_ms))
        if graph_below_us and t["median_us"] < graph_below_us:
            t = time_cuda_graph(fn, runs=max(t["runs"], 50))
        return t

    return timed


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in fp32: the error a benchmark row records beside its time."""
    y, ref = y.float(), ref.float()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def write_results(path: str | os.PathLike, device: str, rows: list[dict], *, partial: bool = False,
                  **extra) -> None:
    """The results JSON: metadata(device), ``extra`` fields, then ``rows``. Long GPU sweeps call it
    as they go with ``partial=True`` (written as `"partial": true`, absent from the final file), so
    a run cut off by the machine's time limit still leaves what it measured."""
    out = {**metadata(device), **({"partial": True} if partial else {}), **extra, "rows": rows}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({len(rows)} rows)")


def random_sketch(n: int, k: int, bits: int, groups: int, device, lut_dtype=torch.float32, seed: int = 0):
    """Random codes (packed) and a random LUT for a benchmark weight."""
    from spallm_ext import pack_codes

    g = torch.Generator(device="cpu").manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    lut = torch.randn(n, groups, 1 << bits, generator=g) * 0.02
    return pack_codes(codes, bits).to(device), lut.to(device=device, dtype=lut_dtype)

"""Measure the dispatch thresholds on the machine at hand, and keep them in a file.

The automatic kernel choice (:mod:`spallm_ext.kernels`) switches path at a few token counts
(:func:`~spallm_ext.kernels.dispatch_thresholds`). Their built-in values come from a roofline
argument (CUDA) or from one 2-core AVX-512 development machine (CPU); where a kernel stops paying
depends on the GPU's bandwidth, SM count and shared memory, or on the CPU's cores and BLAS. So,
as vLLM ships measured kernel configurations per GPU, :func:`tune` times every path at a ladder of
token counts on the layer shapes you give it, takes the crossovers and can save them::

    spallm-ext tune --device cuda --out h100.json        # or spallm_ext.tuning.tune("cuda")
    export SPALLM_EXT_TUNING=h100.json                    # applied when spallm_ext is imported
    spallm_ext.tuning.load_tuning("h100.json")            # or explicitly

How a threshold is read from the timings: at each token count M, each path's time is the geometric
mean over the shapes. An "up to" threshold T (``direct_max_tokens``, ``regs_max_tokens``,
``mma_max_tokens``, ``dx_mma_max_tokens``, ``gemv_max_tokens``, ``bf16_gemv_max_tokens``: one path
at M <= T, the next beyond) is the setting, among 0 and the measured token counts, under which the
dispatch loses least: the sum over the measured M of the log of the time the dispatch would take
(:func:`fit_up_to`). One noisy point therefore cannot cut a run of wins short, and a threshold the
kernels cannot express (a path best only in the middle of the range) is still the best compromise.
Where the best setting is the largest M measured, the larger of it and the built-in value is kept
(what lies beyond was not measured). A "from" threshold (``decode_min_tokens``,
``bf16_min_tokens``, ``bf16_gemv_min_tokens``) is one past the "up to" threshold of the path it
replaces. Thresholds are fitted in the order the dispatch asks them. Only the choice of path
changes; results agree across paths within the rounding they already differ by.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from . import __version__, _C, kernels
from .formats import pack_codes

FORMAT = "spallm_ext.tuning/1"

# (out_features, in_features): Llama-3-8B's projections on a GPU; on a CPU one square layer large
# enough that W (8 MB of fp32 decoded) leaves the caches, small enough to time in a minute.
CUDA_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
CUDA_TOKENS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)
CPU_SHAPES = ((2048, 2048),)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4096x4096,14336x4096' -> [(4096, 4096), (14336, 4096)]: layer shapes as OUTxIN, the form
    `spallm-ext tune --shapes` and the benchmarks take them in."""
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(f"shapes must look like 4096x4096,14336x4096 (OUTxIN, positive), got {text!r}")
    return shapes
CPU_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclasses.dataclass
class Tuning:
    """Thresholds measured on one machine, with the timings they were read from.

    ``rows``: one per timed call: ``op`` ("linear" or "dx"), ``dtype`` of the activations, ``path``,
    ``M``, ``N`` (out_features), ``K`` (in_features), ``median_us``.
    """

    device: str                 # "cuda" or "cpu"
    device_name: str
    thresholds: dict[str, int]
    builtin: dict[str, int]
    rows: list[dict]
    meta: dict

    def to_json(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: dict, source: str = "tuning") -> "Tuning":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{source}: not a spallm_ext tuning file (format must be {FORMAT!r})")
        if d.get("device") not in kernels.THRESHOLD_DEVICES:
            raise ValueError(f"{source}: 'device' must be one of {kernels.THRESHOLD_DEVICES}, got {d.get('device')!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = fields - d.keys()
        if missing:
            raise ValueError(f"{source}: missing fields {sorted(missing)}")
        t = cls(**{k: d[k] for k in fields})
        if not isinstance(t.thresholds, dict) or not all(isinstance(v, int) for v in t.thresholds.values()):
            raise ValueError(f"{source}: 'thresholds' must map names to ints")
        return t


# ---------------------------------------------------------------------------------------------
# Reading thresholds from timings (pure functions of the rows)

def path_times(rows: Iterable[dict], op: str, dtype: str) -> dict[int, dict[str, float]]:
    """{M: {path: geometric mean of median_us over the shapes}} for one op and activation dtype.
    A path enters an M only if it was timed on every shape measured there."""
    by_m: dict[int, dict[str, list[float]]] = {}
    shapes: dict[int, set] = {}
    for r in rows:
        if r["op"] == op and r["dtype"] == dtype:
            by_m.setdefault(r["M"], {}).setdefault(r["path"], []).append(r["median_us"])
            shapes.setdefault(r["M"], set()).add((r["N"], r["K"]))
    return {m: {p: math.exp(statistics.fmean(math.log(max(t, 1e-9)) for t in ts))
                for p, ts in paths.items() if len(ts) == len(shapes[m])}
            for m, paths in sorted(by_m.items())}


def fit_up_to(tokens: Sequence[int], ours: Sequence[float], theirs: Sequence[float], builtin: int) -> int:
    """The "up to" threshold T under which the dispatch loses least: ``ours`` runs M <= T, ``theirs``
    the rest, and T (0 or one of ``tokens``) minimises the summed log time over the token counts
    (each measured M counts alike, whatever its size). Ties go to the value nearest ``builtin``;
    if the best T is the largest M measured, the result is the larger of it and ``builtin`` (what
    lies beyond was not measured)."""
    if not tokens:
        return builtin
    logs_ours = [math.log(max(t, 1e-9)) for t in ours]
    logs_theirs = [math.log(max(t, 1e-9)) for t in theirs]
    candidates = [0, *tokens]
    costs = [sum(o if m <= cut else t for m, o, t in zip(tokens, logs_ours, logs_theirs)) for cut in candidates]
    best = min(costs)
    cut = min((c for c, cost in zip(candidates, costs) if cost <= best + 1e-12), key=lambda c: abs(c - builtin))
    return max(cut, builtin) if cut == tokens[-1] else cut


def _fit(table: dict[int, dict[str, float]], ours: Callable[[int, dict], float | None], rivals: Sequence[str],
         builtin: int, lo: int = 0, hi: int | None = None) -> int | None:
    """fit_up_to over the M in (lo, hi] where `ours(M, times)` and a rival were timed; None if none."""
    ms, mine, best_rival = [], [], []
    for m, t in table.items():
        if m <= lo or (hi is not None and m > hi):
            continue
        o = ours(m, t)
        against = [t[r] for r in rivals if r in t]
        if o is None or not against:
            continue
        ms.append(m)
        mine.append(o)
        best_rival.append(min(against))
    return fit_up_to(ms, mine, best_rival, builtin) if ms else None


def _path(name: str) -> Callable[[int, dict], float | None]:
    return lambda m, t: t.get(name)


def decide_cuda(rows: Sequence[dict], builtin: dict[str, int]) -> dict[str, int]:
    """CUDA thresholds from timings of the forced paths (rows of :func:`tune`), fitted in the order
    the dispatch asks them (direct, then regs past it, then the tensor-core family against
    decode_gemm); a threshold whose paths were not timed keeps its built-in value."""
    out = dict(builtin)
    fwd = path_times(rows, "linear", "bf16")
    direct = _fit(fwd, _path("mma_regs_direct"), ("mma_regs", "mma", "decode_gemm"), builtin["direct_max_tokens"],
                  hi=16)
    if direct is not None:
        out["direct_max_tokens"] = min(direct, 16)
    d = out["direct_max_tokens"]
    regs = _fit(fwd, _path("mma_regs"), ("mma", "decode_gemm"), builtin["regs_max_tokens"], lo=d, hi=32)
    if regs is not None:
        out["regs_max_tokens"] = min(max(regs, d), 32)
    r = out["regs_max_tokens"]

    def family(m: int, t: dict) -> float | None:  # what the tensor-core side runs at m, as fitted
        return t.get("mma_regs_direct" if m <= d else "mma_regs" if m <= r else "mma")

    mma = _fit(fwd, family, ("decode_gemm",), builtin["mma_max_tokens"])
    if mma is not None:
        out["mma_max_tokens"] = mma
    dx = _fit(path_times(rows, "dx", "bf16"), _path("mma"), ("decode_gemm",), builtin["dx_mma_max_tokens"])
    if dx is not None:
        out["dx_mma_max_tokens"] = dx
    simple = _fit(path_times(rows, "linear", "fp32"), _path("simple"), ("decode_gemm",),
                  builtin["decode_min_tokens"] - 1)
    if simple is not None:
        out["decode_min_tokens"] = simple + 1
    return out


def decide_cpu(rows: Sequence[dict], builtin: dict[str, int]) -> dict[str, int]:
    """CPU thresholds from timings (rows of :func:`tune`); untimed ones keep their built-in value."""
    out = dict(builtin)
    gemv = _fit(path_times(rows, "linear", "fp32"), _path("gemv"), ("tiles",), builtin["gemv_max_tokens"])
    if gemv is not None:
        out["gemv_max_tokens"] = gemv
    bf16 = path_times(rows, "linear", "bf16")
    # bf16 activations: the fp32 pass below bf16_gemv_min_tokens, the dot products up to
    # bf16_gemv_max_tokens, then the fp32 pass again until bf16_min_tokens, then the bf16 tiles.
    below = _fit(bf16, _path("fp32_pass"), ("bf16_gemv",), builtin["bf16_gemv_min_tokens"] - 1)
    if below is not None:
        out["bf16_gemv_min_tokens"] = below + 1
    dot = _fit(bf16, _path("bf16_gemv"), ("fp32_pass", "bf16_tiles"), builtin["bf16_gemv_max_tokens"],
               lo=out["bf16_gemv_min_tokens"] - 1)
    if dot is not None:
        out["bf16_gemv_max_tokens"] = dot
    # Past the dot-product pass: the fp32 pass (bf16 x converted) until bf16_min_tokens, then tiles.
    fp32_pass = _fit(bf16, _path("fp32_pass"), ("bf16_tiles",), builtin["bf16_min_tokens"] - 1,
                     lo=out["bf16_gemv_max_tokens"])
    if fp32_pass is not None:
        out["bf16_min_tokens"] = max(fp32_pass, out["bf16_gemv_max_tokens"]) + 1
    return out


# ---------------------------------------------------------------------------------------------
# Timing

_flush: torch.Tensor | None = None


def _time_cuda(fn: Callable[[], object], budget_ms: float) -> float:
    """Median µs of event-timed calls, the L2 flushed before each (weights come from HBM, as in a
    model whose other layers evicted them)."""
    global _flush
    if _flush is None:
        _flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    runs = int(max(5, min(50, budget_ms / max(start.elapsed_time(end), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    for s, e in events:
        _flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in events)


def _time_cpu(fn: Callable[[], object], budget_ms: float) -> float:
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _sketch(n: int, k: int, bits: int, groups: int, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    lut = torch.randn(n, groups, 1 << bits, generator=g) * 0.02
    return pack_codes(codes, bits).to(device), lut.to(device)


def _cuda_cases(tokens: Sequence[int]):
    """(op, dtype, path, M) of every forced-path call a CUDA tuning times."""
    for m in tokens:
        for path in ("mma_regs_direct", "mma_regs", "mma", "decode_gemm"):
            if (path == "mma_regs_direct" and m > 16) or (path == "mma_regs" and m > 32):
                continue
            yield "linear", "bf16", path, m
        if m >= 16:
            yield from (("dx", "bf16", path, m) for path in ("mma", "decode_gemm"))
        if m <= 256:
            yield from (("linear", "fp32", path, m) for path in ("simple", "decode_gemm"))


# The CPU paths, each as the thresholds that force it and the plan (kernels.last_cpu_plan) that
# shows it ran; bf16 activations on the fp32 pass are converted and take gemv or tiles by the
# built-in gemv rule.
_BIG = 1 << 40
_CPU_PATHS = {
    ("fp32", "gemv"): (dict(gemv_max_tokens=_BIG), "_gemv"),
    ("fp32", "tiles"): (dict(gemv_max_tokens=0), "_tiles"),
    ("bf16", "fp32_pass"): (dict(bf16_min_tokens=_BIG, bf16_gemv_max_tokens=0), ""),
    ("bf16", "bf16_tiles"): (dict(bf16_min_tokens=1, bf16_gemv_max_tokens=0), "bf16_tiles"),
    ("bf16", "bf16_gemv"): (dict(bf16_gemv_min_tokens=1, bf16_gemv_max_tokens=_BIG), "avx512bf16_gemv"),
}


def _runs_as(plan: str, want: str) -> bool:
    return plan.endswith(want) if want.startswith("_") else (not want or plan == want)


def tune(device: str | None = None, *, shapes: Sequence[tuple[int, int]] | None = None,
         tokens: Sequence[int] | None = None, bits: int = 4, groups_per_row: int = 4,
         budget_ms: float | None = None, apply: bool = True, progress: bool = True) -> Tuning:
    """Time every path of ``lut_linear`` (and on CUDA ``lut_linear_dx``) at each token count of
    ``tokens`` on random sketches of ``shapes`` [(out_features, in_features)], and read the
    dispatch thresholds from the crossovers (module docstring). ``apply`` sets them for this
    process. ``budget_ms`` bounds each measurement (default 30 on CUDA, 300 on CPU). A CUDA tuning
    takes about a minute on an H100 with the defaults; a CPU one a few minutes on 2 cores.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in kernels.THRESHOLD_DEVICES:
        raise ValueError(f"device must be one of {kernels.THRESHOLD_DEVICES}, got {device!r}")
    if device == "cuda" and not (torch.cuda.is_available() and _C.build_info()["cuda"]):
        raise RuntimeError("tune('cuda') needs a GPU and a CUDA build of spallm_ext")
    shapes = tuple(shapes or (CUDA_SHAPES if device == "cuda" else CPU_SHAPES))
    tokens = tuple(sorted(set(tokens or (CUDA_TOKENS if device == "cuda" else CPU_TOKENS))))
    if not tokens or tokens[0] < 1:
        raise ValueError(f"tokens must be positive token counts, got {tokens}")
    for n, k in shapes:
        if n < 1 or k < 1 or k % groups_per_row:
            raise ValueError(f"shapes: ({n}, {k}) is not (out_features, in_features) with in_features "
                             f"divisible by groups_per_row={groups_per_row}")
    budget_ms = budget_ms or (30.0 if device == "cuda" else 300.0)
    rows = (_tune_cuda if device == "cuda" else _tune_cpu)(shapes, tokens, bits, groups_per_row, budget_ms, progress)
    builtin = kernels.dispatch_thresholds(device, builtin=True)
    decide = decide_cuda if device == "cuda" else decide_cpu
    result = Tuning(device=device, device_name=_device_name(device), thresholds=decide(rows, builtin),
                    builtin=builtin, rows=rows, meta=_meta(device, shapes, tokens, bits, groups_per_row))
    if apply:
        apply_tuning(result)
    return result


def _bar(total: int, progress: bool, desc: str):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False)


def _tune_cuda(shapes, tokens, bits, groups, budget_ms, progress) -> list[dict]:
    cases = list(_cuda_cases(tokens))
    bar = _bar(len(cases) * len(shapes), progress, "tune cuda")
    rows = []
    for n, k in shapes:
        codes, lut = _sketch(n, k, bits, groups, "cuda", seed=n + k)
        for op, dtype, path, m in cases:
            act = torch.bfloat16 if dtype == "bf16" else torch.float32
            x = torch.randn(m, n if op == "dx" else k, device="cuda", dtype=act)
            op_fn = torch.ops.spallm.lut_linear_dx if op == "dx" else torch.ops.spallm.lut_linear

            def fn(op_fn=op_fn, x=x, codes=codes, lut=lut):
                return op_fn(x, codes, lut)
            with torch.no_grad(), kernels.use_cuda_kernel(path):
                fn()
                ran = kernels.last_cuda_plan().split()[0]
                if ran == path:  # a forced path that cannot take the call falls back: not timed
                    rows.append(dict(op=op, dtype=dtype, path=path, M=m, N=n, K=k,
                                     median_us=_time_cuda(fn, budget_ms)))
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return rows


def _tune_cpu(shapes, tokens, bits, groups, budget_ms, progress) -> list[dict]:
    bar = _bar(len(_CPU_PATHS) * len(tokens) * len(shapes), progress, "tune cpu")
    rows = []
    for n, k in shapes:
        codes, lut = _sketch(n, k, bits, groups, "cpu", seed=n + k)
        for (dtype, path), (setting, plan) in _CPU_PATHS.items():
            act = torch.bfloat16 if dtype == "bf16" else torch.float32
            for m in tokens:
                x = torch.randn(m, k, dtype=act)
                with torch.no_grad(), kernels.use_dispatch_thresholds("cpu", **setting):
                    torch.ops.spallm.lut_linear(x, codes, lut)
                    # A path this CPU does not take (no vector kernels, no bf16 tiles or dot
                    # products on "auto", a group size they do not fit) is not timed.
                    if _runs_as(kernels.last_cpu_plan(), plan):
                        t = _time_cpu(lambda: torch.ops.spallm.lut_linear(x, codes, lut), budget_ms)
                        rows.append(dict(op="linear", dtype=dtype, path=path, M=m, N=n, K=k, median_us=t))
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    return rows


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    info = _C.build_info()
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, simd {info['cpu_simd']})"


def _meta(device, shapes, tokens, bits, groups) -> dict:
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "spallm_ext": __version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
            "shapes": [list(s) for s in shapes], "tokens": list(tokens), "bits": bits, "groups_per_row": groups,
            "cpu_kernel": kernels.cpu_kernel() if device == "cpu" else None}


def describe(tuning: Tuning) -> str:
    """A plain-text table: each token count's fastest path per op and dtype, then the thresholds."""
    lines = [f"{tuning.device}: {tuning.device_name} (torch {tuning.meta.get('torch')}, "
             f"{tuning.meta.get('threads')} threads, shapes {tuning.meta.get('shapes')})"]
    for op, dtype in sorted({(r["op"], r["dtype"]) for r in tuning.rows}):
        lines.append(f"  {op} {dtype}: geometric mean over shapes, us")
        for m, times in path_times(tuning.rows, op, dtype).items():
            best = min(times, key=times.get)
            cells = "  ".join(f"{p} {t:10.1f}{'*' if p == best else ' '}" for p, t in times.items())
            lines.append(f"    M={m:<5d} {cells}")
    lines.append("  thresholds (built-in -> measured):")
    for name, value in tuning.thresholds.items():
        base = tuning.builtin.get(name)
        lines.append(f"    {name:22s} {base!s:>6} -> {value}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Files

def apply_tuning(tuning: Tuning) -> None:
    """Set this process's dispatch thresholds to the tuning's."""
    kernels.set_dispatch_thresholds(tuning.device, **tuning.thresholds)


def save_tuning(tuning: Tuning, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tuning.to_json(), indent=1) + "\n")
    return path


def load_tuning(path: str | os.PathLike, *, apply: bool = True) -> Tuning:
    """Read a tuning file (and with ``apply``, set its thresholds). A file measured on another
    device model than this one is applied with a warning (CUDA: checked only once CUDA is
    initialized, so that importing spallm_ext never starts it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tuning file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    tuning = Tuning.from_json(data, str(path))
    if apply:
        here = None
        if tuning.device == "cpu":
            here = _device_name("cpu")
        elif torch.cuda.is_initialized():
            here = _device_name("cuda")
        if here is not None and here != tuning.device_name:
            warnings.warn(f"{path}: measured on {tuning.device_name!r}, applied on {here!r}", stacklevel=2)
        apply_tuning(tuning)
    return tuning


ENV_VAR = "SPALLM_EXT_TUNING"


def _apply_env() -> None:
    """At import: the files named by $SPALLM_EXT_TUNING (separated by os.pathsep), each applied;
    a file that cannot be applied is reported as a warning, not an import error."""
    for name in filter(None, os.environ.get(ENV_VAR, "").split(os.pathsep)):
        try:
            load_tuning(name)
        except (OSError, ValueError, TypeError, RuntimeError) as e:
            warnings.warn(f"{ENV_VAR}: {name}: {e}", stacklevel=3)

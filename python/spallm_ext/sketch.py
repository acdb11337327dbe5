"""Sketching: turning dense weights into (codes, LUT).

This module holds the batched weighted 1-D Lloyd (k-means) that every sketcher builds on, and the
registry of sketchers that SketchedLinear.from_linear picks from. A sketcher is any callable

    fn(weight [out, in] fp32, bits, groups_per_row, **kwargs) -> (codes [out, in] int, lut [out, G, 2^bits])

The default, "lloyd", clusters each (row, group) on its own, unweighted: the simple data-free
sketch. The Hessian-weighted algorithm with error feedback (calibration-driven) plugs in here too.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .formats import check_bits

Sketcher = Callable[..., tuple[Tensor, Tensor]]
_SKETCHERS: dict[str, Sketcher] = {}


def register_sketcher(name: str, fn: Sketcher | None = None):
    """Register `fn` under `name` (usable as a decorator)."""
    def deco(f: Sketcher) -> Sketcher:
        _SKETCHERS[name] = f
        return f
    return deco(fn) if fn is not None else deco


def get_sketcher(name_or_fn: str | Sketcher) -> Sketcher:
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn not in _SKETCHERS:
        raise ValueError(f"unknown sketcher {name_or_fn!r}; registered: {sorted(_SKETCHERS)}")
    return _SKETCHERS[name_or_fn]


def assign_nearest(values: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid for every value. values [R, n], centroids [R, K] sorted
    ascending per row. Binary search on the midpoints: O(n log K) and no [R, n, K] temporary."""
    mid = (centroids[:, 1:] + centroids[:, :-1]) * 0.5
    return torch.searchsorted(mid.contiguous(), values.contiguous())


def _init_exact_or_uniform(values: Tensor, k: int) -> Tensor:
    """Uniform grid over [min, max] per row; rows with at most k distinct values get exactly those
    values (so the sketch is lossless there), padded with the row's max."""
    sorted_v, _ = values.sort(dim=1)
    lo, hi = sorted_v[:, :1], sorted_v[:, -1:]
    steps = torch.linspace(0, 1, k, device=values.device, dtype=values.dtype)
    cent = lo + (hi - lo) * steps
    is_new = torch.ones_like(sorted_v, dtype=torch.bool)
    is_new[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    rank = is_new.long().cumsum(1) - 1
    distinct = rank[:, -1] + 1
    few = distinct <= k
    if few.any():
        exact = hi.expand(-1, k).clone()
        exact.scatter_(1, rank.clamp(max=k - 1), sorted_v)
        cent = torch.where(few[:, None], exact, cent)
    return cent


def _init_kmeanspp(values: Tensor, weights: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Batched weighted k-means++ seeding (one draw per row per centroid)."""
    r = values.shape[0]
    rows = torch.arange(r, device=values.device)
    first = torch.multinomial(weights + 1e-12, 1, generator=generator).squeeze(1)
    cent = [values[rows, first]]
    d2 = (values - cent[0][:, None]) ** 2
    for _ in range(1, k):
        p = weights * d2
        p = torch.where(p.sum(1, keepdim=True) > 0, p, torch.ones_like(p))
        pick = torch.multinomial(p, 1, generator=generator).squeeze(1)
        c = values[rows, pick]
        cent.append(c)
        d2 = torch.minimum(d2, (values - c[:, None]) ** 2)
    return torch.stack(cent, 1).sort(dim=1).values


def weighted_lloyd(values: Tensor, num_clusters: int, weights: Tensor | None = None, *,
                   max_iter: int = 100, tol: float = 1e-7, init: str = "uniform",
                   seed: int = 0) -> tuple[Tensor, Tensor]:
    """Weighted 1-D Lloyd over many independent rows at once.

    values [R, n], weights [R, n] (>= 0) or None. Returns (centroids [R, K] sorted ascending,
    assignment [R, n] int64). Each iteration assigns every value to its nearest centroid and moves
    each centroid to the weighted mean of its cluster (an empty cluster keeps its place), so the
    weighted squared error never increases. Each row stops when none of its centroids moves by
    more than tol * (row range), all rows after max_iter iterations.
    """
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D [rows, n], got shape {tuple(values.shape)}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    v = values.to(torch.float32) if values.dtype != torch.float64 else values
    w = torch.ones_like(v) if weights is None else weights.to(v.dtype).expand_as(v)
    if (w < 0).any():
        raise ValueError("weights must be non-negative")
    if init == "uniform":
        cent = _init_exact_or_uniform(v, num_clusters)
    elif init in ("kmeans++", "kmeanspp"):
        gen = torch.Generator(device=v.device).manual_seed(seed)
        cent = _init_kmeanspp(v, w, num_clusters, gen)
    else:
        raise ValueError(f"init must be 'uniform' or 'kmeans++', got {init!r}")
    span = (v.amax(1) - v.amin(1)).clamp_min(torch.finfo(v.dtype).tiny)[:, None]
    tiny = torch.finfo(v.dtype).tiny
    # The values never change, only the centroids: sort each row once, and every iteration's
    # clusters are then K contiguous runs whose ends are K - 1 binary searches of the midpoints
    # (instead of a search of K - 1 midpoints per value). A value equal to a midpoint belongs to
    # the lower cluster, as in assign_nearest, so the clusters are the same.
    sv, order = v.sort(dim=1)
    swt = w.gather(1, order)
    r, n = v.shape
    # Rows converge at very different speeds (a 4-bit layer: half its rows within ~15 iterations,
    # a few after 45), so each row stops on its own: a row whose centroids all moved by at most
    # tol * range is frozen, and the working set is compacted to the live rows whenever they
    # fall below half of it. Frozen-but-not-yet-compacted rows keep their centroids.
    out = cent.clone()
    rows = torch.arange(r, device=v.device)          # working row -> row of `out`
    live = torch.ones(r, dtype=torch.bool, device=v.device)
    for _ in range(max_iter):
        rw = sv.shape[0]
        mid = (cent[:, 1:] + cent[:, :-1]) * 0.5
        ends = torch.searchsorted(sv, mid.contiguous(), right=True)      # values <= mid_j
        # cluster of sorted position i = number of run ends at or before i
        starts = torch.zeros(rw, n + 1, dtype=torch.int64, device=v.device)
        assign = starts.scatter_add_(1, ends, torch.ones_like(ends)).cumsum(1)[:, :n]
        sw = torch.zeros_like(cent).scatter_add_(1, assign, swt)
        # Move each centroid by the weighted mean residual of its cluster rather than recomputing
        # the mean from scratch: a cluster whose values all equal its centroid then stays exactly
        # put (sum(w v) / sum(w) drifts by an ulp), which keeps exact sketches exact.
        res = torch.zeros_like(cent).scatter_add_(1, assign, swt * (sv - cent.gather(1, assign)))
        new = torch.where(sw > 0, cent + res / sw.clamp_min(tiny), cent)
        new = new.sort(dim=1).values
        moved = ((new - cent).abs() / span).amax(1)
        cent = torch.where(live[:, None], new, cent)
        live = live & (moved > tol)
        n_live = int(live.sum())                      # the one host sync per iteration
        if n_live == 0:
            break
        if 2 * n_live < rw:
            out[rows] = cent
            keep = live.nonzero()[:, 0]
            rows, sv, swt, cent, span = rows[keep], sv[keep], swt[keep], cent[keep], span[keep]
            live = live[keep]
    out[rows] = cent
    return out, assign_nearest(v, out)


@register_sketcher("lloyd")
def lloyd_sketch(weight: Tensor, bits: int, groups_per_row: int = 1, *, weights: Tensor | None = None,
                 max_iter: int = 100, tol: float = 1e-7, init: str = "uniform", seed: int = 0):
    """Per-(row, group) 1-D Lloyd on the weight values (optionally weighted per column)."""
    check_bits(bits)
    n, k = weight.shape
    if k % groups_per_row:
        raise ValueError(f"in_features ({k}) must be divisible by groups_per_row ({groups_per_row})")
    gs = k // groups_per_row
    vals = weight.detach().reshape(n * groups_per_row, gs)
    wts = None if weights is None else weights.reshape(-1, k).expand(n, k).reshape(n * groups_per_row, gs)
    cent, assign = weighted_lloyd(vals, 1 << bits, wts, max_iter=max_iter, tol=tol, init=init, seed=seed)
    return assign.reshape(n, k), cent.reshape(n, groups_per_row, 1 << bits)


# --------------------------------------------------------------------------------------------
# Hessian-weighted sketching with error feedback (LeanQuant-style Lloyd + GPTQ-style pass).
#
# Everything below works on one layer at a time and is written as a few big batched tensor
# programs (Lloyd over all (row, group) pairs at once, GEMMs for the error propagation and the
# LUT refit), so the same code is fast on a GPU and correct on the CPU. All math is fp32.
# --------------------------------------------------------------------------------------------

from dataclasses import asdict, dataclass, field  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402


@dataclass
class SketchConfig:
    """How to sketch. The defaults follow ../shared/notes/method.md (LeanQuant's recipe) plus our
    LUT refit. ``calib_samples`` x ``seq_len`` is the calibration size sketch_model documents
    (it uses whatever calibration it is given; the CLI cuts that many windows)."""
    bits: int = 4
    groups_per_row: int = 1
    exponent: float = 4.0          # importance s_j = d_j^-exponent
    damping: float = 0.01          # H += damping * mean(diag H) * I
    act_order: bool = True         # GPTQ pass over columns by descending diag(H)
    error_feedback: bool = True    # GPTQ-style pass with the LUT frozen
    refit: bool = True             # Hessian-weighted least-squares LUT refit (kept if it helps)
    block_size: int = 128          # columns per block of the error-feedback pass
    lloyd_iters: int = 100
    lloyd_tol: float = 1e-6
    init: str = "uniform"          # or "kmeans++"
    seed: int = 0
    calib_samples: int = 128
    seq_len: int = 2048
    # Low-rank branch (spallm_ext.lowrank): rank 0 = plain SketchedLinear layers. With a rank,
    # sketch_model makes LowRankSketchedLinear layers initialised by lowrank_init ("eora", "svd",
    # "zeros") from each layer's calibration Hessian; lowrank_smooth_alpha smooths before the SVD
    # of init="svd"; lowrank_trainable None = "lowrank" for "zeros", "both" otherwise.
    lowrank_rank: int = 0
    lowrank_init: str = "eora"
    lowrank_smooth_alpha: float | None = None
    lowrank_trainable: str | None = None

    def __post_init__(self):
        check_bits(self.bits)
        if self.groups_per_row < 1:
            raise ValueError(f"groups_per_row must be >= 1, got {self.groups_per_row}")
        if not (self.exponent >= 0 and math.isfinite(self.exponent)):
            raise ValueError(f"exponent must be a finite number >= 0, got {self.exponent}")
        if not (self.damping >= 0 and math.isfinite(self.damping)):
            raise ValueError(f"damping must be a finite number >= 0, got {self.damping}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.init not in ("uniform", "kmeans++", "kmeanspp"):
            raise ValueError(f"init must be 'uniform' or 'kmeans++', got {self.init!r}")
        if self.calib_samples < 1 or self.seq_len < 1:
            raise ValueError("calib_samples and seq_len must be >= 1")
        if not isinstance(self.lowrank_rank, int) or self.lowrank_rank < 0:
            raise ValueError(f"lowrank_rank must be an int >= 0, got {self.lowrank_rank!r}")
        if self.lowrank_init not in ("svd", "eora", "zeros"):
            raise ValueError(f"lowrank_init must be 'svd', 'eora' or 'zeros', got {self.lowrank_init!r}")
        if self.lowrank_smooth_alpha is not None:
            if not 0.0 <= self.lowrank_smooth_alpha <= 1.0:
                raise ValueError(f"lowrank_smooth_alpha must lie in [0, 1], got {self.lowrank_smooth_alpha}")
            if self.lowrank_init != "svd":
                raise ValueError("lowrank_smooth_alpha applies to lowrank_init='svd' only")
        if self.lowrank_trainable not in (None, "lut", "lowrank", "both"):
            raise ValueError(f"lowrank_trainable must be None, 'lut', 'lowrank' or 'both', "
                             f"got {self.lowrank_trainable!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SketchConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SketchConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class LayerSketch:
    """Result of sketching one layer: integer codes [out, in] (int64), lut [out, G, 2^b] fp32,
    and figures: relative output error sqrt(tr(E H E^T) / tr(W H W^T)) of each stage."""
    codes: Tensor
    lut: Tensor
    info: dict = field(default_factory=dict)


def output_error(weight: Tensor, w_hat: Tensor, hessian: Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)^T): the layer's summed squared output error on the calibration set
    (up to the 2/N scale of H)."""
    e = (weight - w_hat).to(torch.float32)
    return float(((e @ hessian) * e).sum())


def _relative(err: float, ref: float) -> float:
    return math.sqrt(max(err, 0.0) / ref) if ref > 0 else math.sqrt(max(err, 0.0))


def _decode_groups(codes: Tensor, lut: Tensor) -> Tensor:
    """Dense W from integer codes [n, k] and lut [n, G, K] (pure torch, fp32)."""
    n, k = codes.shape
    g = lut.shape[1]
    return lut.gather(2, codes.reshape(n, g, k // g)).reshape(n, k)


def prepare_hessian(hessian: Tensor, weight: Tensor, damping: float) -> tuple[Tensor, Tensor, Tensor]:
    """Dead columns (H_jj == 0) get H_jj = 1 and W[:, j] = 0; then H += damping * mean(diag) * I.
    Returns (H_damped, W_cleaned, dead mask). Inputs are not modified."""
    h = hessian.to(torch.float32).clone()
    w = weight.to(torch.float32).clone()
    diag = h.diagonal()
    dead = diag == 0
    if dead.any():
        diag[dead] = 1.0
        w[:, dead] = 0.0
    diag += damping * diag.mean()
    return h, w, dead


def _upper_chol_of_inverse(h: Tensor) -> Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), retrying with more damping if H is not
    numerically positive definite."""
    extra = 0.0
    mean_diag = float(h.diagonal().mean())
    for _ in range(6):
        hh = h if extra == 0 else h + extra * mean_diag * torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
        l, info = torch.linalg.cholesky_ex(hh)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(l)
            u, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0:
                return u
        extra = 0.01 if extra == 0 else extra * 10
    raise RuntimeError("Hessian is not positive definite even after extra damping; "
                       "use more calibration data or a larger damping")


def importance(u_diag: Tensor, exponent: float) -> Tensor:
    """s_j = d_j^-p, scaled so the largest is 1 (computed in log space: no overflow)."""
    logd = torch.log(u_diag.clamp_min(torch.finfo(u_diag.dtype).tiny))
    return torch.exp(-exponent * (logd - logd.min()))


def error_feedback_pass(w: Tensor, u: Tensor, lut_by_group: Tensor, col_group: list[int],
                        block_size: int = 128) -> Tensor:
    """GPTQ-style coding with the LUT frozen, in the (possibly permuted) column order of `w`.

    w [n, k] fp32 (not modified), u [k, k] upper Cholesky factor of H^-1 in the same order,
    lut_by_group [G, n, K] sorted ascending per (group, row), col_group[i] = group of column i.
    Each column takes, per row, the nearest entry of ITS OWN group's LUT for its error-updated
    value; the scaled error (w - q) / U_ii is pushed into the later columns of the block through
    row i of U, and into the remaining columns with one GEMM per block. Returns codes [n, k]."""
    n, k = w.shape
    # Work on W^T so each column is one contiguous row (cheap slicing, contiguous searchsorted).
    wt = w.t().contiguous()
    codes_t = torch.empty(k, n, dtype=torch.int64, device=w.device)
    mids = ((lut_by_group[..., 1:] + lut_by_group[..., :-1]) * 0.5).contiguous()
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        wb = wt[b0:b1]                        # view: updates land in wt
        ub = u[b0:b1, b0:b1]
        err = torch.empty(b1 - b0, n, device=w.device, dtype=w.dtype)
        for i in range(b1 - b0):
            g = col_group[b0 + i]
            idx = torch.searchsorted(mids[g], wb[i][:, None])
            codes_t[b0 + i] = idx[:, 0]
            q = lut_by_group[g].gather(1, idx)[:, 0]
            e = (wb[i] - q) / ub[i, i]
            err[i] = e
            if i + 1 < b1 - b0:
                wb[i + 1:] -= ub[i, i + 1:][:, None] * e[None, :]
        if b1 < k:
            wt[b1:] -= u[b0:b1, b1:].t() @ err
    codes = codes_t.t().contiguous()
    return codes


def refit_lut(weight: Tensor, codes: Tensor, lut: Tensor, hessian: Tensor, *,
              ridge: float = 1e-6, max_chunk_bytes: int = 1 << 28) -> Tensor:
    """The LUT minimizing tr((W - Ŵ) H (W - Ŵ)^T) for fixed codes, exactly.

    Ŵ_r = A_r l_r with A_r the one-hot [k, G*K] code matrix of row r and l_r its G*K LUT values,
    so each row solves the normal equations (A_r^T H A_r) l_r = A_r^T H w_r (size G*2^b, all
    groups of a row jointly because H couples them). Solved as an update d_r of the current LUT
    with a tiny ridge, entries no weight uses keep their value.

    A_r is block diagonal: group g's columns only ever hit group g's K entries. So H A_r is built
    group by group, H[:, cols of g] @ one-hot [gs, K] per row, as one GEMM per group and chunk of
    rows: 2 k^2 K flops per row for any G (a dense [k, G*K] one-hot costs G times that, almost all
    of it multiplying zeros). A_r^T (H A_r) sums the k rows of H A_r into the G*K entries, again
    group by group: [K, gs] x [gs, K] blocks, the upper half of the symmetric matrix only."""
    n, k = weight.shape
    g, kk = lut.shape[1], lut.shape[2]
    gk = g * kk
    gs = k // g
    e_full = weight - _decode_groups(codes, lut)                   # [n, k]
    he_full = e_full @ hessian                                     # [n, k]
    new = lut.reshape(n, gk).clone()
    # the chunk's largest buffers: the G products H[:, group] @ one-hot, k * m * G*K floats together
    rows = max(1, min(n, max_chunk_bytes // max(1, 4 * k * gk)))
    hdiag_mean = float(hessian.diagonal().mean())
    h_cols = [hessian[:, j * gs:(j + 1) * gs] for j in range(g)]
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        m = r1 - r0
        ohs, hos = [], []
        for j in range(g):
            # one-hot of group j's codes, laid out [gs, m * K] so all rows share one GEMM; its
            # product with H's group-j columns stays in the GEMM's layout [k, m, K]
            oh = torch.zeros(gs, m, kk, device=weight.device, dtype=torch.float32)
            oh.scatter_(2, codes[r0:r1, j * gs:(j + 1) * gs].t()[:, :, None], 1.0)
            ohs.append(oh)
            hos.append((h_cols[j] @ oh.reshape(gs, m * kk)).reshape(k, m, kk))
        # Block (j, i) of A_r^T (H A_r) and block j of A_r^T H e_r: group j's one-hot against its
        # own columns, as batched GEMMs over strided views (no transposed copies). GEMMs rather
        # than scatter_add, whose CUDA float atomics would make the sketch depend on thread timing.
        mat = torch.empty(m, gk, gk, device=weight.device, dtype=torch.float32)
        rhs = torch.empty(m, gk, device=weight.device, dtype=torch.float32)
        he = he_full[r0:r1]
        for j in range(g):
            at = ohs[j].permute(1, 2, 0)                             # [m, K, gs]: A_r^T of group j
            cols = slice(j * gs, (j + 1) * gs)
            for i in range(j, g):      # the matrix is symmetric: upper blocks, mirrored
                blk = torch.bmm(at, hos[i][cols].transpose(0, 1))
                mat[:, j * kk:(j + 1) * kk, i * kk:(i + 1) * kk] = blk
                if i != j:
                    mat[:, i * kk:(i + 1) * kk, j * kk:(j + 1) * kk] = blk.transpose(1, 2)
            rhs[:, j * kk:(j + 1) * kk] = torch.bmm(at, he[:, cols, None])[:, :, 0]
        del ohs, hos
        used = mat.diagonal(dim1=1, dim2=2) > 0
        scale = mat.diagonal(dim1=1, dim2=2).amax(1).clamp_min(hdiag_mean * 1e-12)
        # ridge and unit diagonal for unused entries, in place (no [m, GK, GK] temporaries)
        mat.diagonal(dim1=1, dim2=2).add_((ridge * scale)[:, None] + (~used).float())
        rhs = torch.where(used, rhs, torch.zeros_like(rhs))
        sol, info = torch.linalg.solve_ex(mat, rhs[:, :, None])
        delta = sol[:, :, 0]
        ok = (info == 0) & torch.isfinite(delta).all(1)
        delta = torch.where(ok[:, None], delta, torch.zeros_like(delta))
        new[r0:r1] += delta
    # A refit LUT may come out of order; the codes index it, so order does not matter for
    # decoding, but the nearest-entry search assumes sorted LUTs: hessian_sketch sorts and remaps.
    return new.reshape(n, g, kk)


def _sort_lut(codes: Tensor, lut: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each (row, group) LUT ascending and remap the codes to match."""
    n, k = codes.shape
    g = lut.shape[1]
    sorted_lut, order = lut.sort(dim=2)
    inv = order.argsort(dim=2)                                    # old index -> new index
    c = codes.reshape(n, g, k // g)
    return inv.gather(2, c).reshape(n, k), sorted_lut


def hessian_sketch(weight: Tensor, hessian: Tensor, config: SketchConfig | None = None,
                   **overrides) -> LayerSketch:
    """Sketch one weight [out, in] with the Hessian proxy H [in, in] of its inputs.

    1. dead columns, damping; 2. optional act-order; 3. importance s_j = d_j^-p from the upper
    Cholesky factor of H^-1; 4. weighted Lloyd over all (row, group) pairs at once -> LUT;
    5. optional error-feedback pass (LUT frozen); 6. optional LUT refit, kept only if it lowers
    tr((W - Ŵ) H (W - Ŵ)^T). Runs on the device of `weight`. Returns codes, LUT and figures."""
    cfg = config or SketchConfig()
    if overrides:
        cfg = SketchConfig.from_dict({**cfg.to_dict(), **overrides})
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}] for a weight of shape {tuple(weight.shape)}, "
                         f"got {tuple(hessian.shape)}")
    gpr = cfg.groups_per_row
    if k % gpr:
        raise ValueError(f"in_features ({k}) must be divisible by groups_per_row ({gpr})")
    gs, kk = k // gpr, 1 << cfg.bits
    dev = weight.device
    times = {}
    t0 = time.perf_counter()
    h_raw = hessian.to(device=dev, dtype=torch.float32)
    h, w, dead = prepare_hessian(h_raw, weight, cfg.damping)
    w_ref = w.clone()
    if cfg.act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    else:
        perm = torch.arange(k, device=dev)
    hp = h[perm][:, perm]
    u = _upper_chol_of_inverse(hp)
    s_perm = importance(u.diagonal(), cfg.exponent)
    s = torch.empty_like(s_perm)
    s[perm] = s_perm
    times["hessian_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    vals = w.reshape(n * gpr, gs)
    wts = s.reshape(1, gpr, gs).expand(n, gpr, gs).reshape(n * gpr, gs)
    cent, assign = weighted_lloyd(vals, kk, wts, max_iter=cfg.lloyd_iters, tol=cfg.lloyd_tol,
                                  init=cfg.init, seed=cfg.seed)
    lut = cent.reshape(n, gpr, kk).contiguous()
    codes = assign.reshape(n, k)
    times["lloyd_s"] = time.perf_counter() - t0
    ref = output_error(w_ref, torch.zeros_like(w_ref), h_raw)
    err_lloyd = output_error(w_ref, _decode_groups(codes, lut), h_raw)
    info = {"rel_err_lloyd": _relative(err_lloyd, ref)}
    err = err_lloyd

    if cfg.error_feedback:
        t0 = time.perf_counter()
        wp = w[:, perm].contiguous()
        col_group = (perm // gs).tolist()
        lut_by_group = lut.permute(1, 0, 2).contiguous()
        codes_p = error_feedback_pass(wp, u, lut_by_group, col_group, cfg.block_size)
        codes = torch.empty_like(codes_p)
        codes[:, perm] = codes_p
        err = output_error(w_ref, _decode_groups(codes, lut), h_raw)
        info["rel_err_feedback"] = _relative(err, ref)
        times["feedback_s"] = time.perf_counter() - t0

    if cfg.refit:
        t0 = time.perf_counter()
        new_lut = refit_lut(w_ref, codes, lut, h)
        err_refit = output_error(w_ref, _decode_groups(codes, new_lut), h_raw)
        info["rel_err_refit"] = _relative(err_refit, ref)
        info["refit_kept"] = bool(math.isfinite(err_refit) and err_refit < err)
        if info["refit_kept"]:
            codes, lut = _sort_lut(codes, new_lut)
            err = err_refit
        times["refit_s"] = time.perf_counter() - t0
    info["rel_err"] = _relative(err, ref)
    info["dead_columns"] = int(dead.sum())
    info["times"] = times
    return LayerSketch(codes=codes, lut=lut.contiguous(), info=info)


@register_sketcher("hessian")
def hessian_sketcher(weight: Tensor, bits: int, groups_per_row: int = 1, *, hessian: Tensor,
                     **kwargs):
    """The calibration-driven sketcher as a registry entry:
    SketchedLinear.from_linear(lin, bits, G, sketcher="hessian", hessian=H, exponent=..., ...)."""
    res = hessian_sketch(weight, hessian, SketchConfig(bits=bits, groups_per_row=groups_per_row, **kwargs))
    return res.codes, res.lut

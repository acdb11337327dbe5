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
    weighted squared error never increases. Stops when no centroid moves by more than
    tol * (row range), or after max_iter iterations.
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
    for _ in range(max_iter):
        assign = assign_nearest(v, cent)
        sw = torch.zeros_like(cent).scatter_add_(1, assign, w)
        # Move each centroid by the weighted mean residual of its cluster rather than recomputing
        # the mean from scratch: a cluster whose values all equal its centroid then stays exactly
        # put (sum(w v) / sum(w) drifts by an ulp), which keeps exact sketches exact.
        res = torch.zeros_like(cent).scatter_add_(1, assign, w * (v - cent.gather(1, assign)))
        new = torch.where(sw > 0, cent + res / sw.clamp_min(tiny), cent)
        new = new.sort(dim=1).values
        moved = ((new - cent).abs() / span).max()
        cent = new
        if moved <= tol:
            break
    return cent, assign_nearest(v, cent)


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

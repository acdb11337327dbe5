"""spallm_ext.weighted_lloyd (batched weighted 1-D k-means) and the "lloyd" sketcher."""
from __future__ import annotations

import pytest
import torch

import spallm_ext
from spallm_ext.sketch import lloyd_sketch



def _sse(values, weights, cent, assign):
    return (weights * (values - cent.gather(1, assign)) ** 2).sum(1)


def _data(rows=8, n=50, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(rows, n, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.rand(rows, n, generator=gen, dtype=torch.float64).to(dtype)
    return v, w


@pytest.mark.parametrize("init", ["uniform", "kmeans++"])
@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_sse_never_increases(init, k):
    v, w = _data(seed=k)
    prev = None
    for it in (0, 1, 2, 5, 20, 100):
        cent, assign = spallm_ext.weighted_lloyd(v, k, w, max_iter=it, init=init, seed=3, tol=0.0)
        sse = _sse(v, w, cent, assign)
        if prev is not None:
            assert (sse <= prev * (1 + 1e-6) + 1e-12).all(), (it, sse - prev)
        prev = sse
    init_sse = _sse(v, w, *spallm_ext.weighted_lloyd(v, k, w, max_iter=0, init=init, seed=3))
    # and the iterations do real work on continuous data
    assert (prev.sum() < init_sse.sum())


@pytest.mark.parametrize("init", ["uniform", "kmeans++"])
def test_centroids_sorted_and_assignment_nearest(init):
    v, w = _data(rows=5, n=40, seed=1)
    cent, assign = spallm_ext.weighted_lloyd(v, 8, w, init=init)
    assert cent.shape == (5, 8) and assign.shape == (5, 40) and assign.dtype == torch.int64
    assert (cent[:, 1:] >= cent[:, :-1]).all()
    assert int(assign.min()) >= 0 and int(assign.max()) < 8
    dist = (v[:, :, None] - cent[:, None, :]).abs()
    chosen = dist.gather(2, assign[:, :, None]).squeeze(2)
    assert torch.allclose(chosen, dist.min(2).values, rtol=0, atol=1e-6)


def _textbook_lloyd(v, w, cent, iters):
    """Per-value Lloyd in float64: nearest centroid by full distance (ties to the lower index),
    weighted means, empty clusters stay."""
    for _ in range(iters):
        a = (v[:, :, None] - cent[:, None, :]).abs().argmin(2)
        onehot = torch.nn.functional.one_hot(a, cent.shape[1]).to(v.dtype)
        sw = (onehot * w[:, :, None]).sum(1)
        swv = (onehot * (w * v)[:, :, None]).sum(1)
        cent = torch.where(sw > 0, swv / sw.clamp_min(1e-300), cent).sort(1).values
    return cent


@pytest.mark.parametrize("k", [2, 3, 8, 16])
@pytest.mark.parametrize("iters", [1, 3, 12])
def test_iterations_match_textbook_lloyd(k, iters):
    """The sorted-runs iteration (clusters as contiguous runs of the row's sorted values) takes the
    same steps as assigning every value to its nearest centroid; includes repeated values and
    zero weights, which make empty and tied clusters."""
    v, w = _data(rows=6, n=45, seed=k + 10 * iters, dtype=torch.float64)
    # many equal values, drawn from 12 random ones per row (no value sits on a midpoint, where
    # the two ways of computing "nearest" may round differently)
    gen = torch.Generator().manual_seed(k * iters)
    v = v[:, :12].gather(1, torch.randint(0, 12, v.shape, generator=gen))
    w[:, ::7] = 0.0
    c0, _ = spallm_ext.weighted_lloyd(v, k, w, max_iter=0)
    cent, assign = spallm_ext.weighted_lloyd(v, k, w, max_iter=iters, tol=0.0)
    want = _textbook_lloyd(v, w, c0, iters)
    assert torch.allclose(cent, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_rows_stop_independently(tol):
    """Each row stops on its own tolerance: a row's result does not depend on the rows batched
    with it, though they converge after very different numbers of iterations (rows of 3 distinct
    values are done at once, smooth rows take dozens) and the working set is compacted."""
    v, w = _data(rows=24, n=200, seed=5)
    v[::3] = torch.tensor([-1.0, 0.5, 2.0]).repeat(67)[:200]
    v[1::6] = v[1::6] ** 3                               # heavy tails: slow rows
    cent, assign = spallm_ext.weighted_lloyd(v, 8, w, tol=tol)
    for r in range(24):
        c1, a1 = spallm_ext.weighted_lloyd(v[r:r + 1], 8, w[r:r + 1], tol=tol)
        assert torch.equal(cent[r:r + 1], c1) and torch.equal(assign[r:r + 1], a1), r


def test_single_cluster_is_weighted_mean():
    v, w = _data(rows=4, n=30, seed=2, dtype=torch.float64)
    cent, assign = spallm_ext.weighted_lloyd(v, 1, w)
    assert torch.allclose(cent[:, 0], (w * v).sum(1) / w.sum(1), rtol=1e-12, atol=1e-12)
    assert (assign == 0).all()


def test_zero_weights_are_ignored():
    v = torch.tensor([[0.0, 1.0, 100.0]])
    w = torch.tensor([[1.0, 1.0, 0.0]])
    cent, _ = spallm_ext.weighted_lloyd(v, 1, w)
    assert cent.item() == pytest.approx(0.5)


def test_few_distinct_values_exact_at_init():
    """The init alone puts a row with <= K distinct values exactly on its values."""
    v = torch.tensor([[0.3, -1.7, 0.3, 2.1, -1.7, 0.3, 2.1, 0.3],
                      [0.1] * 8,
                      [5.0, -5.0, 5.0, -5.0, 5.0, -5.0, 5.0, -5.0]])
    cent, assign = spallm_ext.weighted_lloyd(v, 4, max_iter=0)
    assert torch.equal(cent.gather(1, assign), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_when_k_at_least_distinct_values(dtype):
    gen = torch.Generator().manual_seed(4)
    levels = torch.tensor([-0.7, -0.1, 0.1, 0.3, 0.9], dtype=dtype)
    v = levels[torch.randint(0, 5, (6, 37), generator=gen)]
    v[2] = 0.1             # a row of all-equal values
    v[3, :] = levels[:2].repeat(19)[:37]  # two distinct values
    for k in (8, 16):
        weights = torch.rand(6, 37, generator=gen, dtype=dtype) + 0.1
        for w in (None, weights):
            cent, assign = spallm_ext.weighted_lloyd(v, k, w)
            assert torch.equal(cent.gather(1, assign), v)
            assert (cent[:, 1:] >= cent[:, :-1]).all()


def test_kmeanspp_deterministic_for_seed():
    v, w = _data(rows=6, n=64, seed=5)
    a = spallm_ext.weighted_lloyd(v, 8, w, init="kmeans++", seed=11)
    b = spallm_ext.weighted_lloyd(v, 8, w, init="kmeans++", seed=11)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (a[0][:, 1:] >= a[0][:, :-1]).all()
    # the seed matters: another seed gives another seeding
    i1 = spallm_ext.weighted_lloyd(v, 8, w, init="kmeans++", seed=11, max_iter=0)[0]
    i2 = spallm_ext.weighted_lloyd(v, 8, w, init="kmeans++", seed=12, max_iter=0)[0]
    assert not torch.equal(i1, i2)
    # kmeans++ seeds are data points
    assert all(torch.isin(i1[r], v[r]).all() for r in range(v.shape[0]))


def test_weighted_lloyd_rejects_bad_input():
    v = torch.randn(3, 10)
    with pytest.raises(ValueError, match="values must be 2-D"):
        spallm_ext.weighted_lloyd(v.flatten(), 4)
    with pytest.raises(ValueError, match="num_clusters"):
        spallm_ext.weighted_lloyd(v, 0)
    with pytest.raises(ValueError, match="weights must be non-negative"):
        spallm_ext.weighted_lloyd(v, 4, -torch.ones_like(v))
    with pytest.raises(ValueError, match="init"):
        spallm_ext.weighted_lloyd(v, 4, init="random")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lloyd_sketch_shapes_and_error(bits):
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(5, 48, generator=gen)
    codes, lut = lloyd_sketch(w, bits, 3)
    assert codes.shape == (5, 48) and lut.shape == (5, 3, 1 << bits)
    assert int(codes.min()) >= 0 and int(codes.max()) < (1 << bits)
    packed = spallm_ext.pack_codes(codes, bits)
    w_hat = spallm_ext.lut_decode(packed, lut.contiguous())
    # per (row, group) 1-D k-means: each weight is decoded to its nearest level
    groups = w.reshape(5, 3, 16)
    levels = lut[:, :, None, :]
    nearest = (groups[..., None] - levels).abs().min(-1).values
    assert torch.allclose((w_hat.reshape(5, 3, 16) - groups).abs(), nearest, atol=1e-6)
    with pytest.raises(ValueError, match="groups_per_row"):
        lloyd_sketch(w, bits, 5)

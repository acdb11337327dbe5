"""Hessian-weighted sketching (spallm_ext.sketch.hessian_sketch): error feedback, act-order,
LUT refit, determinism, dead columns, CPU/CUDA agreement."""
from __future__ import annotations

import os

import pytest
import torch

from spallm_ext import SketchedLinear
from spallm_ext.sketch import (SketchConfig, _decode_groups, hessian_sketch, prepare_hessian,
                               refit_lut)
from conftest import DEVICES


def _problem(n=48, k=128, tokens=1024, seed=0, corr=True, device="cpu"):
    """A weight and the Hessian of correlated (or independent) inputs with uneven scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    if corr:
        mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
        x = x @ mix
    x = x * (0.2 + torch.rand(k, generator=g) * 3)
    h = 2.0 / tokens * x.t() @ x
    w = torch.randn(n, k, generator=g) * 0.05
    return w.to(device), h.to(device), x.to(device)


@pytest.mark.parametrize("bits,groups", [(2, 1), (3, 2), (4, 4)])
def test_error_feedback_lowers_output_error(bits, groups):
    w, h, x = _problem(seed=bits)
    for act_order in (False, True):
        base = hessian_sketch(w, h, bits=bits, groups_per_row=groups, act_order=act_order,
                              error_feedback=False, refit=False)
        ef = hessian_sketch(w, h, bits=bits, groups_per_row=groups, act_order=act_order,
                            error_feedback=True, refit=False)
        assert ef.info["rel_err"] < 0.97 * base.info["rel_err"], (act_order, ef.info, base.info)
        # the figure is the true output error on the calibration inputs
        y = x @ w.t()
        yh = x @ _decode_groups(ef.codes, ef.lut).t()
        assert abs((yh - y).norm() / y.norm() - ef.info["rel_err"]) < 1e-3


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ef", [False, True])
def test_refit_never_raises_output_error(seed, ef):
    w, h, _ = _problem(seed=10 + seed, corr=seed % 2 == 0)
    for bits, groups in ((2, 1), (4, 2)):
        off = hessian_sketch(w, h, bits=bits, groups_per_row=groups, error_feedback=ef, refit=False)
        on = hessian_sketch(w, h, bits=bits, groups_per_row=groups, error_feedback=ef, refit=True)
        assert on.info["rel_err"] <= off.info["rel_err"] + 1e-12
        # the kept LUT is sorted per (row, group), as the nearest-entry search expects
        assert (on.lut[..., 1:] >= on.lut[..., :-1]).all()


@pytest.mark.parametrize("bits,groups,chunk_rows", [(2, 2, 3), (2, 4, 2), (3, 2, 1), (2, 1, 1)])
def test_refit_is_the_least_squares_optimum(bits, groups, chunk_rows):
    """refit_lut solves min_l tr((W - A l) H (W - A l)^T) exactly: compare with a dense lstsq per
    row, also when the rows run in several chunks (max_chunk_bytes fits chunk_rows rows)."""
    n, k = 5, 32
    kk = 1 << bits
    w, h, _ = _problem(n=n, k=k, seed=3)
    res = hessian_sketch(w, h, bits=bits, groups_per_row=groups, refit=False)
    hd, wc, _ = prepare_hessian(h, w, 0.0)
    new = refit_lut(wc.double().float(), res.codes, res.lut, hd, ridge=0.0,
                    max_chunk_bytes=4 * k * groups * kk * chunk_rows)
    l_chol = torch.linalg.cholesky(hd.double())
    gs = k // groups
    for r in range(n):
        a = torch.zeros(k, groups * kk, dtype=torch.float64)
        a[torch.arange(k), res.codes[r] + (torch.arange(k) // gs) * kk] = 1.0
        # minimize ||L^T (w - A l)||^2; entries no weight uses keep their value
        used = a.sum(0) > 0
        sol = torch.linalg.lstsq(l_chol.t() @ a[:, used], l_chol.t() @ wc[r].double()).solution
        assert torch.allclose(new[r].reshape(-1).double()[used], sol, rtol=1e-3, atol=1e-5)
        assert torch.equal(new[r].reshape(-1)[~used], res.lut[r].reshape(-1)[~used])


def test_exact_when_few_distinct_values():
    """Rows with at most 2^b distinct values per group are sketched exactly, feedback or not."""
    g = torch.Generator().manual_seed(1)
    levels = torch.randn(40, 2, 4, generator=g)
    idx = torch.randint(0, 4, (40, 2, 32), generator=g)
    w = levels.gather(2, idx).reshape(40, 64)
    _, h, _ = _problem(n=40, k=64, seed=2)
    for ef in (False, True):
        for act_order in (False, True):
            res = hessian_sketch(w, h, bits=2, groups_per_row=2, error_feedback=ef, act_order=act_order)
            assert torch.allclose(_decode_groups(res.codes, res.lut), w, atol=1e-6)


def _reference_feedback(w, u, lut, col_group):
    """Unblocked GPTQ loop, one column at a time, argmin over the column's own group LUT."""
    w = w.clone()
    n, k = w.shape
    codes = torch.empty(n, k, dtype=torch.long)
    for i in range(k):
        cand = lut[:, col_group[i], :]                       # [n, K]
        c = (w[:, i:i + 1] - cand).abs().argmin(1)
        codes[:, i] = c
        q = cand.gather(1, c[:, None])[:, 0]
        e = (w[:, i] - q) / u[i, i]
        w[:, i + 1:] -= e[:, None] * u[i, i + 1:][None, :]
    return codes


@pytest.mark.parametrize("act_order", [False, True])
def test_feedback_pass_matches_unblocked_reference(act_order):
    """The blocked pass equals the textbook column loop, and with act-order every column is
    coded with the LUT of its own group (groups here have very different scales)."""
    from spallm_ext.sketch import _upper_chol_of_inverse, error_feedback_pass
    w, h, _ = _problem(n=16, k=96, seed=4)
    w = (w * torch.tensor([1e-3, 1.0, 1e-2]).repeat_interleave(32)[None, :]).double()
    h = h.double() + 0.01 * h.diagonal().mean() * torch.eye(96, dtype=torch.float64)
    res = hessian_sketch(w.float(), h.float(), bits=3, groups_per_row=3, error_feedback=False, refit=False)
    lut = res.lut.double()
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(96)
    u = _upper_chol_of_inverse(h[perm][:, perm])
    col_group = (perm // 32).tolist()
    got = error_feedback_pass(w[:, perm], u, lut.permute(1, 0, 2).contiguous(), col_group, block_size=16)
    ref = _reference_feedback(w[:, perm], u, lut, col_group)
    assert torch.equal(got, ref)
    if act_order:
        assert col_group != sorted(col_group)   # the permutation really interleaves groups


def test_dead_columns():
    w, h, _ = _problem(n=8, k=64, seed=5)
    h[:, 7] = 0
    h[7, :] = 0
    res = hessian_sketch(w, h, bits=4, groups_per_row=2)
    assert res.info["dead_columns"] == 1
    assert torch.isfinite(res.lut).all()
    assert res.info["rel_err"] < 0.2


def test_deterministic_for_a_seed():
    w, h, _ = _problem(seed=6)
    for init in ("uniform", "kmeans++"):
        a = hessian_sketch(w, h, bits=3, groups_per_row=2, init=init, seed=7)
        b = hessian_sketch(w, h, bits=3, groups_per_row=2, init=init, seed=7)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.lut, b.lut)


@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_repeatable_in_deterministic_mode(device):
    """Under torch.use_deterministic_algorithms(True) every stage runs without float atomics
    (the Lloyd means' scatter_add included), so two sketches on one device are bit for bit equal;
    on CUDA this is the documented way to repeatable sketches. Rows are given many equal weights,
    whose cluster sums are where a different summation order would show."""
    # CUBLAS_WORKSPACE_CONFIG, which torch asks for with cuBLAS, is set by conftest (torch reads it
    # at the process's first cuBLAS call, too early for a monkeypatch here)
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    w, h, _ = _problem(n=96, k=256, seed=12, device=device)
    w = torch.round(w * 200) / 200
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a = hessian_sketch(w, h, bits=4, groups_per_row=2)
        b = hessian_sketch(w, h, bits=4, groups_per_row=2)
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.lut, b.lut)
    assert a.info["refit_kept"] and a.info["rel_err"] < a.info["rel_err_lloyd"]


def test_exponent_zero_is_unweighted_lloyd():
    from spallm_ext.sketch import lloyd_sketch
    w, h, _ = _problem(n=8, k=64, seed=8)
    res = hessian_sketch(w, h, bits=3, groups_per_row=2, exponent=0.0, error_feedback=False, refit=False,
                         lloyd_tol=1e-7)
    codes, lut = lloyd_sketch(w, 3, 2)
    assert torch.allclose(res.lut, lut, atol=1e-6) and torch.equal(res.codes, codes)


def test_hessian_sketcher_registry_and_from_linear():
    w, h, x = _problem(n=24, k=64, seed=9)
    lin = torch.nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight.copy_(w)
    plain = SketchedLinear.from_linear(lin, bits=3, groups_per_row=2)
    hs = SketchedLinear.from_linear(lin, bits=3, groups_per_row=2, sketcher="hessian", hessian=h)
    with torch.no_grad():
        y = lin(x)
        assert (hs(x) - y).norm() < (plain(x) - y).norm()


def test_config_validation():
    with pytest.raises(ValueError, match="bits"):
        SketchConfig(bits=5)
    with pytest.raises(ValueError, match="groups_per_row"):
        SketchConfig(groups_per_row=0)
    with pytest.raises(ValueError, match="unknown SketchConfig"):
        SketchConfig.from_dict({"bitz": 4})
    w, h, _ = _problem(n=4, k=64)
    with pytest.raises(ValueError, match="hessian must be"):
        hessian_sketch(w, h[:10, :10])
    with pytest.raises(ValueError, match="divisible"):
        hessian_sketch(w, h, groups_per_row=3)


@pytest.mark.parametrize("device", DEVICES)
def test_cpu_and_device_agree(device):
    w, h, _ = _problem(n=64, k=256, seed=11)
    cpu = hessian_sketch(w, h, bits=4, groups_per_row=2)
    dev = hessian_sketch(w.to(device), h.to(device), bits=4, groups_per_row=2)
    assert abs(cpu.info["rel_err"] - dev.info["rel_err"]) < 0.02 * cpu.info["rel_err"]
    w_cpu = _decode_groups(cpu.codes, cpu.lut)
    w_dev = _decode_groups(dev.codes.cpu(), dev.lut.cpu())
    # fp32 reductions differ between devices; the sketches agree almost everywhere
    assert (cpu.codes == dev.codes.cpu()).float().mean() > 0.95
    assert (w_cpu - w_dev).norm() / w.norm() < 0.05

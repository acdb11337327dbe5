"""Property-based: every op against the reference on small random shapes, widths, groups and dtypes."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spallm_ext
from spallm_ext import reference
from spallm_ext.formats import pack_unit

from conftest import DEVICES, assert_close_rel


@st.composite
def problems(draw, allow_fp64: bool):
    bits = draw(st.sampled_from([2, 3, 4]))
    groups = draw(st.sampled_from([1, 2, 3, 4, 8]))
    unit = pack_unit(bits)
    # in_features: a multiple of both the packing unit and groups_per_row
    lcm = unit * groups // math.gcd(unit, groups)
    k = lcm * draw(st.integers(1, max(1, 48 // lcm)))
    n = draw(st.integers(1, 9))
    lead = draw(st.sampled_from([(0,), (1,), (2,), (5,), (13,), (2, 3), (1, 1, 4)]))
    dts = [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if allow_fp64 else [])
    act = draw(st.sampled_from(dts))
    lut_dt = draw(st.sampled_from(dts))
    seed = draw(st.integers(0, 2**31 - 1))
    return bits, groups, k, n, lead, act, lut_dt, seed


def _run(device, problem):
    bits, groups, k, n, lead, act, lut_dt, seed = problem
    gen = torch.Generator().manual_seed(seed)
    codes = spallm_ext.pack_codes(torch.randint(0, 1 << bits, (n, k), generator=gen), bits).to(device)
    lut = torch.randn(n, groups, 1 << bits, generator=gen).to(device=device, dtype=lut_dt)
    x = torch.randn(*lead, k, generator=gen).to(device=device, dtype=act)
    dy = torch.randn(*lead, n, generator=gen).to(device=device, dtype=act)
    bias = torch.randn(n, generator=gen).to(device=device, dtype=act)

    assert_close_rel(spallm_ext.lut_linear(x, codes, lut), reference.lut_linear(x, codes, lut))
    assert_close_rel(spallm_ext.lut_linear(x, codes, lut, bias), reference.lut_linear(x, codes, lut, bias))
    assert_close_rel(spallm_ext.lut_linear_dx(dy, codes, lut), reference.lut_linear_dx(dy, codes, lut))
    dl = spallm_ext.lut_grad(dy, x, codes, groups, 1 << bits)
    # bf16 dy and x may take bf16 GEMMs (the CPU's bf16 tiles from 8 / 16 tokens on): dW is then
    # rounded to bf16 once before the fp32 bucket sums, as autocast's weight gradients are
    # (tests/test_cpu_paths.py bounds that rounding exactly); other dtypes sum fp32 products.
    assert_close_rel(dl, reference.lut_grad(dy, x, codes, groups, 1 << bits),
                     torch.bfloat16 if act == torch.bfloat16 else None)
    assert torch.equal(spallm_ext.lut_decode(codes, lut), reference.lut_decode(codes, lut))


@settings(deadline=None, max_examples=80)
@given(problem=problems(allow_fp64=True))
def test_property_ops_match_reference_cpu(problem):
    _run("cpu", problem)


@pytest.mark.parametrize("device", [p for p in DEVICES if p.values[0] == "cuda"])
@settings(deadline=None, max_examples=80)
@given(problem=problems(allow_fp64=False))
def test_property_ops_match_reference_cuda(device, problem):
    _run(device, problem)

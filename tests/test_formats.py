"""The canonical packed layout (pack_codes / unpack_codes) and SketchTune's layout (from/to_official)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spallm_ext
from spallm_ext import reference
from spallm_ext.formats import pack_unit, row_bytes, sketch_bytes

from conftest import ALL_BITS, make_codes


# ---------------------------------------------------------------- literal layouts


def test_4bit_layout_is_high_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0, 7, 9], [0, 15, 3, 3, 10, 11]])
    packed = spallm_ext.pack_codes(codes, 4)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3)
    for r in range(2):
        for i in range(3):
            assert int(packed[r, i]) == (int(codes[r, 2 * i]) << 4) | int(codes[r, 2 * i + 1])


def test_4bit_layout_random_literal():
    codes = torch.randint(0, 16, (5, 38), generator=torch.Generator().manual_seed(1))
    packed = spallm_ext.pack_codes(codes, 4)
    expected = ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    assert torch.equal(packed, expected)


def test_2bit_layout_is_msb_first():
    codes = torch.tensor([[3, 0, 1, 2, 0, 0, 0, 3]])
    packed = spallm_ext.pack_codes(codes, 2)
    assert packed.tolist() == [[(3 << 6) | (0 << 4) | (1 << 2) | 2, 3]]


def test_3bit_layout_is_bit_planes():
    codes = torch.tensor([[5, 0, 7, 1, 2, 3, 4, 6]])
    packed = spallm_ext.pack_codes(codes, 3)
    assert packed.shape == (1, 3)
    for p in range(3):
        byte = sum(((int(codes[0, j]) >> p) & 1) << (7 - j) for j in range(8))
        assert int(packed[0, p]) == byte


@pytest.mark.parametrize("bits", ALL_BITS)
def test_row_bytes_and_pack_unit(bits):
    unit = pack_unit(bits)
    assert unit == {2: 4, 3: 8, 4: 2}[bits]
    k = unit * 7
    assert row_bytes(k, bits) == k * bits // 8
    packed = spallm_ext.pack_codes(make_codes(3, k, bits), bits)
    assert packed.shape == (3, row_bytes(k, bits))
    with pytest.raises(ValueError, match="in_features"):
        row_bytes(k + 1, bits)


def test_sketch_bytes_counts_codes_and_lut():
    # 4-bit, 8 x 32, 2 groups, fp16 LUT: 8 * 16 code bytes + 8 * 2 * 16 * 2 LUT bytes.
    assert sketch_bytes(8, 32, 4, 2, torch.float16) == 8 * 16 + 8 * 2 * 16 * 2
    assert sketch_bytes(8, 32, 3, 1, torch.float32) == 8 * 12 + 8 * 8 * 4


# ---------------------------------------------------------------- round-trip


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("mode", ["random", "zeros", "equal", "alternating", "max"])
def test_roundtrip_modes(bits, mode):
    codes = make_codes(7, pack_unit(bits) * 5, bits, mode=mode, gen=torch.Generator().manual_seed(2))
    packed = spallm_ext.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.is_contiguous()
    out = spallm_ext.unpack_codes(packed, bits)
    assert out.dtype == torch.uint8
    assert torch.equal(out.long(), codes)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_pack_accepts_integer_dtypes(dtype):
    codes = make_codes(3, 16, 3, gen=torch.Generator().manual_seed(3))
    assert torch.equal(spallm_ext.pack_codes(codes.to(dtype), 3), spallm_ext.pack_codes(codes, 3))


@settings(deadline=None, max_examples=60)
@given(bits=st.sampled_from(ALL_BITS), n=st.integers(0, 6), units=st.integers(0, 12),
       seed=st.integers(0, 2**31 - 1))
def test_property_pack_unpack_roundtrip(bits, n, units, seed):
    k = pack_unit(bits) * units
    codes = torch.randint(0, 1 << bits, (n, k), generator=torch.Generator().manual_seed(seed))
    packed = spallm_ext.pack_codes(codes, bits)
    assert packed.shape == (n, row_bytes(k, bits))
    assert torch.equal(spallm_ext.unpack_codes(packed, bits).long(), codes)


@settings(deadline=None, max_examples=60)
@given(bits=st.sampled_from(ALL_BITS), n=st.integers(1, 6), units=st.integers(1, 10),
       seed=st.integers(0, 2**31 - 1))
def test_property_unpack_pack_is_identity_on_bytes(bits, n, units, seed):
    """Every byte pattern is a valid packing: unpack then pack gives the same bytes back."""
    nbytes = row_bytes(pack_unit(bits) * units, bits)
    packed = torch.randint(0, 256, (n, nbytes), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)
    codes = spallm_ext.unpack_codes(packed, bits)
    assert int(codes.max()) < (1 << bits)
    assert torch.equal(spallm_ext.pack_codes(codes, bits), packed)


# ---------------------------------------------------------------- pack_codes rejects


@pytest.mark.parametrize("bits", ALL_BITS)
def test_pack_rejects_negative_codes(bits):
    codes = make_codes(2, pack_unit(bits) * 2, bits)
    codes[1, 3] = -1
    with pytest.raises(ValueError, match="out of range"):
        spallm_ext.pack_codes(codes, bits)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_pack_rejects_too_large_codes(bits):
    codes = make_codes(2, pack_unit(bits) * 2, bits)
    codes[0, 1] = 1 << bits
    with pytest.raises(ValueError, match="out of range"):
        spallm_ext.pack_codes(codes, bits)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_pack_rejects_bad_in_features(bits):
    codes = torch.zeros(2, pack_unit(bits) * 2 + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="in_features"):
        spallm_ext.pack_codes(codes, bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.bool])
def test_pack_rejects_non_integer_codes(dtype):
    with pytest.raises(TypeError, match="codes must be an integer tensor"):
        spallm_ext.pack_codes(torch.zeros(2, 8, dtype=dtype), 4)


@pytest.mark.parametrize("bits", [0, 1, 5, 8])
def test_pack_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        spallm_ext.pack_codes(torch.zeros(2, 8, dtype=torch.long), bits)
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        spallm_ext.unpack_codes(torch.zeros(2, 8, dtype=torch.uint8), bits)


def test_pack_rejects_non_2d():
    with pytest.raises(ValueError, match="codes must be 2-D"):
        spallm_ext.pack_codes(torch.zeros(2, 2, 8, dtype=torch.long), 4)


def test_unpack_rejects_bad_input():
    with pytest.raises(TypeError, match="uint8"):
        spallm_ext.unpack_codes(torch.zeros(2, 8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="2-D"):
        spallm_ext.unpack_codes(torch.zeros(8, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="multiple of 3 bytes"):
        spallm_ext.unpack_codes(torch.zeros(2, 4, dtype=torch.uint8), 3)


# ---------------------------------------------------------------- SketchTune's layout


def _official(n, k, bits, groups, seed=0):
    """A SketchTune layer: quant_grid [n, G, 2^b], weight_codes [n, G, k/(2G)] with b-bit codes in
    a 4-bit container (high nibble = even column), plus the plain codes it holds."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    nib = ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    quant_grid = torch.randn(n, groups, 1 << bits, generator=gen)
    return quant_grid, nib.reshape(n, groups, k // (2 * groups)), codes


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_from_to_official_roundtrip(bits, groups):
    n, k = 6, 48
    quant_grid, weight_codes, plain = _official(n, k, bits, groups, seed=bits * 10 + groups)
    codes, lut = spallm_ext.from_official(quant_grid, weight_codes)
    assert codes.dtype == torch.uint8 and codes.shape == (n, row_bytes(k, bits))
    assert torch.equal(lut, quant_grid)
    if bits == 4:
        # byte-identical: the official 4-bit layout is ours
        assert torch.equal(codes, weight_codes.reshape(n, -1))
    else:
        assert torch.equal(codes, spallm_ext.pack_codes(plain, bits))
    assert torch.equal(spallm_ext.unpack_codes(codes, bits).long(), plain)
    # decodes to the same weight as the 4-bit container decoded by the reference
    container_lut = torch.zeros(n, groups, 16)
    container_lut[..., : 1 << bits] = quant_grid
    w_official = reference.lut_decode(weight_codes.reshape(n, -1), container_lut)
    assert torch.equal(reference.lut_decode(codes, lut), w_official)
    assert torch.equal(spallm_ext.lut_decode(codes, lut), w_official)
    # and back, byte for byte
    qg2, wc2 = spallm_ext.to_official(codes, lut)
    assert torch.equal(qg2, quant_grid)
    assert wc2.dtype == torch.uint8 and wc2.shape == weight_codes.shape
    assert torch.equal(wc2, weight_codes)


def test_from_official_rejects_bad_input():
    quant_grid, weight_codes, _ = _official(4, 16, 4, 2)
    with pytest.raises(TypeError, match="weight_codes must be uint8"):
        spallm_ext.from_official(quant_grid, weight_codes.to(torch.int32))
    with pytest.raises(ValueError, match="rows"):
        spallm_ext.from_official(quant_grid, weight_codes[:3])
    with pytest.raises(ValueError, match="4, 8 or 16 entries"):
        spallm_ext.from_official(quant_grid[..., :5], weight_codes)
    with pytest.raises(ValueError, match="3-D"):
        spallm_ext.from_official(quant_grid.reshape(4, 2, 1, 16), weight_codes)


def test_to_official_rejects_indivisible_groups():
    # in_features 12 with 4 groups: a group of 3 columns cannot be a whole number of bytes.
    codes = spallm_ext.pack_codes(make_codes(2, 12, 4), 4)
    with pytest.raises(ValueError, match="divisible by 2 \\* groups_per_row"):
        spallm_ext.to_official(codes, torch.zeros(2, 4, 16))

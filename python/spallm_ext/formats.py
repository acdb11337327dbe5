"""The canonical packed layout of SpaLLM codes, and conversion to and from SketchTune's layout.

Codes of a weight W [out_features, in_features] are stored as uint8 [out_features, row_bytes]:

* 4-bit: two codes per byte, HIGH nibble = even column. This is byte for byte the official
  SketchTune layout (their weight_codes [out, G, in/(2G)] is the same memory as [out, in/2]).
* 2-bit: four codes per byte, the lowest column in the top two bits.
* 3-bit: bit planes over chunks of 8 columns, 3 bytes per chunk; byte p of a chunk holds bit p of
  its 8 codes, column j of the chunk at bit 7 - j. Three bits per weight, really.

in_features must be a multiple of `pack_unit(bits)` (2, 8 or 4 columns for 4, 3, 2 bits).
The C++/CUDA side reads the same layout through csrc/codes.h; kernels may repack into layouts of
their own at load time, but this one is what is saved.
"""
from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 3, 4)


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be 2, 3 or 4, got {bits!r}")
    return int(bits)


def pack_unit(bits: int) -> int:
    """Columns per packing unit; in_features must be a multiple of it."""
    return 8 if check_bits(bits) == 3 else 8 // bits


def row_bytes(in_features: int, bits: int) -> int:
    """Bytes per packed row of `in_features` codes."""
    unit = pack_unit(bits)
    if in_features % unit:
        raise ValueError(f"in_features ({in_features}) must be a multiple of {unit} for {bits}-bit codes")
    return in_features // 8 * 3 if bits == 3 else in_features * bits // 8


def in_features_of(codes: Tensor, bits: int) -> int:
    """in_features of a packed code tensor [out, row_bytes]."""
    nbytes = codes.shape[-1]
    return nbytes // 3 * 8 if check_bits(bits) == 3 else nbytes * 8 // bits


def bits_for_entries(entries: int) -> int:
    """Code width of a LUT with `entries` values: 4 -> 2, 8 -> 3, 16 -> 4."""
    table = {4: 2, 8: 3, 16: 4}
    if entries not in table:
        raise ValueError(f"lut must have 4, 8 or 16 entries in its last dimension, got {entries}")
    return table[entries]


def bits_of(lut: Tensor) -> int:
    """Code width from a LUT [..., 2^bits]."""
    return bits_for_entries(lut.shape[-1])


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes [out, in] (values in [0, 2^bits)) into the canonical uint8 layout."""
    check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [out_features, in_features], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    n, k = codes.shape
    row_bytes(k, bits)  # validates the divisibility
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= (1 << bits):
            bad = lo if lo < 0 else hi
            raise ValueError(f"codes out of range: found {bad}, {bits}-bit codes must lie in [0, {1 << bits})")
    c = codes.to(torch.uint8)
    if bits == 4:
        c = c.view(n, k // 2, 2)
        return ((c[..., 0] << 4) | c[..., 1]).contiguous()
    if bits == 2:
        c = c.view(n, k // 4, 4)
        return ((c[..., 0] << 6) | (c[..., 1] << 4) | (c[..., 2] << 2) | c[..., 3]).contiguous()
    c = c.view(n, k // 8, 8)
    shifts = torch.arange(7, -1, -1, device=c.device, dtype=torch.uint8)  # column j -> bit 7 - j
    planes = [(((c >> p) & 1) << shifts).sum(-1, dtype=torch.int32).to(torch.uint8) for p in range(3)]
    return torch.stack(planes, dim=-1).reshape(n, k // 8 * 3).contiguous()


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """Inverse of pack_codes: uint8 [out, row_bytes] -> uint8 codes [out, in]."""
    check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.dim() != 2:
        raise ValueError(f"packed codes must be 2-D [out_features, row_bytes], got shape {tuple(packed.shape)}")
    n, nb = packed.shape
    if bits == 4:
        return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(n, nb * 2)
    if bits == 2:
        return torch.stack([(packed >> s) & 0x3 for s in (6, 4, 2, 0)], dim=-1).reshape(n, nb * 4)
    if nb % 3:
        raise ValueError(f"3-bit packed codes need a multiple of 3 bytes per row, got {nb}")
    chunks = packed.view(n, nb // 3, 3)
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    out = torch.zeros(n, nb // 3, 8, dtype=torch.uint8, device=packed.device)
    for p in range(3):
        out |= ((chunks[..., p : p + 1] >> shifts) & 1) << p
    return out.reshape(n, nb // 3 * 8)


def from_official(quant_grid: Tensor, weight_codes: Tensor) -> tuple[Tensor, Tensor]:
    """Convert one SketchTune layer (quant_grid [out, G, 2^b], weight_codes uint8 [out, G, in/(2G)])
    into (codes, lut) in our canonical layout. Lossless: 4-bit codes are copied byte for byte;
    2- and 3-bit codes, which SketchTune keeps in a 4-bit container, are repacked at their width.
    """
    bits = bits_of(quant_grid)
    if quant_grid.dim() != 3:
        raise ValueError(f"quant_grid must be 3-D [out, groups_per_row, 2^bits], got {tuple(quant_grid.shape)}")
    if weight_codes.dtype != torch.uint8:
        raise TypeError(f"weight_codes must be uint8, got {weight_codes.dtype}")
    n = quant_grid.shape[0]
    if weight_codes.shape[0] != n:
        raise ValueError(f"weight_codes has {weight_codes.shape[0]} rows but quant_grid has {n}")
    nibbles = weight_codes.reshape(n, -1).contiguous()
    if bits == 4:
        return nibbles, quant_grid.contiguous()
    codes = unpack_codes(nibbles, 4)
    return pack_codes(codes, bits), quant_grid.contiguous()


def to_official(codes: Tensor, lut: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of from_official: (quant_grid, weight_codes [out, G, in/(2G)]) in SketchTune's layout."""
    bits = bits_of(lut)
    n, g = lut.shape[0], lut.shape[1]
    nibbles = codes if bits == 4 else pack_codes(unpack_codes(codes, bits), 4)
    k = nibbles.shape[1] * 2
    if k % (2 * g):
        raise ValueError(f"SketchTune's layout needs in_features ({k}) divisible by 2 * groups_per_row ({g})")
    return lut.contiguous(), nibbles.reshape(n, g, k // (2 * g)).contiguous()


def sketch_bytes(out_features: int, in_features: int, bits: int, groups_per_row: int,
                 lut_dtype: torch.dtype = torch.float16) -> int:
    """Storage of one sketched weight: packed codes plus LUTs at `lut_dtype`."""
    lut_elem = torch.empty((), dtype=lut_dtype).element_size()
    return out_features * row_bytes(in_features, bits) + out_features * groups_per_row * (1 << bits) * lut_elem

"""Many adapters in one model: serve or train several LUT sets in one batch.

An adapter is a LUT set over shared, frozen codes, so a model can hold many at once: every
SketchedLinear keeps a stack ``lut_stack`` [A, out, G, 2^bits] beside its own ``lut``, and each
sequence (or token) of a batch chooses its row of the stack.

    names = stack_adapters(model, {"math": "math.safetensors", "chat": "chat.safetensors"})
    # names == ["base", "math", "chat"]: index 0 is each layer's current lut
    with use_adapters(model, torch.tensor([1, 2, 2, 0])):   # one adapter per sequence
        logits = model(ids).logits                           # ids: [4, T]

Training: the stacks are nn.Parameters, and a token's gradient lands only in its own adapter's
row (lut_grad's multi-adapter form), so one batch mixing several tasks trains every adapter as if
each were trained alone on its own sequences (exactly so for a loss summed over tokens and an
elementwise optimizer without weight decay: an adapter absent from a batch still moves by its
optimizer momentum, which training it alone would not do).

Outside ``use_adapters`` the layers use ``lut`` as before; the stacks are left alone.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from .adapters import codes_hash, load_adapter, save_adapter, sketched_modules
from .nn import SketchedLinear

# What stack_adapters accepts for one adapter: a file written by save_adapter, a LUT state
# ({"<module>.lut": tensor}, e.g. from adapter_luts or a state dict), or a model with the same codes.
AdapterSource = Union[str, os.PathLike, Mapping[str, Tensor], nn.Module]
Index = Union[int, str, Sequence[Union[int, str]], Tensor]

NAMES_ATTR = "spallm_adapter_names"


def _key(module_name: str) -> str:
    """A LUT's state-dict key ("lut" for a SketchedLinear that is the model itself)."""
    return f"{module_name}.lut" if module_name else "lut"


def _modules(model: nn.Module) -> dict[str, SketchedLinear]:
    mods = sketched_modules(model)
    if not mods:
        raise ValueError("model has no SketchedLinear layers: sketch it first (sketch_model or "
                         "SketchedLinear.from_linear)")
    return mods


# Every tensor load_adapter may write into a layer: the LUT, and a low-rank branch's factors.
_ADAPTER_TENSORS = ("lut", "l1", "l2")


@contextlib.contextmanager
def _luts_saved(mods: dict[str, SketchedLinear]) -> Iterator[None]:
    """Lets load_adapter / save_adapter be reused for stack rows: everything an adapter file can
    set (LUTs, low-rank factors) is put back afterwards, also when they raise. Stacks switch LUTs
    only; a low-rank branch stays the model's own."""
    saved = {(n, a): getattr(m, a).detach().clone() for n, m in mods.items() for a in _ADAPTER_TENSORS
             if isinstance(getattr(m, a, None), Tensor)}
    try:
        yield
    finally:
        with torch.no_grad():
            for (n, a), t in saved.items():
                getattr(mods[n], a).copy_(t)


def _luts_from(model: nn.Module, mods: dict[str, SketchedLinear], name: str,
               source: AdapterSource) -> dict[str, Tensor]:
    """{module name: LUT [out, G, 2^bits]} of one adapter source, checked against `model`."""
    where = f"adapters[{name!r}]"
    if isinstance(source, (str, os.PathLike)):
        # load_adapter's own checks (format, same sketched modules, codes hash, shapes)
        with _luts_saved(mods):
            try:
                load_adapter(model, source)
            except (ValueError, FileNotFoundError) as e:
                raise type(e)(f"{where}: {e}") from None
            return {n: m.lut.detach().clone() for n, m in mods.items()}
    if isinstance(source, nn.Module):
        other = sketched_modules(source)
        if set(other) != set(mods) or codes_hash(other) != codes_hash(mods):
            raise ValueError(f"{where} is a model with other codes (or other sketched modules) than "
                             "this model: an adapter only fits the sketched base it was trained from")
        return {n: other[n].lut.detach() for n in mods}
    if isinstance(source, Mapping):
        out = {}
        for n, m in mods.items():
            key = next((k for k in (_key(n), f"{n}.lut", n) if k in source), None)
            if key is None:
                raise ValueError(f"{where} has no LUT for module {n!r} (expected key {_key(n)!r})")
            t = source[key]
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise TypeError(f"{where}[{key!r}] must be a floating-point tensor, got "
                                f"{type(t).__name__ if not isinstance(t, Tensor) else t.dtype}")
            if tuple(t.shape) != tuple(m.lut.shape):
                raise ValueError(f"{where}[{key!r}] has shape {tuple(t.shape)}, the model's LUT "
                                 f"is {tuple(m.lut.shape)}: is it an adapter of another sketch?")
            out[n] = t.detach()
        return out
    raise TypeError(f"{where} must be an adapter file path, a mapping of '<module>.lut' tensors or a "
                    f"model, got {type(source).__name__}")


@torch.no_grad()
def stack_adapters(model: nn.Module, adapters: Mapping[str, AdapterSource], *,
                   base: str | None = "base") -> list[str]:
    """Give every SketchedLinear of `model` a stack ``lut_stack`` [A, out, G, 2^bits] of adapters.

    `adapters` maps a name to an adapter file (save_adapter's format; refused on other codes, as
    load_adapter refuses it), a LUT state {"<module>.lut": tensor} or a model with the same codes.
    With `base` (a name), each layer's current ``lut`` is row 0 under that name; `base=None`
    stacks only `adapters`. Rows follow the mapping's order. Each stack has its layer's LUT dtype
    and device and trains when the LUT did: ``requires_grad`` moves from ``lut`` to ``lut_stack``
    (``lut`` is frozen while stacked; unstack_adapters gives it back). Calling it again replaces
    the stacks. Returns the adapter names, index by index."""
    if not isinstance(adapters, Mapping):
        raise TypeError(f"adapters must be a mapping of name -> adapter, got {type(adapters).__name__}")
    names = ([base] if base is not None else []) + list(adapters)
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"adapter names (and base) must be non-empty strings, got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be unique (base={base!r} included), got {names}")
    if not names:
        raise ValueError("adapters is empty and base is None: nothing to stack")
    mods = _modules(model)
    rows: dict[str, list[Tensor]] = {n: [] for n in mods}
    if base is not None:
        for n, m in mods.items():
            rows[n].append(m.lut.detach())
    for name, source in adapters.items():
        luts = _luts_from(model, mods, name, source)
        for n in mods:
            rows[n].append(luts[n])
    for n, m in mods.items():
        trainable = m.lut.requires_grad if m.lut_stack is None else m.lut_stack.requires_grad
        stack = torch.stack([t.to(device=m.lut.device, dtype=m.lut.dtype) for t in rows[n]])
        m.lut_stack = nn.Parameter(stack, requires_grad=trainable)
        # lut is not read inside use_adapters: left trainable it would get no gradient, which
        # DDP waits for forever (or raises about) and an optimizer would decay for nothing
        m.lut.requires_grad_(False)
        m.adapter_index = None
    setattr(model, NAMES_ATTR, names)
    return list(names)


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the stacked adapters, index by index ([] when nothing is stacked). `model`
    may also be a wrapper of the model given to stack_adapters (DDP, FSDP, torch.compile)."""
    for m in model.modules():   # the model itself comes first
        names = getattr(m, NAMES_ATTR, None)
        if names:
            return list(names)
    return []


def _stack_size(model: nn.Module) -> int:
    sizes = {m.lut_stack.shape[0] for m in _modules(model).values() if m.lut_stack is not None}
    if not sizes:
        raise RuntimeError("no adapters are stacked on this model: call stack_adapters(model, ...) first")
    return sizes.pop()


def _adapter_number(model: nn.Module, adapter: int | str, what: str = "adapter") -> int:
    if isinstance(adapter, str):
        names = adapter_names(model)
        if adapter not in names:
            raise ValueError(f"{what}: no adapter named {adapter!r}; stacked: {names}")
        return names.index(adapter)
    if isinstance(adapter, bool) or not isinstance(adapter, int):
        raise TypeError(f"{what} must be an adapter name or an int, got {type(adapter).__name__}")
    count = _stack_size(model)
    if not 0 <= adapter < count:
        raise ValueError(f"{what} must lie in [0, {count}), got {adapter}")
    return adapter


def _index_tensor(model: nn.Module, index: Index) -> int | Tensor:
    """`index` as an int (one adapter for all) or an integer tensor, checked against the stack."""
    if isinstance(index, (int, str)):
        return _adapter_number(model, index, "index")
    if isinstance(index, Tensor):
        if index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"index must be an int64 or int32 tensor of adapter numbers, got {index.dtype}")
        if index.dim() == 0:
            return _adapter_number(model, int(index), "index")
        count = _stack_size(model)
        if index.numel():
            lo, hi = int(index.min()), int(index.max())  # one host sync per use_adapters, not per layer
            if lo < 0 or hi >= count:
                raise ValueError(f"index values must lie in [0, {count}) (the stacked adapters), "
                                 f"found {lo if lo < 0 else hi}")
        return index
    if isinstance(index, Sequence):
        return torch.tensor([_adapter_number(model, a, f"index[{i}]") for i, a in enumerate(index)],
                            dtype=torch.int64)
    raise TypeError(f"index must be an int, an adapter name, a list of them or an integer tensor, "
                    f"got {type(index).__name__}")


@contextlib.contextmanager
def use_adapters(model: nn.Module, index: Index) -> Iterator[None]:
    """Run `model` with its stacked adapters chosen by `index`:

    * an int or an adapter name: that adapter for every token;
    * a list of ints / names or a 1-D integer tensor with one entry per sequence (for inputs
      [B, T, K]: B entries; each layer repeats them over the sequence);
    * an integer tensor with one entry per token (shape [B, T] or [B * T]).

    Forward and backward both follow the index: gradients reach ``lut_stack`` row by row, each
    token's to its own adapter. The previous choice is restored on exit (contexts nest)."""
    mods = _modules(model)
    missing = [n for n, m in mods.items() if m.lut_stack is None]
    if missing:
        raise RuntimeError(f"modules {missing[:3]} have no lut_stack: call stack_adapters(model, ...) first")
    chosen = _index_tensor(model, index)
    per_device: dict[torch.device, int | Tensor] = {}
    previous = {n: m.adapter_index for n, m in mods.items()}
    try:
        for m in mods.values():
            dev = m.lut_stack.device
            if dev not in per_device:
                per_device[dev] = chosen if isinstance(chosen, int) else chosen.to(dev, non_blocking=True)
            m.adapter_index = per_device[dev]
        yield
    finally:
        for n, m in mods.items():
            m.adapter_index = previous[n]


def adapter_luts(model: nn.Module, adapter: int | str) -> dict[str, Tensor]:
    """One stacked adapter as a LUT state {"<module>.lut": tensor} (detached copies): what
    stack_adapters takes back, and the keys of an adapter file."""
    a = _adapter_number(model, adapter)
    return {_key(n): m.lut_stack[a].detach().clone() for n, m in _modules(model).items()}


@torch.no_grad()
def save_stacked_adapter(model: nn.Module, adapter: int | str, path: str | os.PathLike, *,
                         lut_dtype: torch.dtype | None = None) -> str:
    """Write one stacked adapter to `path` in save_adapter's format (so load_adapter and
    stack_adapters read it back, with the codes-hash check). The model's ``lut`` is unchanged."""
    a = _adapter_number(model, adapter)
    mods = _modules(model)
    with _luts_saved(mods):
        for m in mods.values():
            m.lut.copy_(m.lut_stack[a])
        names = adapter_names(model)
        return save_adapter(model, path, name=names[a] if a < len(names) else f"adapter{a}", lut_dtype=lut_dtype)


@torch.no_grad()
def unstack_adapters(model: nn.Module, keep: int | str | None = None) -> None:
    """Drop the stacks; each ``lut`` gets back the stack's ``requires_grad``. With `keep`, that
    adapter's LUTs are first copied into each layer's ``lut`` (e.g. to keep a trained adapter, or
    before save_sketched, whose files hold no stacks)."""
    mods = _modules(model)
    missing = [n for n, m in mods.items() if m.lut_stack is None]
    if missing:
        raise RuntimeError(f"modules {missing[:3]} have no lut_stack: nothing to unstack")
    if keep is not None:
        a = _adapter_number(model, keep, "keep")
        for m in mods.values():
            m.lut.copy_(m.lut_stack[a])
    for m in mods.values():
        m.lut.requires_grad_(m.lut_stack.requires_grad)
        m.lut_stack = None
        m.adapter_index = None
    if hasattr(model, NAMES_ATTR):
        delattr(model, NAMES_ATTR)

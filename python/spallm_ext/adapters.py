"""Sketched models and adapters on disk (safetensors + JSON; never pickle).

A sketch directory (``save_sketched`` / ``load_sketched``):

    model.safetensors     the whole state dict: every SketchedLinear's ``codes`` (uint8, the
                          canonical packed layout of spallm_ext.formats) and ``lut``, plus all
                          dense tensors (embeddings, norms, lm_head) as they are
    spallm_config.json    format tag, sketch config, the sketched modules with their shapes,
                          and the codes hash
    config.json (+ tokenizer files)  the transformers config, when the model has one, so the
                          model can be rebuilt with AutoModelForCausalLM.from_config

A LowRankSketchedLinear (sketch + low-rank branch) saves its ``l1`` / ``l2`` beside ``codes`` and
``lut``; its spec in spallm_config.json carries ``lowrank_rank`` (and dtype, init, trainable mode).

An adapter (``save_adapter`` / ``load_adapter``) is one safetensors file holding only LUTs,
keyed ``<module name>.lut`` (plus ``<module name>.l1`` / ``.l2`` for layers with a low-rank
branch: the adapter is everything that may train), with string metadata: ``format`` = ``spallm-adapter``, the sketch
config, the module shapes and ``codes_hash``, a SHA-256 over every sketched module's name,
shape and code bytes. An adapter is only loaded onto a model whose codes hash matches.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping

import torch
from torch import Tensor, nn

from .formats import bits_of, from_official, in_features_of
from .lowrank import LowRankSketchedLinear
from .nn import SketchedLinear

SKETCH_CONFIG = "spallm_config.json"
SKETCH_WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def sketched_modules(model: nn.Module) -> dict[str, SketchedLinear]:
    """All SketchedLinear modules of `model`, by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SketchedLinear)}


def codes_hash(model_or_modules) -> str:
    """SHA-256 over the sketched modules' names, shapes, bit widths and code bytes (sorted by
    name). Two models share a hash exactly when they have the same codes."""
    mods = sketched_modules(model_or_modules) if isinstance(model_or_modules, nn.Module) else model_or_modules
    h = hashlib.sha256()
    for name in sorted(mods):
        m = mods[name]
        codes = m.codes.detach().contiguous().cpu()
        h.update(f"{name}|{m.out_features}x{m.in_features}|{m.bits}|{m.groups_per_row}|".encode())
        if isinstance(m, LowRankSketchedLinear):   # plain sketches keep the hashes they always had
            h.update(f"lowrank{m.rank}|".encode())
        h.update(codes.numpy().tobytes())
    return h.hexdigest()


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _module_spec(m: SketchedLinear) -> dict:
    spec = {"in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
            "groups_per_row": m.groups_per_row, "bias": m.bias is not None,
            "lut_dtype": _dtype_name(m.lut.dtype)}
    if isinstance(m, LowRankSketchedLinear):
        spec.update(lowrank_rank=m.rank, lowrank_dtype=_dtype_name(m.l1.dtype), lowrank_init=m.lowrank_init,
                    trainable=m.trainable)
    return spec


def _adapter_tensors(name: str, m: SketchedLinear) -> dict[str, Tensor]:
    """What an adapter holds for one layer: its LUT, and its branch when it has one."""
    out = {f"{name}.lut": m.lut}
    if isinstance(m, LowRankSketchedLinear):
        out[f"{name}.l1"], out[f"{name}.l2"] = m.l1, m.l2
    return out


def save_sketched(model: nn.Module, directory: str | os.PathLike, *, tokenizer=None,
                  extra: dict | None = None) -> str:
    """Write `model` (with SketchedLinear layers) to `directory`; returns the directory."""
    from safetensors.torch import save_model

    mods = sketched_modules(model)
    if not mods:
        raise ValueError("the model has no SketchedLinear layers: sketch it first (sketch_model)")
    os.makedirs(directory, exist_ok=True)
    save_model(model, os.path.join(directory, SKETCH_WEIGHTS), metadata={"format": "spallm-sketch"})
    meta = {
        "format": "spallm-sketch",
        "version": FORMAT_VERSION,
        "sketch_config": getattr(model, "spallm_sketch_config", None),
        "modules": {n: _module_spec(m) for n, m in mods.items()},
        "codes_hash": codes_hash(mods),
        "model_class": type(model).__name__,
    }
    if extra:
        meta["extra"] = extra
    with open(os.path.join(directory, SKETCH_CONFIG), "w") as f:
        json.dump(meta, f, indent=1)
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "save_pretrained"):
        hf_config.save_pretrained(directory)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)
    return str(directory)


def read_sketch_config(directory: str | os.PathLike) -> dict:
    """The spallm_config.json of a sketch directory, with clear errors for a wrong directory."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"sketch directory {directory!r} does not exist")
    path = os.path.join(directory, SKETCH_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} is not a spallm sketch directory: {SKETCH_CONFIG} is missing "
                                "(write one with save_sketched or `spallm-ext sketch`)")
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if meta.get("format") != "spallm-sketch":
        raise ValueError(f"{path} is not a spallm sketch config (format={meta.get('format')!r})")
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta.get('version')}, this spallm_ext reads "
                         f"up to {FORMAT_VERSION}: upgrade spallm_ext")
    return meta


def _install(model: nn.Module, name: str, spec: dict) -> SketchedLinear:
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model has no module {name!r} to put a sketched layer in: "
                         "was the sketch made for another architecture?") from None
    rank = int(spec.get("lowrank_rank", 0))
    if isinstance(old, SketchedLinear) and old.bits == spec["bits"] and \
            old.groups_per_row == spec["groups_per_row"] and old.in_features == spec["in_features"] and \
            old.out_features == spec["out_features"] and \
            (old.rank if isinstance(old, LowRankSketchedLinear) else 0) == rank:
        return old
    if not isinstance(old, (nn.Linear, SketchedLinear)) or old.in_features != spec["in_features"] or \
            old.out_features != spec["out_features"]:
        raise ValueError(f"module {name!r} is {old!r}; the sketch expects a linear layer "
                         f"{spec['in_features']} -> {spec['out_features']}")
    ref = old.weight if isinstance(old, nn.Linear) else old.lut
    bias_dtype = old.bias.dtype if getattr(old, "bias", None) is not None else None
    common = dict(bits=spec["bits"], groups_per_row=spec["groups_per_row"], bias=spec["bias"], device=ref.device,
                  dtype=bias_dtype, lut_dtype=getattr(torch, spec.get("lut_dtype", "float32")))
    if rank > 0:
        new = LowRankSketchedLinear(spec["in_features"], spec["out_features"], rank,
                                    lowrank_dtype=getattr(torch, spec.get("lowrank_dtype", "float32")),
                                    trainable=spec.get("trainable", "both"), **common)
        new.lowrank_init = spec.get("lowrank_init", new.lowrank_init)
    else:
        new = SketchedLinear(spec["in_features"], spec["out_features"], **common)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return new


def load_sketched(model: nn.Module, directory: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Restore a sketch saved by save_sketched into `model`, a freshly built model of the same
    architecture (e.g. AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))).
    The listed nn.Linear layers are replaced by SketchedLinear, then every tensor is loaded."""
    from safetensors.torch import load_model

    meta = read_sketch_config(directory)
    weights = os.path.join(os.fspath(directory), SKETCH_WEIGHTS)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} is missing: the sketch directory is incomplete")
    for name, spec in meta["modules"].items():
        _install(model, name, spec)
    missing, unexpected = load_model(model, weights, strict=strict)
    got = codes_hash(model)
    if got != meta.get("codes_hash", got):
        raise ValueError(f"codes loaded from {weights} do not match the hash in {SKETCH_CONFIG}: "
                         "the directory is corrupt or its files come from different sketches")
    model.spallm_sketch_config = meta.get("sketch_config")
    return model


def save_adapter(model: nn.Module, path: str | os.PathLike, *, name: str = "default",
                 lut_dtype: torch.dtype | None = None) -> str:
    """Write only the LUTs of `model`'s sketched layers (an adapter) to a safetensors file, with the
    l1 / l2 of layers that have a low-rank branch. `lut_dtype` converts all of them."""
    from safetensors.torch import save_file

    mods = sketched_modules(model)
    if not mods:
        raise ValueError("the model has no SketchedLinear layers: nothing to save as an adapter")
    tensors = {key: (t.detach() if lut_dtype is None else t.detach().to(lut_dtype)).contiguous().cpu()
               for n, m in mods.items() for key, t in _adapter_tensors(n, m).items()}
    meta = {
        "format": "spallm-adapter",
        "version": str(FORMAT_VERSION),
        "name": name,
        "codes_hash": codes_hash(mods),
        "modules": json.dumps({n: _module_spec(m) for n, m in mods.items()}),
        "sketch_config": json.dumps(getattr(model, "spallm_sketch_config", None)),
    }
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(tensors, path, metadata=meta)
    return path


def read_adapter_metadata(path: str | os.PathLike) -> dict:
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter file {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise ValueError(f"{path!r} is not a safetensors file: {e}") from None
    if meta.get("format") != "spallm-adapter":
        raise ValueError(f"{path!r} is not a spallm adapter (format={meta.get('format')!r})")
    out = dict(meta)
    out["modules"] = json.loads(meta.get("modules", "{}"))
    out["sketch_config"] = json.loads(meta.get("sketch_config", "null"))
    return out


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike) -> dict:
    """Copy an adapter's LUTs into `model`'s sketched layers. Refuses (ValueError) an adapter
    made for other codes: the codes hash in its metadata must equal this model's. Returns the
    adapter's metadata."""
    from safetensors.torch import load_file

    meta = read_adapter_metadata(path)
    mods = sketched_modules(model)
    if set(meta["modules"]) != set(mods):
        only_a = sorted(set(meta["modules"]) - set(mods))[:3]
        only_m = sorted(set(mods) - set(meta["modules"]))[:3]
        raise ValueError(f"adapter {os.fspath(path)!r} does not fit this model: its sketched modules differ "
                         f"(only in adapter: {only_a}, only in model: {only_m})")
    mine = codes_hash(mods)
    if meta["codes_hash"] != mine:
        raise ValueError(f"adapter {os.fspath(path)!r} was made for other codes (its codes hash "
                         f"{meta['codes_hash'][:16]}... != this model's {mine[:16]}...): load it onto "
                         "the sketched base model it was trained from")
    tensors = load_file(os.fspath(path))
    targets = {key: p for n, m in mods.items() for key, p in _adapter_tensors(n, m).items()}
    missing = sorted(set(targets) - set(tensors))[:3]
    if missing:
        raise ValueError(f"adapter {os.fspath(path)!r} lacks tensors this model needs: {missing}")
    for key, p in targets.items():   # check every shape before changing anything
        if tuple(tensors[key].shape) != tuple(p.shape):
            raise ValueError(f"adapter tensor {key!r} has shape {tuple(tensors[key].shape)}, the model's is "
                             f"{tuple(p.shape)}")
    for key, p in targets.items():
        p.copy_(tensors[key].to(device=p.device, dtype=p.dtype))
    return meta


def _official_pairs(mapping) -> dict[str, tuple[Tensor, Tensor]]:
    if isinstance(mapping, (str, os.PathLike)):
        mapping = torch.load(os.fspath(mapping), map_location="cpu", weights_only=True)
    if not isinstance(mapping, Mapping):
        raise TypeError(f"expected a mapping of module name -> (quant_grid, weight_codes), got {type(mapping).__name__}")
    pairs: dict[str, dict] = {}
    for key, val in mapping.items():
        if isinstance(val, Tensor):               # flat state-dict form: "<name>.quant_grid"
            name, _, leaf = key.rpartition(".")
            if leaf not in ("quant_grid", "weight_codes"):
                continue
            pairs.setdefault(name, {})[leaf] = val
        elif isinstance(val, Mapping):
            pairs[key] = {"quant_grid": val["quant_grid"], "weight_codes": val["weight_codes"]}
        else:
            qg, wc = val
            pairs[key] = {"quant_grid": qg, "weight_codes": wc}
    out = {}
    for name, d in pairs.items():
        if set(d) != {"quant_grid", "weight_codes"}:
            raise ValueError(f"official checkpoint entry {name!r} lacks quant_grid or weight_codes")
        out[name] = (d["quant_grid"], d["weight_codes"])
    if not out:
        raise ValueError("no (quant_grid, weight_codes) pairs found in the official checkpoint")
    return out


@torch.no_grad()
def load_official(model: nn.Module, mapping, *, lut_dtype: torch.dtype = torch.float32) -> list[str]:
    """Import SketchTune's layout: `mapping` is {module name: (quant_grid [out, G, 2^b],
    weight_codes uint8 [out, G, in/(2G)])} (tuples, {"quant_grid", "weight_codes"} dicts, or a
    flat state dict with "<name>.quant_grid" / "<name>.weight_codes" keys), or the path of a
    torch file holding one, loaded with weights_only=True (no pickled code runs). The named
    nn.Linear layers become SketchedLinear with the converted codes; biases are kept.
    Returns the converted module names."""
    done = []
    for name, (qg, wc) in _official_pairs(mapping).items():
        codes, lut = from_official(qg, wc)
        bits = bits_of(lut)
        spec = {"in_features": in_features_of(codes, bits), "out_features": codes.shape[0], "bits": bits,
                "groups_per_row": lut.shape[1], "lut_dtype": str(lut_dtype).replace("torch.", "")}
        old = model.get_submodule(name)
        spec["bias"] = getattr(old, "bias", None) is not None
        bias = None if getattr(old, "bias", None) is None else old.bias.detach().clone()
        new = _install(model, name, spec)
        new.codes.copy_(codes.to(new.codes.device))
        new.lut.copy_(lut.to(device=new.lut.device, dtype=new.lut.dtype))
        if bias is not None:
            new.bias.copy_(bias)
        done.append(name)
    return done

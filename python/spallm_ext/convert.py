"""Model conversion: sketch a pretrained transformer block by block on calibration data.

    report = sketch_model(model, SketchConfig(bits=4, groups_per_row=4), calibration_ids)

Calibration follows GPTQ/LeanQuant's "true sequential" order:

* The model is run up to its first decoder block; the block inputs (hidden states plus the
  keyword arguments the model passes to every block: masks, rotary embeddings, ...) are kept.
* Each block is sketched on the inputs produced by the already-sketched previous blocks.
* Inside a block the linear layers are grouped into *stages* of layers that read the same input
  tensor, in call order (for Llama: q/k/v, then o_proj, then gate/up, then down_proj). Each
  stage's Hessians are captured with forward hooks on a forward that already runs through the
  sketched earlier stages; the forward stops as soon as the next stage is reached.
* The block's outputs (through the fully sketched block) are the next block's inputs.

Every selected nn.Linear is replaced in place by a SketchedLinear (a LowRankSketchedLinear, a
sketch plus a low-rank branch fitted from the same Hessian, when config.lowrank_rank > 0; see
spallm_ext.lowrank); embeddings, lm_head and norms
are untouched (only Linears inside the decoder blocks are candidates, and `filter_fn(name,
module)` can narrow them further).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .adapters import sketched_modules  # noqa: F401  (re-exported)
from .lowrank import LowRankSketchedLinear
from .nn import SketchedLinear
from .sketch import SketchConfig, hessian_sketch

FilterFn = Callable[[str, nn.Module], bool]


class _Stop(Exception):
    """Raised from a hook to end a forward early."""


@dataclass
class SketchReport:
    """What sketch_model did: per-layer figures (relative output error on the calibration inputs,
    timings) and totals."""
    config: dict
    layers: dict = field(default_factory=dict)
    blocks: list = field(default_factory=list)
    total_s: float = 0.0
    device: str = "cpu"

    def to_dict(self) -> dict:
        return {"config": self.config, "layers": self.layers, "blocks": self.blocks,
                "total_s": self.total_s, "device": self.device}

    def mean_rel_err(self) -> float:
        errs = [v["rel_err"] for v in self.layers.values()]
        return sum(errs) / max(1, len(errs))

    def summary(self) -> str:
        return (f"{len(self.layers)} layers sketched in {self.total_s:.1f} s on {self.device}, "
                f"mean relative output error {self.mean_rel_err():.4f}")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: `model.model.layers` for Llama-family transformers models, otherwise
    the largest nn.ModuleList whose entries contain nn.Linear layers."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return "model.layers", inner.layers
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and \
                any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(f"could not find the decoder blocks of {type(model).__name__}: expected "
                         "model.model.layers or an nn.ModuleList of blocks with nn.Linear layers")
    return best


def _to(obj, device):
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _batches(calibration, batch_size: int) -> list[Tensor]:
    if isinstance(calibration, Tensor):
        if calibration.dim() == 1:
            calibration = calibration[None]
        if calibration.dim() != 2:
            raise ValueError(f"calibration must be token ids [N, T], got shape {tuple(calibration.shape)}")
        return [calibration[i:i + batch_size] for i in range(0, calibration.shape[0], batch_size)]
    out = []
    for item in calibration:
        t = torch.as_tensor(item)
        out.append(t[None] if t.dim() == 1 else t)
    if not out:
        raise ValueError("calibration is empty")
    return out


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _stages(block: nn.Module, run: Callable[[], None], candidates: dict[str, nn.Linear]) -> list[list[str]]:
    """Group the candidate linears of a block by the input tensor they read, in call order."""
    order: list[tuple[str, int]] = []
    seen: set[str] = set()
    handles = []
    for name, mod in candidates.items():
        def hook(m, args, name=name):
            if name not in seen:
                seen.add(name)
                order.append((name, args[0].data_ptr()))
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    last_ptr = None
    for name, ptr in order:
        if stages and ptr == last_ptr:
            stages[-1].append(name)
        else:
            stages.append([name])
        last_ptr = ptr
    # candidates never called in the forward have no calibration data and stay dense
    return stages


def _lowrank_layer(lin: nn.Linear, hessian: Tensor, cfg: SketchConfig) -> tuple[LowRankSketchedLinear, dict]:
    """A LowRankSketchedLinear for `lin` from its calibration Hessian, and the report figures:
    ``rel_err`` is the layer's final relative output error (sketch + branch), ``rel_err_sketch``
    the sketch's alone, the sketcher's own figures under ``sketch``. The rank is capped at
    min(out, in) for layers narrower than cfg.lowrank_rank."""
    rank = min(cfg.lowrank_rank, lin.out_features, lin.in_features)
    sk = LowRankSketchedLinear.from_linear(lin, rank, cfg.bits, cfg.groups_per_row, init=cfg.lowrank_init,
                                           hessian=hessian, smooth_alpha=cfg.lowrank_smooth_alpha, config=cfg,
                                           trainable=cfg.lowrank_trainable)
    info = dict(sk.init_info)
    sketch_info = info.get("sketch", {})
    for key in ("refit_kept", "dead_columns", "times"):
        if key in sketch_info:
            info[key] = sketch_info[key]
    return sk, info


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


@torch.no_grad()
def sketch_model(model: nn.Module, config: SketchConfig | None, calibration, filter_fn: FilterFn | None = None,
                 device: str | torch.device | None = None, *, batch_size: int = 8,
                 progress: bool = True) -> SketchReport:
    """Sketch `model`'s decoder-block linear layers in place; returns a SketchReport.

    calibration: token ids [N, T] (LongTensor) or an iterable of id tensors. device: where the
    per-block work runs (default CUDA when available, else CPU); each block is moved there while
    it is sketched and moved back afterwards, so a model larger than the GPU can be sketched."""
    cfg = config or SketchConfig()
    dev = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()
    report = SketchReport(config=cfg.to_dict(), device=str(dev))
    blocks_name, blocks = find_blocks(model)
    batches = _batches(calibration, batch_size)
    model_dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    cfg_obj = getattr(model, "config", None)
    old_cache = getattr(cfg_obj, "use_cache", None)
    if cfg_obj is not None and old_cache is not None:
        cfg_obj.use_cache = False

    # 1. inputs of the first block, with the keyword arguments the model passes to every block
    inputs: list[tuple[Tensor, tuple, dict]] = []

    def grab(m, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        rest_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        inputs.append((hs.to(dev), _to(tuple(args[1:]), dev), _to(rest_kwargs, dev)))
        raise _Stop

    h = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            try:
                kw = {"use_cache": False} if cfg_obj is not None else {}
                model(ids.to(model_dev), **kw)
            except _Stop:
                pass
    finally:
        h.remove()

    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(blocks), desc=f"sketching {cfg.bits}-bit G={cfg.groups_per_row}",
                   unit="block", disable=not progress)
    except ImportError:  # tqdm is a dependency, but keep working without it
        bar = None

    for bi, block in enumerate(blocks):
        tb = time.perf_counter()
        block_dev = next(block.parameters()).device
        block.to(dev)
        prefix = f"{blocks_name}.{bi}."
        candidates = {n: m for n, m in block.named_modules()
                      if isinstance(m, nn.Linear) and (filter_fn is None or filter_fn(prefix + n, m))}

        def run_block(stop_at: nn.Module | None = None, collect: bool = False):
            outs = []
            hk = None
            if stop_at is not None:
                def stop(m, a):
                    raise _Stop
                hk = stop_at.register_forward_pre_hook(stop)
            try:
                for hs, args, kwargs in inputs:
                    try:
                        out = block(hs, *args, **kwargs)
                        if collect:
                            outs.append(_block_output(out))
                    except _Stop:
                        pass
            finally:
                if hk is not None:
                    hk.remove()
            return outs

        stages = _stages(block, lambda: run_block(), candidates) if candidates else []
        for si, stage in enumerate(stages):
            hess = {n: torch.zeros(candidates[n].in_features, candidates[n].in_features,
                                   device=dev, dtype=torch.float32) for n in stage}
            count = {n: 0 for n in stage}
            handles = []
            for n in stage:
                def acc(m, a, n=n):
                    x = a[0].detach().reshape(-1, a[0].shape[-1]).to(torch.float32)
                    hess[n].addmm_(x.t(), x)
                    count[n] += x.shape[0]
                handles.append(candidates[n].register_forward_pre_hook(acc))
            nxt = block.get_submodule(stages[si + 1][0]) if si + 1 < len(stages) else None
            try:
                run_block(stop_at=nxt)
            finally:
                for hd in handles:
                    hd.remove()
            for n in stage:
                lin = candidates[n]
                hmat = hess.pop(n).mul_(2.0 / max(1, count[n]))
                tl = time.perf_counter()
                if cfg.lowrank_rank > 0:
                    sk, info = _lowrank_layer(lin.to(dev), hmat, cfg)
                else:
                    res = hessian_sketch(lin.weight.detach().to(dev, torch.float32), hmat, cfg)
                    sk = SketchedLinear.from_linear(lin.to(dev), bits=cfg.bits, groups_per_row=cfg.groups_per_row,
                                                    sketcher=lambda w, b, g, res=res: (res.codes, res.lut))
                    info = dict(res.info)
                _replace(block, n, sk)
                del hmat
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                info["time_s"] = time.perf_counter() - tl
                info["shape"] = [lin.out_features, lin.in_features]
                info["tokens"] = count[n]
                report.layers[prefix + n] = info
        # outputs of the sketched block feed the next one
        outs = run_block(collect=True)
        inputs = [(o, args, kwargs) for o, (_, args, kwargs) in zip(outs, inputs)]
        block.to(block_dev)
        report.blocks.append({"index": bi, "time_s": time.perf_counter() - tb,
                              "stages": stages})
        if bar is not None:
            errs = [report.layers[prefix + n]["rel_err"] for s in stages for n in s]
            bar.set_postfix(rel_err=f"{sum(errs) / max(1, len(errs)):.4f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    if cfg_obj is not None and old_cache is not None:
        cfg_obj.use_cache = old_cache
    model.train(was_training)
    model.spallm_sketch_config = cfg.to_dict()   # save_sketched / save_adapter record it
    report.total_s = time.perf_counter() - t_start
    return report

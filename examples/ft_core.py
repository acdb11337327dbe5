"""The fine-tuning methods, the training loop and the evaluation, independent of the real model
(tests/test_finetune_example.py runs all of it on spallm_ext.models.tiny_llama).

Methods (what trains, on which base):

* ``spallm``          LUTs of every SketchedLinear, fp32 master copy (the library's default)
* ``spallm_bf16lut``  the same LUTs stored and updated in bf16, no fp32 copy anywhere (what the
                      official SketchTune code does): AdamW's update is added in bf16, so any
                      update smaller than half a bf16 ulp of the entry is rounded away
* ``lora``            LoRA (rank r, alpha 2r) on every decoder-block linear of the fp32 model
* ``qlora``           the same LoRA on an NF4-quantized base (examples/ft_nf4.py)

Training follows the official SketchTune recipe: AdamW without weight decay, gradient clipping
at 1.0, linear warmup then linear decay. The loss is the mean cross-entropy over answer tokens
only; the lm_head runs only at those positions (the vocabulary projection is a fifth of
SmolLM2's FLOPs per token, and the prompt positions need none of it).
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from spallm_ext.adapters import sketched_modules

from ft_nf4 import add_lora
from ft_tasks import Batches, Task, collate, encode, first_number

METHODS = ("spallm", "spallm_bf16lut", "lora", "qlora")
BASE_OF = {"spallm": "sketch", "spallm_bf16lut": "sketch", "lora": "fp32", "qlora": "nf4"}


def prepare(model: nn.Module, method: str, lora_rank: int = 8, lora_alpha: float | None = None) -> list[nn.Parameter]:
    """Freeze the model and make the method's parameters trainable; returns them."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    for p in model.parameters():
        p.requires_grad_(False)
    if method.startswith("spallm"):
        mods = sketched_modules(model)
        if not mods:
            raise ValueError(f"{method} needs a sketched model (SketchedLinear layers)")
        params = []
        for m in mods.values():
            if method == "spallm_bf16lut":
                # replace the parameter: the fp32 values are gone, bf16 is the only copy
                m.lut = nn.Parameter(m.lut.detach().to(torch.bfloat16))
            m.lut.requires_grad_(True)
            params.append(m.lut)
        return params
    return add_lora(model, lora_rank, lora_alpha if lora_alpha is not None else 2.0 * lora_rank)


def count(params) -> int:
    return sum(p.numel() for p in params)


def _decoder(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def answer_loss(model: nn.Module, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the answer tokens of a right-padded batch (labels -100 elsewhere)."""
    dev = model.lm_head.weight.device
    h = _hidden(model, batch)
    labels = batch["labels"][:, 1:].to(dev)
    sel = labels != -100
    logits = model.lm_head(h[:, :-1][sel]).float()
    return F.cross_entropy(logits, labels[sel], reduction=reduction)


# ---------------------------------------------------------------------------------------------
# Memory: peak resident set size of the training phase


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process (VmHWM), Linux only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb(field: str = "VmHWM") -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# Training


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (steps - step) / max(1, steps - warmup))


def train(model: nn.Module, params: list[nn.Parameter], batches, steps: int, lr: float, *,
          warmup: int | None = None, clip: float = 1.0, log_every: int = 10, log=None) -> dict:
    """AdamW (wd 0) on `params` for `steps` batches. Returns per-step losses, the loss curve (mean
    of every `log_every` steps), timings and the 'lost update' fraction: among the trainable
    entries with a non-zero gradient, the share whose stored value did not change in a step
    (measured every `log_every` steps; ~0 in fp32, large for bf16 weights at a small lr)."""
    warmup = max(1, steps // 10) if warmup is None else warmup
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses, lost, grad_norms = [], [], []
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        loss = answer_loss(model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
        probe = step % log_every == log_every - 1
        before = [p.detach().clone() for p in params] if probe else None
        opt.step()
        if probe:
            moved = wanted = 0
            for p, b in zip(params, before):
                nz = p.grad != 0
                wanted += int(nz.sum())
                moved += int((p.detach() != b)[nz].sum())
            lost.append({"step": step + 1, "lost_frac": 1.0 - moved / max(1, wanted)})
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            log(f"step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                f"({(time.perf_counter() - t0) / (step + 1):.2f} s/step)")
    model.eval()
    elapsed = time.perf_counter() - t0
    curve = [{"step": min(i + log_every, steps), "loss": sum(losses[i:i + log_every]) / len(losses[i:i + log_every])}
             for i in range(0, steps, log_every)]
    state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                      if torch.is_tensor(t) and t.dim() > 0)
    return {"losses": losses, "curve": curve, "train_time_s": elapsed, "optimizer_state_bytes": state_bytes,
            "s_per_step": elapsed / max(1, steps), "lost_updates": lost,
            "grad_norm_mean": sum(grad_norms) / max(1, len(grad_norms)),
            "final_train_loss": curve[-1]["loss"] if curve else None}


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: nn.Module, tok, task: Task, *, batch_size: int = 16, max_new_tokens: int = 8,
             pad_id: int = 0, limit: int | None = None) -> dict:
    """Held-out answer loss (mean CE per answer token, teacher-forced) and accuracy: for "choice"
    tasks the choice whose first answer token has the highest logit after the prompt (read off
    the same forward as the loss); for "number" tasks greedy generation, first number in the
    output == the answer. Examples are batched in order of length (less padding)."""
    model.eval()
    exs = task.test[:limit] if limit else task.test
    order = sorted(range(len(exs)), key=lambda i: sum(map(len, encode(tok, task, exs[i]))))
    exs = [exs[i] for i in order]
    pairs = [encode(tok, task, e) for e in exs]
    first = _choice_first_tokens(tok, task, exs[0]) if task.kind == "choice" else None
    dev = model.lm_head.weight.device
    nll, ntok, picks = 0.0, 0, []
    t = time.perf_counter()
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        b = collate(chunk, pad_id)
        h = _hidden(model, b)
        labels = b["labels"][:, 1:].to(dev)
        sel = labels != -100
        nll += float(F.cross_entropy(model.lm_head(h[:, :-1][sel]).float(), labels[sel], reduction="sum"))
        ntok += int(sel.sum())
        if first is not None:    # the position that predicts the first answer token
            last = torch.tensor([len(p) - 1 for p, _ in chunk], device=dev)
            picks += model.lm_head(h[torch.arange(len(chunk), device=dev), last])[:, first].argmax(-1).tolist()
    out = {"heldout_loss": nll / max(1, ntok), "heldout_examples": len(exs)}
    if first is not None:
        truth = [sum(e.answer == c for e in exs) for c in task.choices]
        out.update(accuracy=sum(task.choices[k] == e.answer for k, e in zip(picks, exs)) / len(exs),
                   predicted_share={c: picks.count(k) / len(exs) for k, c in enumerate(task.choices)},
                   majority_baseline=max(truth) / len(exs))
    else:
        out.update(_generate_exact_match(model, tok, exs, pairs, batch_size, max_new_tokens, pad_id))
    out["eval_forward_s"] = time.perf_counter() - t
    return out


def _hidden(model: nn.Module, batch: dict) -> torch.Tensor:
    dev = model.lm_head.weight.device
    return _decoder(model)(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                           use_cache=False).last_hidden_state


def _choice_first_tokens(tok, task: Task, ex) -> list[int]:
    """First token of each choice, as the answer is tokenized after the prompt."""
    from ft_tasks import Example
    first = [encode(tok, task, Example(ex.question, c))[1][0] for c in task.choices]
    if len(set(first)) != len(first):
        raise ValueError(f"choices {task.choices} share their first token; cannot score them by it")
    return first


def _generate_exact_match(model, tok, exs, pairs, batch_size, max_new_tokens, pad_id) -> dict:
    dev = model.lm_head.weight.device
    correct, samples = 0, []
    eos = getattr(tok, "eos_token_id", None)
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        n = max(len(p) for p, _ in chunk)
        # left padding: every prompt ends at the same position, so generated tokens line up
        ids = torch.full((len(chunk), n), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), n, dtype=torch.long)
        for j, (p, _) in enumerate(chunk):
            ids[j, n - len(p):] = torch.tensor(p)
            mask[j, n - len(p):] = 1
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_id, eos_token_id=eos)
        for ex, g in zip(exs[i:i + batch_size], gen[:, n:].tolist()):
            text = tok.decode(g, skip_special_tokens=True)
            ok = first_number(text) == first_number(ex.answer)
            correct += ok
            if len(samples) < 5:
                samples.append({"question": ex.question[:80], "answer": ex.answer, "output": text.strip()})
    return {"accuracy": correct / len(exs), "samples": samples}


def storage_bytes(model: nn.Module) -> dict:
    """Bytes of the decoder-block linear weights as the model holds them (fp32 dense, sketch codes +
    LUTs, NF4 codes + absmax; LoRA factors excluded) and of everything else (embeddings, norms)."""
    from spallm_ext.nn import SketchedLinear

    from ft_nf4 import NF4Linear, LoRALinear

    linear = 0
    seen = set()
    for m in model.modules():
        if isinstance(m, SketchedLinear):
            linear += m.codes.numel() + m.lut.numel() * m.lut.element_size()
        elif isinstance(m, NF4Linear):
            linear += m.storage_bytes()
        elif isinstance(m, nn.Linear) and m is not getattr(model, "lm_head", None):
            linear += m.weight.numel() * m.weight.element_size()
        else:
            continue
        seen.update(id(t) for t in m.parameters(recurse=False))
        seen.update(id(t) for t in m.buffers(recurse=False))
    lora = {id(p) for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)}
    other, counted = 0, set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or id(t) in lora or t.data_ptr() in counted:
            continue
        counted.add(t.data_ptr())   # tied embeddings / lm_head counted once
        other += t.numel() * t.element_size()
    return {"decoder_linear_bytes": linear, "other_bytes": other}


def set_threads(n: int | None) -> int:
    n = n or int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(n)
    return n


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan

"""QLoRA baseline for bench_train.py: bitsandbytes NF4 base weights plus LoRA adapters.

The base projection is bnb.nn.Linear4bit (NF4, double-quantized statistics, bf16 compute dtype),
as QLoRA's recipe loads it. The LoRA branch comes from peft (its bitsandbytes-aware Linear4bit
wrapper, the one a QLoRA fine-tune uses) when peft imports, else from the minimal LoRALinear
below. LoRA weights are fp32, as peft's get_peft_model leaves them (autocast_adapter_dtype);
under the benchmark's bf16 autocast the branch computes in bf16.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from llama_layer import PROJECTIONS, swap_linears


def bnb_unavailable_reason() -> str | None:
    """None when bitsandbytes imports, else why not (logged in the results)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001  (not installed, or no binary for this machine)
        return f"bitsandbytes does not import: {type(e).__name__}: {e}"
    return None


def to_nf4(linear: nn.Linear, device) -> nn.Module:
    """An NF4 Linear4bit holding `linear`'s weight; the weight is quantized on the move to device."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=torch.bfloat16,
                          compress_statistics=True, quant_type="nf4", device="cpu")
    # Params4bit quantizes when moved to the target device; hand it the weight on the CPU so the
    # move (not a no-op .to on an already-CUDA tensor) triggers quantization on every version.
    q.weight = bnb.nn.Params4bit(linear.weight.detach().to("cpu", torch.bfloat16), requires_grad=False,
                                 compress_statistics=True, quant_type="nf4")
    return q.to(device)


class LoRALinear(nn.Module):
    """base(x) + (x A^T B^T) * alpha / r, the fallback when peft is not installed."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.base = base
        dev = next(base.parameters()).device
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        dt = y.dtype if not torch.is_autocast_enabled(x.device.type) else torch.get_autocast_dtype(x.device.type)
        lora = (x.to(dt) @ self.lora_A.to(dt).T) @ self.lora_B.to(dt).T
        return y + lora * self.scaling


def apply_qlora(block: nn.Module, rank: int, device) -> tuple[nn.Module, str]:
    """Quantize every projection of `block` (built with bf16 nn.Linear) to NF4 and add rank-`rank`
    LoRA adapters; only the adapters are trainable. Returns (block, which LoRA implementation)."""
    swap_linears(block, lambda name, lin: to_nf4(lin, device))
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        def add_lora(name, q):
            return LoRALinear(q, q.in_features, q.out_features, rank, alpha=2 * rank)

        swap_linears(block, add_lora)
        how = "minimal LoRALinear (peft not installed)"
    else:
        # peft picks its bitsandbytes 4-bit LoRA layer only for models that say they are 4-bit.
        block.is_loaded_in_4bit = True
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                         target_modules=list(PROJECTIONS))
        block = inject_adapter_in_model(cfg, block)  # adapters land on the base layers' device
        import peft

        how = f"peft {peft.__version__}"
    for n, p in block.named_parameters():
        p.requires_grad_("lora_" in n)
        if "lora_" in n:
            p.data = p.data.float()  # inject_adapter_in_model follows the base dtype (bf16)
    return block, how

"""PEFT's LoRA Linear with its forward and backward as one autograd op, where it trains plain LoRA in fp32 on a CPU.

PEFT computes `base(x) + lora_B(lora_A(x)) * scaling`: the adapter's [tokens x out] product is written,
scaled in a second pass and added to the base output in a third, and backward makes the same passes
over the output gradient before adding the adapter's input gradient to the base's. Here the product
is accumulated into the base output by the matmul itself (addmm), the scaling rides on the rank-sized
factors, and the two input gradients are summed by one addmm: every pass over [tokens x out] but the
matmuls' own is gone. The matmuls are PEFT's: at scaling 1 (alpha = r, our default) the forward gives
the same bits, and gradients differ by float rounding only (their terms are summed in another order).

Anything else (dropout, DoRA and other variants, several or mixed adapters, merged or disabled
adapters, autocast, a bias that trains, a quantized or non-Linear base) runs PEFT's own forward.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn


class _LoRAProduct(torch.autograd.Function):
    """x·Wᵀ + bias + scaling·(x·Aᵀ)·Bᵀ, with gradients for x, A and B (W and bias frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        rows = x.reshape(-1, x.shape[-1])
        down = rows.mm(lora_a.t())
        out = rows.mm(weight.t()) if bias is None else torch.addmm(bias, rows, weight.t())
        out.addmm_(down, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(rows, down, weight, lora_a, lora_b)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        rows, down, weight, lora_a, lora_b = ctx.saved_tensors
        scaling = ctx.scaling
        grad = grad.reshape(-1, grad.shape[-1])
        # the scaling on B (rank columns), not on the gradient (tokens x out)
        grad_down = grad.mm(lora_b if scaling == 1.0 else lora_b * scaling)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:  # the first layer's input comes from a frozen embedding: no gradient
            grad_x = grad.mm(weight).addmm_(grad_down, lora_a).view(ctx.x_shape)
        # the weight gradients as autograd computes them for nn.Linear (xᵀ·g, transposed): PEFT's bits
        if ctx.needs_input_grad[3]:
            grad_a = rows.t().mm(grad_down).t()
        if ctx.needs_input_grad[4]:
            grad_b = down.t().mm(grad).t()
            if scaling != 1.0:
                grad_b.mul_(scaling)
        return grad_x, None, None, grad_a, grad_b, None


class FusedLoraLinear(LoraLinear):
    """A PEFT LoRA Linear whose plain fp32 CPU forward is `_LoRAProduct`; every other case is PEFT's forward."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._fusable_adapter(x)
        if adapter is None or args or kwargs:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return _LoRAProduct.apply(x, base.weight, base.bias, a, b, float(self.scaling[adapter]))

    def _fusable_adapter(self, x: torch.Tensor) -> str | None:
        """The one active adapter when this call is plain LoRA that `_LoRAProduct` computes as PEFT would, else None."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        base = self.base_layer
        if name not in self.lora_A or name in self.lora_variant or not isinstance(self.lora_dropout[name], nn.Identity):
            return None
        a, b = self.lora_A[name], self.lora_B[name]
        if type(base) is not nn.Linear or base.weight.requires_grad or a.bias is not None or b.bias is not None:
            return None
        if base.bias is not None and base.bias.requires_grad:
            return None
        tensors = (x, base.weight, a.weight, b.weight) + (() if base.bias is None else (base.bias,))
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors) or torch.is_autocast_enabled("cpu"):
            return None
        return name


def use_fused_lora(model: nn.Module, enabled: bool = True) -> int:
    """Make every PEFT LoRA Linear of `model` a FusedLoraLinear (same parameters and state dict), or with
    `enabled` False a plain one again (benchmarks/bench_fused_lora.py compares both); returns how many changed."""
    old, new = (LoraLinear, FusedLoraLinear) if enabled else (FusedLoraLinear, LoraLinear)
    swapped = 0
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
            swapped += 1
    return swapped

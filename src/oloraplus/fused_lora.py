"""PEFT's LoRA Linear without the adapter's passes over each layer's output, where it trains plain LoRA in fp32 on a CPU.

PEFT computes `base(x) + lora_B(lora_A(x)) * scaling`: the adapter's [tokens x out] product is written,
multiplied by the scaling in a second pass and added to the base output into a third tensor, and backward
makes the scaling pass again over the output gradient. At scaling 1 (alpha = r, our default) the scaling
passes change no bit, so here they are skipped, the product is added into the base output in place, and
the output gradient goes to the matmuls as it is. The matmuls and the add are PEFT's (not an addmm into
the base output: whether a BLAS kernel adds C before or after its products is its own affair, and the
bits must not depend on the CPU), each input gradient reaches x in the order PEFT's autograd nodes
deliver it, and the loss and every gradient are PEFT's bits (tests/test_fused_lora.py).

Anything else (another scaling, dropout, DoRA and other variants, several or mixed adapters, merged or
disabled adapters, autocast, a bias that trains, a quantized or non-Linear base) runs PEFT's own forward.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn


class _PassGradient(torch.autograd.Function):
    """x as it is. Its backward node, made before the adapter's, hands the base's input gradient to x after
    the adapter's: the order PEFT's nodes deliver them in, so x's gradient is summed as PEFT sums it."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _LoRADown(torch.autograd.Function):
    """x·Aᵀ (lora_A), with the gradients nn.Linear gives x and A."""

    @staticmethod
    def forward(ctx, x, lora_a):
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows, lora_a)
        ctx.x_shape = x.shape
        return rows.mm(lora_a.t())

    @staticmethod
    def backward(ctx, grad):
        rows, lora_a = ctx.saved_tensors
        grad_x = grad.mm(lora_a).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_a = grad.t().mm(rows) if ctx.needs_input_grad[1] else None
        return grad_x, grad_a


class _LoRAUp(torch.autograd.Function):
    """x·Wᵀ + bias + down·Bᵀ, the adapter's product added into the base output in place."""

    @staticmethod
    def forward(ctx, x, down, weight, bias, lora_b):
        rows = x.reshape(-1, x.shape[-1])
        out = rows.mm(weight.t()) if bias is None else torch.addmm(bias, rows, weight.t())
        out.add_(down.mm(lora_b.t()))
        ctx.save_for_backward(down, weight, lora_b)
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        down, weight, lora_b = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        grad_x = grad.mm(weight).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_down = grad.mm(lora_b) if ctx.needs_input_grad[1] else None
        grad_b = grad.t().mm(down) if ctx.needs_input_grad[4] else None
        return grad_x, grad_down, None, None, grad_b


class FusedLoraLinear(LoraLinear):
    """A PEFT LoRA Linear whose plain fp32 CPU forward at scaling 1 is `_LoRADown` and `_LoRAUp`; else PEFT's forward."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._fusable_adapter(x)
        if adapter is None or args or kwargs:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        passed = _PassGradient.apply(x)  # made first: its backward runs last
        down = _LoRADown.apply(x, self.lora_A[adapter].weight)
        return _LoRAUp.apply(passed, down, base.weight, base.bias, self.lora_B[adapter].weight)

    def _fusable_adapter(self, x: torch.Tensor) -> str | None:
        """The one active adapter when this call is plain LoRA that the ops above compute as PEFT does, else None."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        base = self.base_layer
        if name not in self.lora_A or name in self.lora_variant or not isinstance(self.lora_dropout[name], nn.Identity):
            return None
        if self.scaling[name] != 1:  # PEFT scales the product and its gradient in passes of their own: its bits
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

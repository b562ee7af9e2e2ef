"""LoRA+ parameter groups: every lora_A at lr, every lora_B at lambda·lr, anything else trainable at lr.

PEFT's create_loraplus_optimizer puts non-adapter parameters (biases, norms,
embeddings) with B at lambda·lr, which for lambda < 1 slows them down for no
reason; here they keep the base lr.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import TrainingArguments


def param_role(name: str) -> str:
    """lora_A, lora_B or other, from a parameter's name (any adapter name, any wrapper prefix)."""
    if ".lora_A." in name or name.endswith(".lora_A"):
        return "lora_A"
    if ".lora_B." in name or name.endswith(".lora_B"):
        return "lora_B"
    return "other"


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    lr_ratio: float,
    weight_decay: float,
    decay_names: set[str] | None = None,
) -> list[dict[str, Any]]:
    """LoRA+ parameter groups for any torch optimizer: up to six (role x decay), each recording its role.

    Use this with an optimizer you build yourself (`torch.optim.AdamW(groups, lr=lr)`);
    with a transformers Trainer, `loraplus_optimizer` builds the groups and the optimizer
    `args` asks for.

    `decay_names`: parameters that get weight decay (default: every matrix,
    i.e. everything that is not a bias or a 1-D norm weight).
    """
    buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = (name in decay_names) if decay_names is not None else p.ndim >= 2
        buckets.setdefault((param_role(name), decay), []).append(p)
    scale = {"lora_A": 1.0, "lora_B": lr_ratio, "other": 1.0}
    groups = []
    for (role, decay), params in sorted(buckets.items()):
        groups.append(
            {
                "params": params,
                "lr": lr * scale[role],
                "weight_decay": weight_decay if decay else 0.0,
                "role": role,
            }
        )
    return groups


def loraplus_optimizer(
    model: nn.Module,
    args: TrainingArguments,
    lr_ratio: float,
    decay_names: set[str] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer a transformers Trainer would build from `args`, with LoRA+ groups: B at lr_ratio x A's lr.

    Pass it to a stock Trainer (or TRL's SFTTrainer, a Trainer subclass that forwards it)
    as `Trainer(model=model, args=args, optimizers=(loraplus_optimizer(model, args, 4.0), None))`:
    the Trainer then builds its usual warmup/decay schedule over it, and a schedule scales
    every group by the same factor, so the ratio holds at every step. The optimizer class and
    its settings (AdamW, betas, eps, fused, `optim_args`) come from `args` through Trainer's own
    lookup, and weight decay follows Trainer's rule (none on biases and norms), so the only
    difference from what `args` alone gives is the learning rate of each lora_B.
    OLoRAPlusTrainer.create_optimizer calls this too: the CLI trains on the same path.

    Build it after the adapter is attached (and initialized) and before training; FSDP refuses
    `optimizers=`, so there subclass Trainer and return this from `create_optimizer`.
    """
    from transformers import Trainer

    from oloraplus.errors import OLoRAPlusError

    if not (isinstance(lr_ratio, (int, float)) and math.isfinite(lr_ratio) and lr_ratio > 0):
        raise OLoRAPlusError(f"lr_ratio must be a finite number > 0, got {lr_ratio!r}")
    if decay_names is None:  # Trainer's own rule; the method reads nothing from the instance
        decay_names = set(Trainer.get_decay_parameter_names(None, model))
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    factory = not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer))  # Muon, Dion
    if factory or {"params", "model", "optimizer_dict"} & kwargs.keys():  # GaLore, LOMO, layer-wise
        raise OLoRAPlusError(
            f"optim '{args.optim}' builds its own parameter groups, so LoRA+ cannot set B's learning rate; use an AdamW variant"
        )
    groups = loraplus_param_groups(model, args.learning_rate, lr_ratio, args.weight_decay, decay_names)
    if not any(g["role"] == "lora_B" for g in groups):
        raise OLoRAPlusError("the model has no trainable lora_B parameters: attach a LoRA adapter first")
    return optimizer_cls(groups, **kwargs)

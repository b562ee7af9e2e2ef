"""LoRA+ parameter groups: every lora_A at lr, every lora_B at lambda·lr, anything else trainable at lr.

PEFT's create_loraplus_optimizer puts non-adapter parameters (biases, norms,
embeddings) with B at lambda·lr, which for lambda < 1 slows them down for no
reason; here they keep the base lr.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def param_role(name: str) -> str:
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
    """Up to six groups (role x decay); each group records its role for tests and logs.

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

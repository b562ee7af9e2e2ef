"""oloraplus: fine-tune causal LMs with OLoRA+ and compare it with its parents.

From your own code, with your own transformers Trainer (or TRL's SFTTrainer):

    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
    initial = oloraplus.olora_init(peft_model)                  # thin-QR OLoRA start, outputs unchanged
    optimizer = oloraplus.loraplus_optimizer(peft_model, args, lr_ratio=4.0)   # B at 4 x A's lr
    Trainer(model=peft_model, args=args, optimizers=(optimizer, None), ...).train()
    oloraplus.save_adapter(peft_model, "adapter", initial)     # applies to the ORIGINAL base model

Names load on first use (PEP 562), so `import oloraplus` does not import torch, PEFT or
transformers: the CLI's --help and the torch-free modules stay fast.
"""

from __future__ import annotations

import importlib

from oloraplus.errors import OLoRAPlusError

__all__ = ["OLoRAPlusError", "loraplus_optimizer", "loraplus_param_groups", "olora_init", "save_adapter"]
__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "olora_init": "oloraplus.adapters",
    "save_adapter": "oloraplus.adapters",
    "loraplus_optimizer": "oloraplus.optim",
    "loraplus_param_groups": "oloraplus.optim",
}

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (half this module's import time)
if TYPE_CHECKING:
    from oloraplus.adapters import olora_init, save_adapter
    from oloraplus.optim import loraplus_optimizer, loraplus_param_groups


def __getattr__(name: str) -> object:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'oloraplus' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

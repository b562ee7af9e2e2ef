"""oloraplus: fine-tune causal LMs with OLoRA+ and compare it with its parents."""

from oloraplus.errors import OLoRAPlusError

__all__ = ["OLoRAPlusError"]
__version__ = "0.1.0"

"""A run's peak memory, estimated before it starts, and the settings that keep it under a budget.

Activations dominate a LoRA run's memory: the frozen weights are fixed, the adapter and
its optimizer state are small. Packed training stores, per token and decoder layer,
about 10 hidden-sized and 7.5 intermediate-sized float32 vectors for the backward pass;
gradient checkpointing keeps only each layer's input (one hidden-sized vector) and
recomputes one layer at a time. The constants below were fitted on SmolLM2-135M in fp32
(2-core AVX2 CPU): peak RSS 2,660 MB with 512-token packs and 3,715 MB with 1,024, i.e.
2.06 MB per token (the formula gives 2.07) over a fixed 1.6 GB (0.54 GB of weights, the
rest the Python process, libraries and allocator slack).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

import torch

from oloraplus import generation
from oloraplus.errors import OLoRAPlusError

GB = 1 << 30
PROCESS_OVERHEAD = int(1.1 * GB)  # Python, torch, tokenizer, dataset, allocator slack (measured, see above)
HIDDEN_VECTORS, INTERMEDIATE_VECTORS = 10.0, 7.5  # saved per token and layer without checkpointing
MIN_PACK_TOKENS = 256  # below this, packs cost speed (134 vs 176 tokens/s at 256 vs 512 on SmolLM2)


def peak_rss_gb() -> float | None:
    """This process's peak resident memory so far in GiB (what /usr/bin/time reports), None where unknown.

    Linux: VmHWM, which belongs to this program alone; getrusage's ru_maxrss also counts the
    parent's memory at the fork (a study's run process would report its driver's peak).
    """
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / (1 << 20)
    except (OSError, StopIteration):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / GB if sys.platform == "darwin" else kib / (1 << 20)  # macOS counts bytes


@dataclass(frozen=True)
class MemoryPlan:
    micro_batch_tokens: int
    gradient_checkpointing: bool
    eval_batch_size: int
    estimated_peak_gb: float

    def to_dict(self) -> dict:
        return asdict(self)


def _shape(model: torch.nn.Module) -> tuple[int, int, int, int]:
    """(layers, hidden, intermediate, KV floats per token per layer) from a transformers config."""
    c = model.config
    hidden = c.hidden_size
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    return c.num_hidden_layers, hidden, getattr(c, "intermediate_size", None) or 4 * hidden, 2 * kv_heads * head_dim


def activation_bytes_per_token(model: torch.nn.Module, checkpointing: bool) -> float:
    layers, hidden, inter, _ = _shape(model)
    one_layer = 4 * (HIDDEN_VECTORS * hidden + INTERMEDIATE_VECTORS * inter)
    return 4 * hidden * layers + one_layer if checkpointing else one_layer * layers


def eval_bytes_per_example(model: torch.nn.Module, max_length: int, max_new_tokens: int) -> float:
    """One answer being generated: its KV cache plus the prompt's transient activations (no gradients)."""
    layers, hidden, inter, kv = _shape(model)
    return (max_length + max_new_tokens) * 4 * (layers * kv + 4 * hidden + 3 * inter)


def plan_memory(
    model: torch.nn.Module,
    max_memory_gb: float,
    micro_batch_tokens: int,
    max_length: int,
    batch_size: int,
    eval_batch_size: int,
    max_new_tokens: int,
    vocab_chunk_bytes: int,
) -> MemoryPlan:
    """The configured settings, or the largest that fit `max_memory_gb` (0: no budget); one-line error if none fit."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    fixed = weights + PROCESS_OVERHEAD + 3 * vocab_chunk_bytes
    # a pack never splits an example, so it must hold one of max_length tokens
    wanted = micro_batch_tokens if micro_batch_tokens > 0 else batch_size * max_length
    wanted = max(wanted, max_length)

    # the row-group decoder keeps GROUPED_ROWS times the eval batch's rows in its cache: counted for every model
    # (one that decodes without row groups keeps fewer, so the plan errs on the safe side there)
    per_eval_row = generation.GROUPED_ROWS * eval_bytes_per_example(model, max_length, max_new_tokens)

    def peak(tokens: int, checkpointing: bool, eval_batch: int) -> float:
        train = fixed + tokens * activation_bytes_per_token(model, checkpointing)
        return max(train, fixed + eval_batch * per_eval_row)

    if max_memory_gb <= 0:
        return MemoryPlan(micro_batch_tokens, False, eval_batch_size, peak(wanted, False, eval_batch_size) / GB)
    budget = max_memory_gb * GB
    for checkpointing in (False, True):
        per_token = activation_bytes_per_token(model, checkpointing)
        fit = int((budget - fixed) // per_token)
        if fit >= max_length:
            tokens = min(wanted, fit)
            if not checkpointing and tokens < min(MIN_PACK_TOKENS, wanted):
                continue
            eval_fit = int((budget - fixed) // per_eval_row)
            eval_batch = max(1, min(eval_batch_size, eval_fit))
            return MemoryPlan(tokens, checkpointing, eval_batch, peak(tokens, checkpointing, eval_batch) / GB)
    need = (fixed + max_length * activation_bytes_per_token(model, True)) / GB
    raise OLoRAPlusError(
        f"max_memory_gb {max_memory_gb:g} is too small for this model and max_length {max_length}: weights "
        f"{weights / GB:.2f} GB + process {PROCESS_OVERHEAD / GB:.1f} GB + one example with gradient checkpointing "
        f"needs about {math.ceil(need * 10) / 10:.1f} GB"
    )

"""Padding-free batches: the examples of a batch laid end to end, attention kept inside each example.

Packing keeps the large matmuls of a padded batch without computing its padding, so
the batch order can stay random (length-grouped batches biased what the model learned);
`benchmarks/bench_packing.py` times padded, one-example and packed layouts of the same
batches side by side, with the same summed loss.

A packed batch is one row: `position_ids` restart at 0 for each example, the first
label of each example is masked (no target crosses a boundary), and `cu_seq_lens_q`
(the FlashAttention varlen convention, passed through the model to its attention)
says where the examples start. The attention function registered here runs a causal
SDPA per example; without `cu_seq_lens_q` (padded batches, generation with a KV cache)
it is transformers' own SDPA, so a model switched to it works everywhere.

Tokens that every example of a batch starts with (a chat template's system prompt: 24
of SmolLM2's ~100 tokens per Alpaca example) are computed once: the row starts with
that shared prefix, each example's own tokens follow with positions continuing from it,
and each example attends to the prefix and to itself. The prefix holds no target, so
the loss and the gradients are those of the unshared batch (the prefix's gradient is
the sum of what each example sends it), with a quarter fewer tokens to compute.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from oloraplus.data import IGNORE_INDEX
from oloraplus.models import decoder_and_head

PACKED_ATTENTION = "oloraplus_packed_sdpa"
PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "shared_prefix_length")


def packed_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal SDPA within each packed example (and its shared prefix); transformers' SDPA when not packed."""
    if hasattr(key, "attend"):  # a decode step's row groups (generation.GroupedKeys): this function per group
        return key.attend(module, query, packed_sdpa_attention, scaling=scaling, dropout=dropout, **kwargs)
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    prefix = kwargs.get("shared_prefix_length") or 0
    window = kwargs.get("sliding_window")
    segments = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    if window is not None and max(prefix + e - s for s, e in segments) > window:
        raise NotImplementedError(
            "packed attention does not apply sliding windows; lower max_length or turn packing off"
        )
    sdpa = partial(
        F.scaled_dot_product_attention,
        dropout_p=dropout if module.training else 0.0,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    if query.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # CPU flash attention's backward ran 2.6-3.6x slower in bf16 than in fp32 (Zen 5, Intel AMX); in fp32
        # here bf16 autocast trained 1.17x faster on Zen 5 (docs/benchmarks.md, "bf16 on a CPU")
        query, key, value = query.float(), key.float(), value.float()
        precision = torch.autocast("cpu", enabled=False)
    else:
        precision = contextlib.nullcontext()
    with precision:
        return _causal_per_example(sdpa, query, key, value, segments, prefix), None


def _causal_per_example(sdpa, query, key, value, segments: list[tuple[int, int]], prefix: int) -> torch.Tensor:
    parts = []
    for i, (s, e) in enumerate(segments):
        q, k, v = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        if prefix and i > 0:  # an example after the shared prefix (segment 0) sees all of it, then itself causally
            k, v = torch.cat([key[:, :, :prefix], k], dim=2), torch.cat([value[:, :, :prefix], v], dim=2)
            seen = torch.ones(e - s, prefix + e - s, dtype=torch.bool, device=query.device).tril(diagonal=prefix)
            parts.append(sdpa(q, k, v, attn_mask=seen))
        else:
            parts.append(sdpa(q, k, v, is_causal=True))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous()


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # padded batches still get SDPA's mask


def can_pack(model: torch.nn.Module, max_length: int) -> bool:
    """Whether packed attention computes what the model's own attention does for examples up to max_length.

    A family must pass positions and boundaries through to its attention (models.decoder_and_head's
    families do), and a sliding window narrower than an example would need a band mask we do not build.
    """
    if decoder_and_head(model) is None:
        return False
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    window = getattr(config, "sliding_window", None)
    return window is None or window >= max_length or getattr(config, "use_sliding_window", True) is False


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch a (PEFT-wrapped or plain) transformers model to the packed attention."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(PACKED_ATTENTION)


def shared_prefix_length(features: list[dict]) -> int:
    """How many leading tokens all examples of a batch share before any target (0: nothing to share).

    The prefix stops before each example's first labelled token and its predecessor, so no
    target moves, and leaves every example at least one token of its own.
    """
    if len(features) < 2:
        return 0
    first = features[0]["input_ids"]
    n = len(first)
    for f in features:
        ids, labels = f["input_ids"], f["labels"]
        labelled = next((j for j, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
        n = min(n, len(ids) - 1, labelled - 1)
        n = next((j for j in range(max(n, 0)) if ids[j] != first[j]), max(n, 0))
    return n


def _row(prefix: list[int], examples: list[tuple[list[int], list[int]]], longest: int) -> dict:
    """One packed row: `prefix` (may be empty), then each (input_ids, labels) example after it."""
    n = len(prefix)
    lengths = ([n] if n else []) + [len(ids) for ids, _ in examples]
    ids = torch.tensor(prefix + [t for e, _ in examples for t in e], dtype=torch.long)[None]
    labels = torch.tensor([IGNORE_INDEX] * n + [t for _, lab in examples for t in lab], dtype=torch.long)[None]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    labels[0, cu[:-1].long()] = IGNORE_INDEX  # the token before an example's start is the previous example's last
    positions = torch.cat([torch.arange(n)] + [torch.arange(n, n + len(e)) for e, _ in examples])[None]
    # Trainer counts real input tokens as the mask's sum: a shared prefix token stands for one per example
    counted = torch.ones_like(ids)
    counted[0, :n] = len(examples)
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "attention_mask": counted,  # the packed forward does not use it
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
        "shared_prefix_length": n,
    }


def packed_model_inputs(batch: dict) -> dict:
    """What a packed row passes to the model beside input_ids: positions, boundaries, and an empty mask.

    Given no mask, transformers builds a [tokens x tokens] boolean one for a packed row (a test-loss
    pack of 64 long examples holds 25k tokens: 625 MB, and its temporaries several times that) that
    packed_sdpa_attention never reads. A 4D mask counts as already prepared and goes through untouched.
    """
    empty_mask = torch.ones(1, 1, 0, 0, dtype=torch.bool, device=batch["input_ids"].device)
    return {"position_ids": batch["position_ids"], **{k: batch[k] for k in PACKED_KEYS}, "attention_mask": empty_mask}


def example_bounds(batch: dict) -> list[int]:
    """Where a packed batch's examples start and end in its row (its shared prefix, segment 0, left out)."""
    return batch["cu_seq_lens_q"].tolist()[1 if batch.get("shared_prefix_length") else 0 :]


def pack(features: list[dict], share_prefix: bool = True) -> dict[str, torch.Tensor | int]:
    """One row holding every example of `features` (input_ids, labels) back to back, their common prefix once."""
    n = shared_prefix_length(features) if share_prefix else 0
    examples = [(f["input_ids"][n:], f["labels"][n:]) for f in features]
    return _row(features[0]["input_ids"][:n], examples, max(len(f["input_ids"]) for f in features))


def split_packed(batch: dict, max_tokens: int) -> list[dict]:
    """A packed batch cut at example boundaries into packs of at most `max_tokens` (an example longer stays whole).

    Each pack repeats the shared prefix and holds whole examples; together they hold exactly
    the batch's examples and targets, so summing their losses and gradients gives the
    batch's: memory is bounded by the pack, not the batch.
    """
    if max_tokens <= 0 or batch["input_ids"].shape[1] <= max_tokens:
        return [batch]
    n = int(batch.get("shared_prefix_length", 0))
    bounds = example_bounds(batch)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    groups, start = [[]], bounds[0]
    for s, e in zip(bounds[:-1], bounds[1:]):
        if n + e - start > max_tokens and groups[-1]:
            groups.append([])
            start = s
        groups[-1].append((ids[s:e], labels[s:e]))
    return [_row(ids[:n], group, max(n + len(e) for e, _ in group)) for group in groups]


def is_packed(batch: dict) -> bool:
    return "cu_seq_lens_q" in batch


class PackCollator:
    """Trainer collator: a batch of tokenized examples -> one packed row (see `pack`)."""

    def __call__(self, features: list[dict]) -> dict:
        return pack(features)

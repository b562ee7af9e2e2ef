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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from oloraplus.data import IGNORE_INDEX
from oloraplus.models import decoder_and_head

PACKED_ATTENTION = "oloraplus_packed_sdpa"
PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def packed_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal SDPA within each packed example; transformers' SDPA when the batch is not packed."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    window = kwargs.get("sliding_window")
    bounds = cu.tolist()
    if window is not None and max(e - s for s, e in zip(bounds[:-1], bounds[1:])) > window:
        raise NotImplementedError(
            "packed attention does not apply sliding windows; lower max_length or turn packing off"
        )
    gqa = query.shape[1] != key.shape[1]
    parts = [
        F.scaled_dot_product_attention(
            query[:, :, s:e],
            key[:, :, s:e],
            value[:, :, s:e],
            dropout_p=dropout if module.training else 0.0,
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


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


def pack(features: list[dict]) -> dict[str, torch.Tensor | int]:
    """One row holding every example of `features` (input_ids, labels) back to back."""
    lengths = [len(f["input_ids"]) for f in features]
    ids = torch.tensor([t for f in features for t in f["input_ids"]], dtype=torch.long)[None]
    labels = torch.tensor([t for f in features for t in f["labels"]], dtype=torch.long)[None]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    labels[0, cu[:-1].long()] = IGNORE_INDEX  # the token before an example's start is the previous example's last
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    longest = max(lengths)
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        # ones, for Trainer's count of real input tokens; the packed forward does not use it
        "attention_mask": torch.ones_like(ids),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def split_packed(batch: dict, max_tokens: int) -> list[dict]:
    """A packed batch cut at example boundaries into packs of at most `max_tokens` (an example longer stays whole).

    The packs together hold exactly the batch's tokens and labels, so summing their
    losses and gradients gives the batch's: memory is bounded by the pack, not the batch.
    """
    bounds = batch["cu_seq_lens_q"].tolist()
    if max_tokens <= 0 or bounds[-1] <= max_tokens:
        return [batch]
    cuts, start = [0], 0
    for i in range(1, len(bounds)):
        if bounds[i] - start > max_tokens and bounds[i - 1] > start:
            cuts.append(i - 1)
            start = bounds[i - 1]
    cuts.append(len(bounds) - 1)
    packs = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        s, e = bounds[a], bounds[b]
        cu = batch["cu_seq_lens_q"][a : b + 1] - s
        longest = int((cu[1:] - cu[:-1]).max())
        packs.append(
            {
                **{k: batch[k][:, s:e] for k in ("input_ids", "labels", "position_ids", "attention_mask")},
                "cu_seq_lens_q": cu,
                "cu_seq_lens_k": cu,
                "max_length_q": longest,
                "max_length_k": longest,
            }
        )
    return packs


def is_packed(batch: dict) -> bool:
    return "cu_seq_lens_q" in batch


class PackCollator:
    """Trainer collator: a batch of tokenized examples -> one packed row (see `pack`)."""

    def __call__(self, features: list[dict]) -> dict:
        return pack(features)

"""Response-only cross-entropy: the LM head runs only at positions that carry a label.

A causal LM's forward computes logits for every position, prompt and padding
included, and its loss then masks most of them away. For a small model the head
is a large share of the work and of the memory: SmolLM2-135M's head is 28M of its
135M matmul parameters, and its 49k-wide float32 logits take 196 kB per token,
several copies of which live until the backward pass. Here the decoder's hidden
states are gathered at the labelled positions first, and only those go through the
head. Same loss, same gradients (to float rounding): tests/test_loss.py checks both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oloraplus.data import IGNORE_INDEX

# Families whose logits are exactly lm_head(decoder(...).last_hidden_state). Others
# (logit softcapping, logit scaling, router auxiliary losses) use their own forward.
HEAD_ONLY_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3"})


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The decoder stack and LM head of a (PEFT-wrapped or plain) causal LM of a known family, else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = getattr(getattr(base, "config", None), "model_type", None)
    if family not in HEAD_ONLY_FAMILIES:
        return None
    return base.get_decoder(), base.get_output_embeddings()


def response_token_losses(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 cross-entropy of each labelled next token, and the (batch, seq-1) mask saying where they are."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    parts = decoder_and_head(model)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][mask]
    else:
        decoder, head = parts
        # use_cache=False: a KV cache is of no use to a loss and would only hold memory
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][mask])
    return F.cross_entropy(logits.float(), targets[mask], reduction="none"), mask

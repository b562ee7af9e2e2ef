"""Response-only cross-entropy: the LM head runs only at labelled positions, a bounded chunk at a time.

A causal LM's forward computes logits for every position, prompt and padding
included, and its loss then masks most of them away. For a small model the head
is a large share of the work and of the memory: SmolLM2-135M's head is 28M of its
135M matmul parameters, and its 49k-wide float32 logits take 196 kB per token (a
262k vocabulary: 1 MB per token), several copies of which live until the backward
pass. Here the decoder's hidden states are gathered at the labelled positions, and
those go through the head in chunks of at most LOGITS_CHUNK_BYTES of float32 logits.
When the head is frozen (always, for LoRA), each chunk's gradient with respect to the
hidden states is computed in the same pass, so no logits outlive their chunk and
nothing is recomputed. Same loss, same gradients (to float rounding): tests/test_loss.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oloraplus.data import IGNORE_INDEX
from oloraplus.models import decoder_and_head
from oloraplus.packing import is_packed, packed_model_inputs

LOGITS_CHUNK_BYTES = 64 << 20


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of hidden @ weightᵀ, chunk by chunk, for a head that is not trained.

    The gradient with respect to `hidden` (softmax − one-hot, times the head) is computed
    in the forward pass and kept: [tokens × hidden] instead of [tokens × vocab].
    """

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int, head: torch.nn.Module
    ) -> torch.Tensor:
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # the dtype autocast would run this matmul in: a head stored in bf16 is then not cast up and back per chunk
        device = hidden.device.type
        mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        for s in range(0, hidden.shape[0], rows):
            h, t = hidden[s : s + rows], targets[s : s + rows]
            # no gradient (the test loss): the head's own forward, which generation.linears_in_onednn may have moved
            # to oneDNN; training keeps the matmul its adapters were trained with, bit for bit. Under autocast
            # either is a bf16 matmul, like the head's own forward
            logits = (h @ weight.t() if grad is not None else head(h)).float()
            lse = torch.logsumexp(logits, dim=-1)
            losses[s : s + rows] = lse - logits.gather(1, t[:, None]).squeeze(1)
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad[s : s + rows] = probs.to(mm_dtype) @ weight.to(mm_dtype)
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_losses[:, None].to(grad.dtype), None, None, None, None


def head_token_losses(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Float32 cross-entropy of `head(hidden)` against `targets`, one value per row of `hidden`."""
    weight = head.weight
    # a head being trained, or a biased one: the plain path. Under no_grad (test loss) a head's weight
    # still says requires_grad, yet no gradient flows: chunked, or the logits of every token live at once
    if (weight.requires_grad and torch.is_grad_enabled()) or getattr(head, "bias", None) is not None:
        return F.cross_entropy(head(hidden).float(), targets, reduction="none")
    # out_features: an untied head answering through oneDNN holds its weight packed, its dense one dropped
    rows = max(1, LOGITS_CHUNK_BYTES // (4 * getattr(head, "out_features", weight.shape[0])))
    return _FrozenHeadCrossEntropy.apply(hidden, weight, targets, rows, head)


def response_token_losses(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    **packed: torch.Tensor | int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 cross-entropy of each labelled next token, and the (batch, seq-1) mask saying where they are.

    `packed` holds the position_ids and cu_seq_lens_* of a packed batch, and `attention_mask`
    is then the empty one of packing.packed_model_inputs.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **packed}
    parts = decoder_and_head(model)
    if parts is None:
        logits = model(**inputs).logits[:, :-1][mask]
        return F.cross_entropy(logits.float(), targets[mask], reduction="none"), mask
    decoder, head = parts
    # use_cache=False: a KV cache is of no use to a loss and would only hold memory
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    return head_token_losses(head, hidden[:, :-1][mask], targets[mask]), mask


def batch_token_losses(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_token_losses` of a collated batch, padded or packed."""
    if is_packed(batch):
        extra = packed_model_inputs(batch)
        return response_token_losses(model, batch["input_ids"], extra.pop("attention_mask"), batch["labels"], **extra)
    return response_token_losses(model, batch["input_ids"], batch["attention_mask"], batch["labels"])

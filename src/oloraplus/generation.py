"""Greedy answers: length-sorted batches, a KV cache with room reserved, and rows that leave once they end."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from oloraplus.data import length_sorted_batches, prompt_ids
from oloraplus.precision import autocast_context


class ReservedLayer(DynamicLayer):
    """A DynamicLayer that writes new tokens into room reserved at the first update.

    DynamicLayer concatenates every step, copying the whole cache each time (quadratic in
    the answer length); here a step writes one position, and concatenation is only the
    fallback when the room runs out.
    """

    def __init__(self, room: int):
        super().__init__()
        self.room = room
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self.length == 0 or self.length + new > self._keys.shape[-2]:
            keep_k = self._keys[..., : self.length, :] if self.length else key_states[..., :0, :]
            keep_v = self._values[..., : self.length, :] if self.length else value_states[..., :0, :]
            shape = list(key_states.shape)
            shape[-2] = self.length + new + self.room
            self._keys, self._values = key_states.new_empty(shape), value_states.new_empty(shape)
            self._keys[..., : self.length, :], self._values[..., : self.length, :] = keep_k, keep_v
        self._keys[..., self.length : self.length + new, :] = key_states
        self._values[..., self.length : self.length + new, :] = value_states
        self.length += new
        self.keys, self.values = self._keys[..., : self.length, :], self._values[..., : self.length, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self.keys, self.values = self._keys[..., : self.length, :], self._values[..., : self.length, :]


def reserved_cache(model: PreTrainedModel, room: int) -> DynamicCache:
    """The model's own DynamicCache, its full-attention layers replaced by ReservedLayer (sliding ones kept)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [ReservedLayer(room) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@torch.no_grad()
def greedy_decode(
    model: PreTrainedModel, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int, pad_token_id: int
) -> list[list[int]]:
    """Greedy continuations of a batch of prompts (left-padded, KV cache), EOS included where emitted.

    The same tokens as `model.generate(do_sample=False)` with the same positions and
    mask, but a row leaves the batch (and its cache) as soon as it emits EOS:
    generate keeps computing finished rows until the longest answer ends.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for k, p in enumerate(prompts):
        ids[k, width - len(p) :] = torch.tensor(p)
        mask[k, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 0)  # as generate computes them
    cache = reserved_cache(model, max_new_tokens)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
    ).logits[:, -1]
    alive = torch.arange(len(prompts), device=device)
    next_position = positions[:, -1] + 1
    answers: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        tokens = logits.float().argmax(-1)
        for row, token in zip(alive.tolist(), tokens.tolist()):
            answers[row].append(token)
        going = tokens != eos_token_id
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive, tokens, mask, next_position = alive[keep], tokens[keep], mask[keep], next_position[keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        logits = model(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position[:, None],
            cache=cache, use_cache=True,
        ).logits[:, -1]
        next_position = next_position + 1
    return answers


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, str]],
    max_new_tokens: int,
    batch_size: int,
    bf16: bool = False,
    max_prompt_length: int = 1024,
) -> tuple[list[str], int]:
    """Greedy answers in length-sorted batches (`greedy_decode`); returns (answers, generated tokens)."""
    model.eval()
    prompts = [prompt_ids(tokenizer, r)[-max_prompt_length:] for r in records]
    answers: list[str] = [""] * len(records)
    generated = 0
    # generation is most of a run's evaluation time (minutes on a CPU): show it like training's bar
    progress = tqdm(total=len(records), desc="generating answers", unit="answer", leave=False)
    for idx in length_sorted_batches([len(p) for p in prompts], batch_size):
        with autocast_context(model, bf16):
            rows = greedy_decode(model, [prompts[i] for i in idx], max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id)
        for i, row in zip(idx, rows):
            generated += len(row)
            answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
        progress.update(len(idx))
    progress.close()
    return answers, generated

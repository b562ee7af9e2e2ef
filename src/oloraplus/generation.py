"""Greedy answers: a running batch refilled as rows end, over a KV cache with room reserved."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from oloraplus.data import IGNORE_INDEX, prompt_ids
from oloraplus.distributed import ALONE, Ranks
from oloraplus.models import decoder_and_head
from oloraplus.packing import can_pack, example_bounds, pack, packed_model_inputs, use_packed_attention
from oloraplus.precision import autocast_context, cpu_info, return_freed_memory_when_grown

# Positions a cache reserves past its longest row, and adds again each time they run out. A whole
# answer's worth (128) up front made the cache of 64 rows of ~60-token prompts three times what they
# held; 32 at a time copies the cache once per 32 steps, a small fraction of those steps' matmuls.
ROOM = 32

# A decode step reads every weight once whatever its rows, so rows per step are what pays on a CPU; the
# cache's memory is what limits them. The running batch takes up to this many times `batch_size` rows
# once the prompts get shorter, never more cache positions than `batch_size` rows of the longest prompt
# (the first batch's, the peak before this). With the in-place row moves below, on SmolLM2-135M's 500 test
# prompts × 128 tokens (fp32, 2-core Intel AMX CPU, benchmarks/bench_decode_batch.py): 199.7 -> 243.0 answer
# tokens/s at eval batch 64, every answer identical.
MAX_ROWS_FACTOR = 4


class ReservedLayer(DynamicLayer):
    """A DynamicLayer that writes new tokens into room reserved ahead (`room` positions at a time).

    DynamicLayer concatenates every step, copying the whole cache each time (quadratic in
    the answer length); here a step writes one position, and the cache is copied into a
    larger one only when the room runs out.
    """

    def __init__(self, room: int):
        super().__init__()
        self.room = room
        self.length = 0

    def _hold(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        self._keys, self._values, self.length = keys, values, length
        self.keys, self.values = keys[..., :length, :], values[..., :length, :]

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
        self._hold(self._keys, self._values, self.length + new)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor, start: int = 0) -> None:
        """Keep the rows `indices`, and drop the first `start` positions (padding no kept row needs)."""
        if self.length:
            self._hold(self._keys[indices][..., start:, :], self._values[indices][..., start:, :], self.length - start)

    def move_rows(self, holes: torch.Tensor, sources: torch.Tensor, rows: int, start: int = 0) -> None:
        """Copy rows `sources` into rows `holes`, keep the first `rows` rows, drop the first `start` positions.

        In place: only the moved rows are copied (`batch_select_indices` copies every kept row,
        the whole cache, each time an answer ends). The kept part stays a view of the buffer.
        """
        if self.length:
            for buffer in (self._keys, self._values):
                buffer[holes] = buffer[sources]
            self._hold(self._keys[:rows, :, start:], self._values[:rows, :, start:], self.length - start)

    def append_rows(self, other: ReservedLayer) -> None:
        """Stack `other`'s rows below ours, both right-aligned on the longer one (zeros, masked, on the left)."""
        width = max(self.length, other.length)
        shape = list(self._keys.shape)
        shape[0], shape[-2] = shape[0] + other._keys.shape[0], width + self.room
        keys, values = self._keys.new_zeros(shape), self._values.new_zeros(shape)
        ours = self._keys.shape[0]
        for rows, layer in ((slice(0, ours), self), (slice(ours, None), other)):
            keys[rows, :, width - layer.length : width] = layer.keys
            values[rows, :, width - layer.length : width] = layer.values
        self._hold(keys, values, width)


# The batch size oneDNN packs a weight's layout for (the eval batch): on Zen 3 a packed weight ran decode-sized
# matmuls as fast whether packed for 64 or 256 rows, and outputs are the same bits from 17 rows up.
PACK_ROWS = 64


def onednn_linears_pay() -> str | None:
    """Which Linears answer faster through oneDNN on this CPU: "all", "head", or None (MKL's sgemm for all).

    Only where measured, two AMD CPUs of family 25 (benchmarks/bench_decode_variants.py, every answer identical):
    - Zen 3 (no AVX-512): "all". MKL's sgemm packs the weight on every call: the LM head at 64-256 rows ran at
      56-60 GFLOP/s there, 84-117 in oneDNN on a weight packed once (benchmarks/bench_decode_matmuls.py); the
      base model's answers to 500 test prompts x 128 tokens: 121.6 -> 147.5 answer tokens/s, 500/500 identical.
    - Zen 4 (AVX-512): "head", the 576 x 49,152 LM head alone: 193.6 -> 220.7 answer tokens/s at 128 prompts,
      224.6 -> 231.7 at 500; every Linear in oneDNN was no faster than the head alone there.
    On Zen 5 the decode matmuls already ran at the fp32 peak; other CPUs are unmeasured: MKL stays there.
    """
    info = cpu_info()
    if info.get("vendor_id") != "AuthenticAMD" or info.get("cpu family") != "25":
        return None
    return "head" if "avx512f" in info.get("flags", "").split() else "all"


def onednn_forward(linear: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """`linear`'s forward as oneDNN's inner product on a copy of its weight packed once into oneDNN's layout
    (what torch.compile's CPU backend does with frozen weights)."""
    weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_ROWS)
    bias = linear.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])

    forward.packed = weight  # the weight comes back from it exactly (a reorder moves values, computes none)
    return forward


@contextmanager
def linears_in_onednn(model: PreTrainedModel, which: str | None = None) -> Iterator[None]:
    """While answering, the Linears `which` names ("all", "head", "none"; None: `onednn_linears_pay`) run
    `onednn_forward`, in fp32 on a CPU only.

    A Linear's dense weight is dropped while its packed copy answers and comes back from it after,
    so memory stays flat; a weight the embedding shares (a tied LM head: 113 MB for SmolLM2) is kept.
    """
    which = onednn_linears_pay() if which is None else which
    head = model.get_output_embeddings()
    fits = (
        which in ("all", "head")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and isinstance(head, torch.nn.Linear)
        and head.weight.device.type == "cpu"
        and head.weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    )
    if not fits:
        yield
        return
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)] if which == "all" else [head]
    linears = [m for m in linears if "forward" not in vars(m) and m.weight.dtype == torch.float32]
    # a weight that another module also reads stays: the embedding's, or one Linear's that another shares
    owners = Counter(
        m.weight.data_ptr() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
    )
    shared = {ptr for ptr, n in owners.items() if n > 1}
    dropped = []
    try:
        for linear in linears:
            linear.forward = onednn_forward(linear)
            if linear.weight.data_ptr() not in shared:
                linear.weight.data = linear.weight.data.new_empty(0)
                dropped.append(linear)
        yield
    finally:
        for linear in linears:
            if "forward" in vars(linear):
                if linear in dropped:
                    linear.weight.data = linear.forward.packed.to_dense()
                del linear.forward


def reserved_cache(model: PreTrainedModel, room: int) -> DynamicCache:
    """The model's own DynamicCache, its full-attention layers replaced by ReservedLayer (sliding ones kept)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [ReservedLayer(room) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _left_padded(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, ...]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for k, p in enumerate(prompts):
        ids[k, width - len(p) :] = torch.tensor(p)
        mask[k, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 0)  # as generate computes them
    return ids.to(device), mask.to(device), positions.to(device)


def _prefill_padded(model: PreTrainedModel, prompts: list[list[int]], room: int, pad_token_id: int):
    """The prompts left-padded to the longest: (cache, mask, next positions, last-token logits)."""
    ids, mask, positions = _left_padded(prompts, pad_token_id, next(model.parameters()).device)
    cache = reserved_cache(model, room)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
    ).logits[:, -1]
    return cache, mask, positions[:, -1] + 1, logits


def _prefill_packed(model: PreTrainedModel, prompts: list[list[int]], room: int):
    """The prompts packed in one row, the prefix they share computed once (packing.py), and each prompt's
    keys and values then laid out left-padded as `_prefill_padded` leaves them: no padding is computed.

    The longest prompts come first (generate_answers), so a padded batch computes up to twice its
    real tokens, and a chat template's system prompt is half of an Alpaca prompt.
    """
    device = next(model.parameters()).device
    batch = pack([{"input_ids": p, "labels": [IGNORE_INDEX] * len(p)} for p in prompts])
    shared, bounds = int(batch["shared_prefix_length"]), example_bounds(batch)
    decoder, head = decoder_and_head(model)
    packed_cache = DynamicCache(config=model.config)
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    hidden = decoder(
        input_ids=batch["input_ids"], cache=packed_cache, use_cache=True, **packed_model_inputs(batch)
    ).last_hidden_state[0]
    width = max(len(p) for p in prompts)
    where = torch.zeros(len(prompts), width, dtype=torch.long)  # packed index of each cache slot (0 in padding)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        own = torch.cat([torch.arange(shared), torch.arange(s, e)])
        where[r, width - len(own) :], mask[r, width - len(own) :] = own, 1
    where, mask = where.to(device), mask.to(device)
    cache = reserved_cache(model, room)
    for layer, packed in zip(cache.layers, packed_cache.layers):
        keys, values = (t[0][:, where].transpose(0, 1) * mask[:, None, :, None] for t in (packed.keys, packed.values))
        layer.update(keys, values)  # zeros in the padding, as a padded prefill's masked slots hold no signal
    last = torch.tensor(bounds[1:], device=device) - 1
    next_position = torch.tensor([len(p) for p in prompts], device=device)
    return cache, mask, next_position, head(hidden[last])


@torch.no_grad()
def greedy_decode(
    model: PreTrainedModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    batch_size: int | None = None,
    on_finished: Callable[[int], None] | None = None,
    onednn: str | None = None,
) -> list[list[int]]:
    """Greedy continuations of `prompts` (EOS included where emitted), `batch_size` rows at a time.

    The same tokens as `model.generate(do_sample=False)` on each prompt, with the same
    positions and mask, but a row leaves the batch (and its KV cache) as soon as it
    ends, and once a quarter of the batch has ended the waiting prompts take the free rows:
    generate keeps computing finished rows until a batch's longest answer ends, so most
    of its steps run a nearly empty batch. New rows join the cache left-padded to the
    running width; padding no row needs is trimmed as rows leave. As the waiting prompts
    get shorter the batch takes more rows than `batch_size` (up to MAX_ROWS_FACTOR times),
    as many as keep its cache within the positions of `batch_size` rows of the longest prompt.
    `onednn`: which Linears answer through oneDNN (`linears_in_onednn`; None: where it measured faster).
    """
    with linears_in_onednn(model, onednn):
        return _decode(model, prompts, max_new_tokens, eos_token_id, pad_token_id, batch_size, on_finished)


def _decode(
    model: PreTrainedModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    batch_size: int | None,
    on_finished: Callable[[int], None] | None,
) -> list[list[int]]:
    device = next(model.parameters()).device
    batch_size = batch_size or len(prompts)
    answers: list[list[int]] = [[] for _ in prompts]
    rows = torch.zeros(0, dtype=torch.long)  # which prompt each running row answers
    cache = mask = next_position = logits = None
    waiting = 0
    # rows can join a running batch only where every cache layer can take them (sliding layers cannot)
    mergeable = all(isinstance(layer, ReservedLayer) for layer in reserved_cache(model, 0).layers)
    packed = mergeable and can_pack(model, max(len(p) for p in prompts))
    if packed:
        use_packed_attention(model)  # its unpacked path is transformers' SDPA: decode steps are unchanged
    room = min(ROOM, max_new_tokens)
    budget = batch_size * (max(len(p) for p in prompts) + max_new_tokens + room)  # cache positions
    max_rows = MAX_ROWS_FACTOR * batch_size
    while True:
        # rows that fit the budget until every one has ended: none grows past its width now + max_new_tokens
        width = max([mask.shape[1] if len(rows) else 0] + [len(p) for p in prompts[waiting : waiting + max_rows]])
        fit = max(1, min(max_rows, budget // (width + max_new_tokens + room)))
        # refill once a quarter of the rows are free: a decode step costs nearly the same at 16 rows as at 64
        if waiting < len(prompts) and (len(rows) == 0 or (mergeable and len(rows) <= fit - max(1, fit // 4))):
            start = torch.arange(waiting, min(len(prompts), waiting + fit - len(rows)))
            waiting += len(start)
            joining = [prompts[i] for i in start]
            return_freed_memory_when_grown()  # the freed holes the last rows touched, before new ones are made
            if packed:
                new_cache, new_mask, new_next, new_logits = _prefill_packed(model, joining, room)
            else:
                new_cache, new_mask, new_next, new_logits = _prefill_padded(model, joining, room, pad_token_id)
            if len(rows) == 0:
                cache, mask, next_position, logits = new_cache, new_mask, new_next, new_logits
            else:
                for layer, new_layer in zip(cache.layers, new_cache.layers):
                    layer.append_rows(new_layer)
                width = max(mask.shape[1], new_mask.shape[1])
                mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in (mask, new_mask)])
                next_position = torch.cat([next_position, new_next])
                logits = torch.cat([logits, new_logits])
            rows = torch.cat([rows, start])
        if len(rows) == 0:
            return answers
        tokens = logits.float().argmax(-1)
        ended = []
        for k, (row, token) in enumerate(zip(rows.tolist(), tokens.tolist())):
            answers[row].append(token)
            if token == eos_token_id or len(answers[row]) == max_new_tokens:
                ended.append(k)
                if on_finished:
                    on_finished(row)
        if ended:
            kept = len(rows) - len(ended)
            if kept == 0:
                rows, cache = rows[:0], None
                continue
            # the last running rows move into the ended rows' places: the cache copies only those
            ended_rows = set(ended)
            holes = [k for k in ended if k < kept]
            sources = [k for k in range(kept, len(rows)) if k not in ended_rows]
            keep = torch.arange(kept)
            keep[holes] = torch.tensor(sources, dtype=torch.long)
            rows = rows[keep]
            keep = keep.to(device)
            mask = mask[keep]
            trim = int(mask.any(0).int().argmax()) if mergeable else 0  # leading columns no kept row attends to
            mask = mask[:, trim:]
            holes, sources = (torch.tensor(k, dtype=torch.long, device=device) for k in (holes, sources))
            for layer in cache.layers:
                layer.move_rows(holes, sources, kept, trim) if mergeable else layer.batch_select_indices(keep)
            tokens, next_position = tokens[keep], next_position[keep]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        logits = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=next_position[:, None],
            cache=cache,
            use_cache=True,
        ).logits[:, -1]
        next_position = next_position + 1


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, str]],
    max_new_tokens: int,
    batch_size: int,
    bf16: bool = False,
    max_prompt_length: int = 1024,
    ranks: Ranks = ALONE,
) -> tuple[list[str], int]:
    """Greedy answers, longest prompts first, `batch_size` rows at a time (`greedy_decode`); returns (answers, generated tokens).

    Under torchrun (`ranks`) each rank decodes every world-th prompt of that order and every
    rank gets all answers. A row's tokens do not depend on the rows beside it up to float
    rounding: in fp32 its logits move by at most 5e-5 (SmolLM2-135M, benchmarks/batch_dependence.py),
    so an answer differs from one process's only where a step's top two logits are closer than that.
    """
    model.eval()
    prompts = [prompt_ids(tokenizer, r)[-max_prompt_length:] for r in records]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # memory peaks at once, not late
    # generation is most of a run's evaluation time (minutes on a CPU): show it like training's bar
    progress = tqdm(
        total=len(ranks.share(order)), desc="generating answers", unit="answer", leave=False, disable=not ranks.is_main
    )

    def decode(share: list[int]) -> list[list[int]]:
        with autocast_context(model, bf16):
            return greedy_decode(
                model,
                [prompts[i] for i in share],
                max_new_tokens,
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
                batch_size,
                on_finished=lambda _: progress.update(1),
            )

    rows = ranks.map_shared(decode, order)
    progress.close()
    answers: list[str] = [""] * len(records)
    for i, row in zip(order, rows):
        answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return answers, sum(len(row) for row in rows)

"""Greedy answers: a running batch refilled as rows end, in row groups that each keep a KV cache with room reserved."""

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

# rows_that_fit: a joining prompt starts a row group of its own where its row would count at most this share of the
# group's rows (each counted at its group's longest prompt + answer + room). The first rows of a run, the longest
# prompts, spread widely (the 500 test prompts: 211, 209, 156, ... among the first 64): one group padded to the
# longest holds fewer rows in the budget than tighter groups. Zen 4, 96 rows' budget, 500 answers of a tuned
# SmolLM2-135M, fp32 (benchmarks/bench_decode_batch.py --splits 0,0.9): 266 -> 256 decode steps, 97.1 -> 100.9 rows
# each, padding 16% -> 3% of the positions attended, 1.03x answer tokens/s in both tries, every answer identical.
SPLIT = 0.9

# Where row groups run, the cache budget counts this many times `batch_size` rows of the longest prompt. Zen 4, the
# same 500 answers, every one identical: 64 -> 96 rows 1.09x and 1.10x answer tokens/s (bench_decode_batch.py
# --splits 0,0.9), and the whole protocol run's peak 2.47 -> 2.54 GiB (bench_protocol.sh). Only there: a model
# decoded one group at a time (Gemma 3's sliding layers) keeps `batch_size`, whose answers at 96 rows peaked at
# 5.11 GB against 4.37 at 64 (`oloraplus evaluate --model gemma3-270m`, 500 base-model answers), over the 5 GB
# that the lean-runs issue allows a 262k vocabulary.
GROUPED_ROWS = 1.5


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

    def compact(self) -> None:
        """Copy the cache into a buffer of its own rows and room, if the one behind it also holds rows that ended
        (`move_rows` keeps them until the room runs out): what a refill counts as free is then free."""
        if self.length and self._keys.untyped_storage().nbytes() > self._keys.numel() * self._keys.element_size():
            keys, values = self.keys, self.values
            shape = list(keys.shape)
            shape[-2] = self.length + self.room
            self._keys, self._values = keys.new_empty(shape), values.new_empty(shape)
            self._keys[..., : self.length, :], self._values[..., : self.length, :] = keys, values
            self._hold(self._keys, self._values, self.length)


# The batch size oneDNN packs a weight's layout for (the eval batch): on Zen 3 a packed weight ran decode-sized
# matmuls as fast whether packed for 64 or 256 rows, and outputs are the same bits from 17 rows up.
PACK_ROWS = 64


def onednn_linears_pay() -> str | None:
    """Which Linears answer faster through oneDNN on this CPU: "all", or None (MKL's sgemm for all).

    Only where measured, two AMD CPUs of family 25 (benchmarks/bench_decode_variants.py, every answer identical):
    - Zen 3 (no AVX-512): "all". MKL's sgemm packs the weight on every call: the LM head at 64-256 rows ran at
      56-60 GFLOP/s there, 84-117 in oneDNN on a weight packed once (benchmarks/bench_decode_matmuls.py); the
      base model's answers to 500 test prompts x 128 tokens: 121.6 -> 147.5 answer tokens/s, 500/500 identical;
      with row groups, a tuned model's: 1.13x and 1.17x in two tries, 500/500 identical.
    - Zen 4 (AVX-512): "all" as well. Before the row groups the LM head alone gave the whole gain (193.6 -> 220.7
      answer tokens/s at 128 prompts); with them, a tuned model's 500 answers ran 1.15x and 1.33x faster with every
      Linear than with the head alone, in two interleaved tries, 500/500 identical.
    On Zen 5 the decode matmuls already ran at the fp32 peak; other CPUs are unmeasured: MKL stays there.
    ("head" remains a choice of `linears_in_onednn`, for the benchmarks.)
    """
    info = cpu_info()
    return "all" if info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25" else None


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
    """Greedy continuations of `prompts` (EOS included where emitted), about `batch_size` rows at a time.

    The same tokens as `model.generate(do_sample=False)` on each prompt, with the same
    positions and mask, but a row leaves the batch (and its KV cache) as soon as it
    ends, and once a quarter of the cache budget is free the waiting prompts join:
    generate keeps computing finished rows until a batch's longest answer ends, so most
    of its steps run a nearly empty batch. The prompts that join together form a row
    group with its own KV cache, left-padded to its own longest prompt (`RowGroup`), or
    several where their lengths fall off (`rows_that_fit`, `SPLIT`); every
    group runs through the same decode step, its attention over its own cache
    (`GroupedKeys`). The budget is the cache positions of `batch_size` rows of the longest
    prompt (GROUPED_ROWS times that where row groups run), each row counted at the most it can
    come to hold, so as the waiting prompts get shorter more rows run (up to MAX_ROWS_FACTOR
    times as many). A model whose cache
    layers cannot be split that way (sliding windows) or that cannot run the packed
    attention decodes one group at a time.
    `onednn`: which Linears answer through oneDNN (`linears_in_onednn`; None: where it measured faster).
    """
    with linears_in_onednn(model, onednn):
        return _decode(model, prompts, max_new_tokens, eos_token_id, pad_token_id, batch_size, on_finished)


class RowGroup:
    """Rows that joined the running batch together: their KV cache, left-padded to their longest row, and mask.

    One cache for every running row (what this decoder had until 2026-12-07) is as wide as its longest row, and a
    row that joins it is padded to that width: on the 500 test answers of a trained SmolLM2-135M, 49% of the positions
    the decode steps attended over were padding, and the budget allowed 52.9 rows a step; with row groups 11% and
    71.7, the answers identical (benchmarks/bench_decode_batch.py, Zen 3).
    """

    def __init__(self, cache: DynamicCache, mask: torch.Tensor, reserve: int):
        self.cache, self.mask = cache, mask
        self.reserve = reserve  # cache positions a row may come to hold: its group's longest prompt + answer + room

    def __len__(self) -> int:
        return self.mask.shape[0]

    def keep(self, ended: list[int], trim: bool) -> torch.Tensor:
        """Drop the rows `ended` (indices within the group); returns where each kept row was.

        The group's last running rows move into the ended rows' places, so the cache copies only those,
        and leading positions no kept row attends to go (`trim`).
        """
        kept = len(self) - len(ended)
        ended_rows = set(ended)
        holes = [k for k in ended if k < kept]
        sources = [k for k in range(kept, len(self)) if k not in ended_rows]
        keep = torch.arange(kept)
        keep[holes] = torch.tensor(sources, dtype=torch.long)
        device = self.mask.device
        self.mask = self.mask[keep.to(device)]
        start = int(self.mask.any(0).int().argmax()) if trim else 0
        self.mask = self.mask[:, start:]
        holes_t, sources_t = (torch.tensor(k, dtype=torch.long, device=device) for k in (holes, sources))
        for layer in self.cache.layers:
            if trim:
                layer.move_rows(holes_t, sources_t, kept, start)
            else:
                layer.batch_select_indices(keep.to(device))
        return keep

    def compact(self) -> None:
        """Give back the positions that ended rows still hold (`ReservedLayer.compact`)."""
        for layer in self.cache.layers:
            layer.compact()

    def attention_mask(self) -> torch.Tensor | None:
        """The 4D mask transformers' SDPA path builds for these rows alone at a decode step: none without padding."""
        return None if bool(self.mask.all()) else self.mask.bool()[:, None, None, :]


class GroupedKeys:
    """What a grouped cache layer hands the attention in place of keys: each row group's keys, values and mask.

    packing.packed_sdpa_attention sees `attend` and hands itself in as `attention`: each group's rows of the
    query then go through its unpacked path (transformers' SDPA, the one every decode step takes) over the
    group's own width.
    """

    def __init__(self, parts: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None]]):
        self.parts = parts  # (first row, end row, keys, values, mask)

    def attend(self, module, query: torch.Tensor, attention: Callable, **kwargs) -> tuple[torch.Tensor, None]:
        outputs = [
            attention(module, query[s:e], keys, values, mask, **kwargs)[0] for s, e, keys, values, mask in self.parts
        ]
        return torch.cat(outputs), None


class _GroupedLayer(DynamicLayer):
    """One model layer's view of every group's cache: a decode step's new keys go to each group's rows."""

    def __init__(self, groups: list[RowGroup], masks: list[torch.Tensor | None], index: int):
        super().__init__()
        self.groups, self.masks, self.index = groups, masks, index

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        parts, start = [], 0
        for group, mask in zip(self.groups, self.masks):
            end = start + len(group)
            keys, values = group.cache.layers[self.index].update(key_states[start:end], value_states[start:end])
            parts.append((start, end, keys, values, mask))
            start = end
        return GroupedKeys(parts), None

    def get_seq_length(self) -> int:
        return max(group.cache.layers[self.index].get_seq_length() for group in self.groups)


def grouped_cache(model: PreTrainedModel, groups: list[RowGroup]) -> DynamicCache:
    """A cache for one decode step of every row in `groups`, in their order."""
    cache = DynamicCache(config=model.config)
    masks = [group.attention_mask() for group in groups]
    cache.layers = [_GroupedLayer(groups, masks, i) for i in range(len(groups[0].cache.layers))]
    return cache


def step_row_groups(cache: DynamicCache) -> list[RowGroup]:
    """The row groups a decode step's cache runs side by side (`grouped_cache`); [] for one group's own cache."""
    return list(getattr(cache.layers[0], "groups", [])) if cache.layers else []


def rows_that_fit(
    prompts: list[list[int]], free: int, max_rows: int, extra: int, split: float = 0.0
) -> list[tuple[int, int]]:
    """How many of `prompts` (longest first) join within `free` cache positions, as groups: [(rows, longest prompt)].

    Each row counts at its group's longest prompt + `extra`. A prompt starts a group of its own where its row
    would cost at most `split` of the current group's (0: one group): the first prompts of a run's longest-first
    order spread widely (211 down to 80 tokens on the 500 test prompts), and one group padded to the longest of
    them fits fewer rows in the budget than tighter groups. At least one row (the caller checks it runs alone).
    """
    groups: list[tuple[int, int]] = []
    for prompt in prompts[:max_rows]:
        if groups and len(prompt) + extra > split * (groups[-1][1] + extra):  # joins the last group
            rows, longest = groups[-1]
            trial = groups[:-1] + [(rows + 1, max(longest, len(prompt)))]
        else:
            trial = groups + [(1, len(prompt))]
        if groups and sum(rows * (longest + extra) for rows, longest in trial) > free:
            break
        groups = trial
    return groups


def _decode(
    model: PreTrainedModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    batch_size: int | None,
    on_finished: Callable[[int], None] | None,
) -> list[list[int]]:
    batch_size = batch_size or len(prompts)
    answers: list[list[int]] = [[] for _ in prompts]
    groups: list[RowGroup] = []
    rows = torch.zeros(0, dtype=torch.long)  # which prompt each running row answers, groups in order
    next_position = logits = None
    waiting = 0
    # groups run side by side only where every cache layer can be one group's (sliding layers cannot) and the
    # attention is ours (it runs each group's SDPA); otherwise one group runs to its end before the next
    trimmable = all(isinstance(layer, ReservedLayer) for layer in reserved_cache(model, 0).layers)
    packed = trimmable and can_pack(model, max(len(p) for p in prompts))
    if packed:
        use_packed_attention(model)  # its unpacked path is transformers' SDPA: decode steps are unchanged
    room = min(ROOM, max_new_tokens)
    extra = max_new_tokens + room
    budget_rows = round(batch_size * (GROUPED_ROWS if packed else 1))
    budget = budget_rows * (max(len(p) for p in prompts) + extra)  # cache positions
    max_rows = MAX_ROWS_FACTOR * budget_rows
    while True:
        free = budget - sum(len(group) * group.reserve for group in groups)
        # refill once a quarter of the budget is free: a decode step costs nearly the same at 16 rows as at 64
        if waiting < len(prompts) and (not groups or (packed and free >= budget // 4 and len(rows) < max_rows)):
            joining = rows_that_fit(prompts[waiting:], free, max_rows - len(rows), extra, SPLIT if packed else 0.0)
            if not groups or sum(n * (longest + extra) for n, longest in joining) <= free:
                for group in groups:  # the positions that ended rows still hold go back before new ones are taken
                    group.compact()
                return_freed_memory_when_grown()  # the freed holes the last rows touched, before new ones are made
                for n, longest in joining:
                    start = torch.arange(waiting, waiting + n)
                    waiting += n
                    batch = [prompts[i] for i in start]
                    if packed:
                        cache, mask, new_next, new_logits = _prefill_packed(model, batch, room)
                    else:
                        cache, mask, new_next, new_logits = _prefill_padded(model, batch, room, pad_token_id)
                    groups.append(RowGroup(cache, mask, longest + extra))
                    rows = torch.cat([rows, start])
                    next_position = new_next if next_position is None else torch.cat([next_position, new_next])
                    logits = new_logits if logits is None else torch.cat([logits, new_logits])
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
            keep, kept_groups, offset = [], [], 0
            for group in groups:
                size = len(group)  # before its ended rows go
                mine = [k - offset for k in ended if offset <= k < offset + size]
                if len(mine) < size:
                    keep.append((group.keep(mine, trimmable) if mine else torch.arange(size)) + offset)
                    kept_groups.append(group)
                offset += size
            groups = kept_groups
            keep = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)
            rows = rows[keep]
            keep = keep.to(tokens.device)
            tokens, next_position = tokens[keep], next_position[keep]
            if not groups:
                next_position = logits = None
                continue
        for group in groups:
            group.mask = torch.cat([group.mask, group.mask.new_ones((len(group), 1))], dim=1)
        if len(groups) == 1:  # the model's own mask and cache, as before groups
            inputs = {"attention_mask": groups[0].mask, "cache": groups[0].cache}
        else:  # an empty 4D mask goes through transformers untouched: each group's SDPA gets its own
            empty = torch.ones(1, 1, 0, 0, dtype=torch.bool, device=tokens.device)
            inputs = {"attention_mask": empty, "cache": grouped_cache(model, groups)}
        logits = model(input_ids=tokens[:, None], position_ids=next_position[:, None], use_cache=True, **inputs).logits[
            :, -1
        ]
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

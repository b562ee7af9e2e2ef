"""Greedy generation: the same tokens as transformers' generate, with finished rows dropped and a reserved cache."""

import pytest
import torch
from conftest import build_tiny_llama, count_onednn_calls
from test_packing import _features, _tiny_gemma3
from transformers import GenerationConfig

from oloraplus import generation
from oloraplus.generation import ReservedLayer, _prefill_packed, _prefill_padded, greedy_decode
from oloraplus.packing import use_packed_attention


def test_greedy_decode_equals_generate_also_when_rows_finish_early():
    model = build_tiny_llama(97, seed=3).eval()
    prompts = [t["input_ids"] for t in _features([7, 4, 9, 5], seed=1)]
    free = greedy_decode(model, prompts, 10, eos_token_id=-1, pad_token_id=2)  # -1: nothing stops
    eos = free[1][2]  # the token the second row emits third: that row (at least) now stops early
    ours = greedy_decode(model, prompts, 10, eos_token_id=eos, pad_token_id=2)
    assert any(len(row) < 10 for row in ours)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=2, eos_token_id=eos)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:].tolist()
    for row, ref in zip(ours, out):
        cut = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert row == cut


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch build without oneDNN")
@pytest.mark.parametrize("which", ["head", "all"])
def test_linears_in_onednn_give_generates_tokens_and_are_put_back(monkeypatch, which):
    """Forced on (whatever this CPU's rule): the Linears run through oneDNN, the answers are generate's, and each
    module gets its own forward and the very same weight back (dropped while answering); bf16 keeps it off."""
    model = build_tiny_llama(97, seed=3).eval()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights = [m.weight.detach().clone() for m in linears]
    prompts = [t["input_ids"] for t in _features([7, 4, 9, 5], seed=1)]
    calls = count_onednn_calls(monkeypatch)
    eos = greedy_decode(model, prompts, 8, eos_token_id=-1, pad_token_id=2, onednn="none")[0][2]
    assert calls == []
    ours = greedy_decode(model, prompts, 8, eos_token_id=eos, pad_token_id=2, batch_size=2, onednn=which)
    head = model.get_output_embeddings()
    assert {id(m) for m in calls} == ({id(head)} if which == "head" else {id(m) for m in linears})
    assert all("forward" not in vars(m) for m in linears)
    assert all(torch.equal(m.weight, w) for m, w in zip(linears, weights))
    assert ours == [_generate_one(model, p, 8, eos) for p in prompts]
    calls.clear()
    model.to(torch.bfloat16)
    greedy_decode(model, prompts[:1], 2, eos_token_id=-1, pad_token_id=2, onednn=which)
    assert calls == []


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch build without oneDNN")
def test_linears_in_onednn_drop_dense_weights_while_answering_but_keep_a_tied_heads():
    """Memory stays flat: each untied Linear answers from its packed copy alone; the embedding keeps its table."""
    model = build_tiny_llama(97, seed=3).eval()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's
    before = model.model.embed_tokens.weight.detach().clone()
    with generation.linears_in_onednn(model, "all"):
        assert model.model.layers[0].mlp.up_proj.weight.numel() == 0
        assert torch.equal(model.lm_head.weight, before) and torch.equal(model.model.embed_tokens.weight, before)
    assert model.model.layers[0].mlp.up_proj.weight.numel() > 0


def test_onednn_is_the_default_only_on_the_cpus_it_was_measured_faster_on(monkeypatch):
    """Zen 3 and Zen 4: every Linear (bench_decode_variants.py, the same answers); others keep MKL."""
    for vendor, family, flags, chosen in (
        ("AuthenticAMD", "25", "avx2 avx512f avx512_bf16", "all"),  # Zen 4
        ("AuthenticAMD", "25", "avx2 fma", "all"),  # Zen 3
        ("AuthenticAMD", "26", "avx2 avx512f avx512_bf16", None),  # Zen 5
        ("GenuineIntel", "6", "avx512f avx512_bf16 amx_bf16", None),  # Sapphire Rapids
        ("GenuineIntel", "6", "avx2 fma", None),  # an AVX2-only Intel CPU
    ):
        info = {"vendor_id": vendor, "cpu family": family, "flags": flags}
        monkeypatch.setattr(generation, "cpu_info", lambda info=info: info)
        assert generation.onednn_linears_pay() == chosen, (vendor, family, flags)


def _generate_one(model, prompt, max_new_tokens, eos):
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2, eos_token_id=eos)
    out = model.generate(input_ids=torch.tensor([prompt]), generation_config=config)[0, len(prompt) :].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


@pytest.mark.parametrize("room", [32, 3], ids=["room-for-all", "cache-regrows"])
@pytest.mark.parametrize("shared", [0, 3], ids=["distinct", "shared-prefix"])
def test_refilled_batch_gives_each_prompt_what_generate_gives_it_alone(shared, room, monkeypatch):
    """Prompts prefilled packed (their shared prefix once) then decoded in a refilled batch: generate's tokens."""
    monkeypatch.setattr(generation, "ROOM", room)  # 3: every cache outgrows its room several times
    model = build_tiny_llama(97, seed=3).eval()
    prompts = [t["input_ids"] for t in _features([9, 4, 12, 5, 7, 4, 10], seed=2, shared=shared)]
    assert len({tuple(p[:shared]) for p in prompts}) == 1
    free = greedy_decode(model, prompts, 12, eos_token_id=-1, pad_token_id=2)
    eos = free[1][1]  # rows end at different steps, so prompts join a batch that is part-way through
    finished = []
    ours = greedy_decode(
        model, prompts, 12, eos_token_id=eos, pad_token_id=2, batch_size=3, on_finished=finished.append
    )
    assert sorted(finished) == list(range(len(prompts))) and finished != sorted(finished)
    assert len({len(row) for row in ours}) > 1
    assert ours == [_generate_one(model, p, 12, eos) for p in prompts]


def test_packed_prefill_lays_out_the_cache_a_padded_prefill_does():
    model = build_tiny_llama(97, seed=3).eval()
    prompts = [t["input_ids"] for t in _features([9, 5, 7], seed=4, shared=3)]
    with torch.no_grad():
        padded = _prefill_padded(model, prompts, 4, pad_token_id=2)
        use_packed_attention(model)
        packed = _prefill_packed(model, prompts, 4)
    for a, b in zip(padded[0].layers, packed[0].layers):
        live = padded[1].bool()[:, None, :, None]  # padding slots hold nothing anyone attends to
        torch.testing.assert_close(b.keys * live, a.keys * live, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.values * live, a.values * live, rtol=1e-5, atol=1e-6)
    assert torch.equal(padded[1], packed[1]) and torch.equal(padded[2], packed[2])
    torch.testing.assert_close(packed[3], padded[3], rtol=1e-5, atol=1e-5)


def test_selected_rows_keep_their_cache_and_the_padding_no_kept_row_needs_goes():
    layer = ReservedLayer(room=4)
    keys = torch.randn(3, 1, 5, 3)
    keys[2, :, :2] = 0  # the third row's left padding
    layer.update(keys, -keys)
    layer.batch_select_indices(torch.tensor([2]), start=2)  # only the short row stays: its padding goes
    assert torch.equal(layer.keys, keys[2:, :, 2:]) and torch.equal(layer.values, -keys[2:, :, 2:])
    step = torch.randn(1, 1, 1, 3)
    assert torch.equal(layer.update(step, step)[0], torch.cat([keys[2:, :, 2:], step], dim=-2))


def test_reserved_layer_holds_what_concatenation_holds_also_past_its_room():
    layer, keys, values = ReservedLayer(room=2), [], []
    for width in [3, 1, 1, 1, 2, 1]:  # the fourth token outgrows the room of 2
        k, v = torch.randn(4, 2, width, 8), torch.randn(4, 2, width, 8)
        keys.append(k)
        values.append(v)
        got_k, got_v = layer.update(k, v)
        assert torch.equal(got_k, torch.cat(keys, dim=-2)) and torch.equal(got_v, torch.cat(values, dim=-2))
        assert layer.get_seq_length() == sum(x.shape[-2] for x in keys)
    layer.batch_select_indices(torch.tensor([3, 1]))
    assert torch.equal(layer.keys, torch.cat(keys, dim=-2)[[3, 1]])
    k = torch.randn(2, 2, 1, 8)
    assert torch.equal(layer.update(k, k)[0][:, :, -1:], k)


def test_moved_rows_keep_their_cache_and_the_padding_no_row_needs_goes():
    layer = ReservedLayer(room=3)
    keys = torch.randn(4, 2, 5, 8)
    layer.update(keys, -keys)
    layer.move_rows(torch.tensor([1]), torch.tensor([3]), rows=2, start=2)  # rows 1 and 2 ended; 3 takes 1's place
    assert torch.equal(layer.keys, keys[[0, 3], :, 2:]) and torch.equal(layer.values, -keys[[0, 3], :, 2:])
    step = torch.randn(2, 2, 1, 8)
    assert torch.equal(layer.update(step, step)[0], torch.cat([keys[[0, 3], :, 2:], step], dim=-2))
    for _ in range(3):  # past the room: the cache regrows from the kept rows alone
        layer.update(step, step)
    assert layer.keys.shape == (2, 2, 7, 8) and torch.equal(layer.keys[:, :, :3], keys[[0, 3], :, 2:])


def _held_positions(cache) -> tuple[int, int]:
    """(cache positions held, row groups) of a decode step's cache: one group's, or every group's of a grouped one."""
    caches = [g.cache for g in generation.step_row_groups(cache)] or [cache]
    return sum(c.layers[0].keys.shape[0] * c.layers[0].keys.shape[-2] for c in caches), len(caches)


def test_the_running_batch_grows_past_batch_size_as_prompts_shorten_within_the_first_batchs_cache():
    """One long prompt, then short ones: once it ends, more rows run, in groups side by side, never more positions."""
    model = build_tiny_llama(97, seed=3).eval()
    prompts = [t["input_ids"] for t in _features([30, 4, 5, 4, 6, 4, 5, 4, 4, 5], seed=5)]
    batch_size, max_new = 2, 6
    room = min(generation.ROOM, max_new)
    budget = round(batch_size * generation.GROUPED_ROWS) * (30 + max_new + room)  # row groups' budget
    seen = []
    hook = model.register_forward_hook(
        lambda _, args, kwargs, out: seen.append((kwargs["input_ids"].shape, _held_positions(kwargs["cache"]))),
        with_kwargs=True,
    )
    free = greedy_decode(model, prompts, max_new, eos_token_id=-1, pad_token_id=2)
    eos = free[3][2]
    seen.clear()
    ours = greedy_decode(model, prompts, max_new, eos_token_id=eos, pad_token_id=2, batch_size=batch_size)
    hook.remove()
    steps = [(shape[0], held, groups) for shape, (held, groups) in seen if shape[1] == 1]
    assert max(rows for rows, _, _ in steps) > batch_size
    assert max(groups for _, _, groups in steps) > 1  # rows that joined later ran beside the earlier ones
    # the cache holds what was written and the room reserved past it: at most `room` more than the budget counts
    assert max(held for _, held, _ in steps) <= budget
    assert ours == [_generate_one(model, p, max_new, eos) for p in prompts]


@pytest.mark.parametrize("lengths", [[9, 5, 7], [6, 6]], ids=["padded", "unpadded"])
def test_a_row_groups_mask_is_the_one_transformers_builds_for_its_rows_alone(lengths):
    """Each group's SDPA gets what the model's own mask code gives a decode step of those rows: none unpadded."""
    model = build_tiny_llama(97, seed=3).eval()
    use_packed_attention(model)
    prompts = [t["input_ids"] for t in _features(lengths, seed=4)]
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True
    )
    with torch.no_grad():
        cache, mask, next_position, logits = _prefill_packed(model, prompts, 4)
        mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
        seen.clear()
        tokens = logits.argmax(-1)[:, None]
        model(input_ids=tokens, attention_mask=mask, position_ids=next_position[:, None], cache=cache, use_cache=True)
    hook.remove()
    ours = generation.RowGroup(cache, mask, 0).attention_mask()
    assert (ours is None) == (seen[0] is None) == (len(set(lengths)) == 1)
    assert ours is None or torch.equal(ours, seen[0])


def test_a_sliding_window_model_takes_larger_batches_of_shorter_prompts_and_keeps_generates_tokens():
    """Sliding layers cannot take rows mid-batch, so each batch runs to its end; a later one may be larger."""
    model = _tiny_gemma3(97).eval()
    prompts = [t["input_ids"] for t in _features([30, 28, 4, 5, 4, 6, 4, 5], seed=6)]
    seen = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    eos = greedy_decode(model, prompts, 6, eos_token_id=-1, pad_token_id=2)[2][1]
    seen.clear()
    ours = greedy_decode(model, prompts, 6, eos_token_id=eos, pad_token_id=2, batch_size=2)
    hook.remove()
    assert seen[0] == 2  # batch_size rows of the longest prompts: no row groups, so not GROUPED_ROWS times that
    assert max(seen) > 2
    assert ours == [_generate_one(model, p, 6, eos) for p in prompts]


def test_compacting_a_cache_frees_the_rows_that_ended_and_keeps_the_rest():
    layer = ReservedLayer(room=3)
    keys = torch.randn(4, 2, 5, 8)
    layer.update(keys, -keys)
    layer.move_rows(torch.tensor([1]), torch.tensor([3]), rows=2, start=2)
    assert layer.keys.untyped_storage().nbytes() == keys.nbytes * 8 // 5  # 4 rows x (5 + 3) positions still held
    layer.compact()
    assert layer.keys.untyped_storage().nbytes() == keys.nbytes // 4 * 2 * 6 // 5  # 2 rows x (3 + 3)
    assert torch.equal(layer.keys, keys[[0, 3], :, 2:]) and torch.equal(layer.values, -keys[[0, 3], :, 2:])
    step = torch.randn(2, 2, 1, 8)
    assert torch.equal(layer.update(step, step)[0], torch.cat([keys[[0, 3], :, 2:], step], dim=-2))
    held = layer.keys.untyped_storage()
    layer.compact()  # nothing ended since: no copy
    assert layer.keys.untyped_storage().data_ptr() == held.data_ptr()


def test_every_decode_steps_attention_goes_through_the_packed_attentions_sdpa_grouped_or_not(monkeypatch):
    """One path for decode-step attention: packing.sdpa_attention_forward once per layer and group, so a
    benchmark that swaps it (bench_decode_variants.py) times what it names in grouped steps too."""
    from oloraplus import packing

    model = build_tiny_llama(97, seed=3).eval()
    prompts = [t["input_ids"] for t in _features([30, 4, 5, 4, 6, 4, 5, 4, 4, 5], seed=5)]
    eos = greedy_decode(model, prompts, 6, eos_token_id=-1, pad_token_id=2)[3][2]
    calls, groups = [], []
    real = packing.sdpa_attention_forward
    monkeypatch.setattr(
        packing, "sdpa_attention_forward", lambda m, q, *a, **k: calls.append(q.shape[2]) or real(m, q, *a, **k)
    )
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: (
            kwargs["input_ids"].shape[1] == 1 and groups.append(_held_positions(kwargs["cache"])[1])
        ),
        with_kwargs=True,
    )
    greedy_decode(model, prompts, 6, eos_token_id=eos, pad_token_id=2, batch_size=2)
    hook.remove()
    assert max(groups) > 1
    assert calls.count(1) == model.config.num_hidden_layers * sum(groups)


def test_rows_that_fit_count_each_row_at_its_groups_longest_prompt_and_split_where_rows_get_much_shorter():
    prompts = [[0] * n for n in (20, 19, 8, 7, 7, 6, 6, 6)]
    # one group: every row counts its longest prompt (20) + extra (10); 130 free positions hold 4 rows
    assert generation.rows_that_fit(prompts, 130, 8, 10) == [(4, 20)]
    # 8 + 10 <= 0.8 x (20 + 10) starts a group of its own; 7 + 10 > 0.8 x (8 + 10) joins it: 2 x 30 + 3 x 18 <= 130
    assert generation.rows_that_fit(prompts, 130, 8, 10, split=0.8) == [(2, 20), (3, 8)]
    assert generation.rows_that_fit(prompts, 130, 3, 10, split=0.8) == [(2, 20), (1, 8)]  # at most max_rows
    assert generation.rows_that_fit(prompts, 5, 8, 10, split=0.8) == [(1, 20)]  # one row even past `free`
    assert generation.rows_that_fit([[0] * 5, [0] * 9], 100, 8, 10) == [(2, 9)]  # a longer prompt widens its group


def test_the_first_rows_split_into_groups_by_length_so_more_run_within_the_same_cache_budget(monkeypatch):
    """One long prompt among short ones: the short ones start a group of their own and more rows fit the budget
    from the first step, never more cache positions; with no split the first step runs the budget's rows."""
    model = build_tiny_llama(97, seed=3).eval()
    prompts = [t["input_ids"] for t in _features([30, 4, 5, 4, 6, 4, 5, 4, 4, 5], seed=5)]
    batch_size, max_new = 2, 6
    budget_rows = round(batch_size * generation.GROUPED_ROWS)  # 3: where row groups run
    budget = budget_rows * (30 + max_new + min(generation.ROOM, max_new))
    eos = greedy_decode(model, prompts, max_new, eos_token_id=-1, pad_token_id=2)[3][2]
    first_steps = {}
    for split in (0.0, 0.85):
        monkeypatch.setattr(generation, "SPLIT", split)
        seen = []
        hook = model.register_forward_hook(
            lambda _, args, kwargs, out, seen=seen: seen.append(
                (kwargs["input_ids"].shape, _held_positions(kwargs["cache"]))
            ),
            with_kwargs=True,
        )
        ours = greedy_decode(model, prompts, max_new, eos_token_id=eos, pad_token_id=2, batch_size=batch_size)
        hook.remove()
        steps = [(shape[0], held, groups) for shape, (held, groups) in seen if shape[1] == 1]
        first_steps[split] = steps[0]
        assert max(held for _, held, _ in steps) <= budget
        assert ours == [_generate_one(model, p, max_new, eos) for p in prompts]
    assert first_steps[0.0][0] == budget_rows and first_steps[0.0][2] == 1
    assert first_steps[0.85][0] > budget_rows and first_steps[0.85][2] > 1

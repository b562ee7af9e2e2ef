"""Packed batches: the same tokens, losses, gradients and greedy answers as padded ones, in bounded packs."""

import json

import pytest
import torch
from conftest import build_tiny_llama

from oloraplus.cli import main
from oloraplus.data import IGNORE_INDEX, PadCollator
from oloraplus.loss import batch_token_losses
from oloraplus.packing import PACKED_ATTENTION, can_pack, pack, shared_prefix_length, split_packed, use_packed_attention


def _features(lengths, prompt=3, seed=0, shared=0):
    """Random examples whose first `prompt` tokens are unlabelled and first `shared` tokens the same in all."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randint(3, 97, (shared,), generator=g).tolist()
    out = []
    for n in lengths:
        ids = common[:n] + torch.randint(3, 97, (max(0, n - shared),), generator=g).tolist()
        p = min(prompt, n - 1)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return out


def test_pack_restarts_positions_and_masks_the_first_label_of_each_example():
    feats = _features([5, 3, 4], prompt=0)  # no prompt: only the boundary mask keeps targets inside examples
    b = pack(feats)
    assert b["input_ids"][0].tolist() == [t for f in feats for t in f["input_ids"]]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]
    assert b["cu_seq_lens_q"].tolist() == [0, 5, 8, 12] and b["max_length_q"] == 5
    assert [i for i, t in enumerate(b["labels"][0].tolist()) if t == IGNORE_INDEX] == [0, 5, 8]


def test_shared_prefix_stops_before_the_first_target_and_leaves_each_example_a_token():
    assert shared_prefix_length(_features([9, 8, 10], prompt=6, shared=4)) == 4
    # a target at index 3: the token before it (index 2) must stay in each example, so 2 are shared
    assert shared_prefix_length(_features([9, 8, 10], prompt=3, shared=6)) == 2
    short = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3},
        {"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX] * 4},
    ]
    assert shared_prefix_length(short) == 2  # the 3-token example keeps one token of its own
    assert shared_prefix_length(_features([9], prompt=6, shared=4)) == 0  # one example: nothing to share
    differ = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3},
        {"input_ids": [4, 6, 7], "labels": [IGNORE_INDEX] * 3},
    ]
    assert shared_prefix_length(differ) == 0  # the first tokens differ


def test_pack_holds_a_shared_prefix_once_and_counts_it_for_every_example():
    feats = _features([9, 7, 8], prompt=6, shared=4)
    b = pack(feats)
    prefix = feats[0]["input_ids"][:4]
    assert b["shared_prefix_length"] == 4
    assert b["input_ids"][0].tolist() == prefix + [t for f in feats for t in f["input_ids"][4:]]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3] + [4, 5, 6, 7, 8] + [4, 5, 6] + [4, 5, 6, 7]
    assert b["cu_seq_lens_q"].tolist() == [0, 4, 9, 12, 16] and b["max_length_q"] == 9
    kept = [t for t in b["labels"][0].tolist() if t != IGNORE_INDEX]
    assert kept == [t for f in feats for t in f["labels"] if t != IGNORE_INDEX]  # every target, none added
    assert int(b["attention_mask"].sum()) == sum(len(f["input_ids"]) for f in feats)  # Trainer's real tokens
    assert pack(feats, share_prefix=False)["input_ids"].shape[1] == 24


@pytest.mark.parametrize("shared", [0, 5])
@pytest.mark.parametrize("max_tokens", [0, 1, 7, 9, 12, 100])
def test_split_packs_repeat_the_shared_prefix_and_keep_every_example(max_tokens, shared):
    feats = _features([5, 3, 4, 6, 2] if not shared else [9, 7, 8, 10, 7], prompt=6, shared=shared)
    batch = pack(feats)
    n = batch["shared_prefix_length"]
    assert n == min(shared, 5)
    packs = split_packed(batch, max_tokens)
    for key in ("input_ids", "labels", "position_ids"):
        own = torch.cat([p[key][:, n:] for p in packs], dim=1)
        assert torch.equal(own, batch[key][:, n:])  # each example once, in order
        assert all(torch.equal(p[key][:, :n], batch[key][:, :n]) for p in packs)  # the prefix in every pack
    assert sum(int(p["attention_mask"].sum()) for p in packs) == int(batch["attention_mask"].sum())
    for p in packs:
        lengths = (p["cu_seq_lens_q"][1:] - p["cu_seq_lens_q"][:-1]).tolist()
        assert p["cu_seq_lens_q"][0] == 0 and sum(lengths) == p["input_ids"].shape[1]
        examples = len(lengths) - (1 if n else 0)
        assert p["input_ids"].shape[1] <= max_tokens or examples == 1 or max_tokens <= 0
        assert p["max_length_q"] == n + max(lengths[1 if n else 0 :])
    if max_tokens <= 0 or max_tokens >= 40:
        assert len(packs) == 1


@pytest.mark.parametrize("max_tokens", [0, 1, 7, 9, 12, 100])
def test_split_packed_cuts_at_example_boundaries_and_keeps_every_token(max_tokens):
    feats = _features([5, 3, 4, 6, 2])
    batch = pack(feats)
    packs = split_packed(batch, max_tokens)
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(torch.cat([p[key] for p in packs], dim=1), batch[key])
    for p in packs:
        lengths = (p["cu_seq_lens_q"][1:] - p["cu_seq_lens_q"][:-1]).tolist()
        assert p["cu_seq_lens_q"][0] == 0 and sum(lengths) == p["input_ids"].shape[1]
        assert p["input_ids"].shape[1] <= max_tokens or len(lengths) == 1 or max_tokens <= 0
        assert p["max_length_q"] == max(lengths)
    if max_tokens <= 0 or max_tokens >= 20:
        assert len(packs) == 1


def _tiny_gemma3(vocab: int):
    """Gemma 3's attention (embedding scale, QK norms, a sliding layer beside a full one) at a window wider than
    the examples, as gemma3-270m's 512 against max_length 512: can_pack lets it pack."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=2,
    )
    return Gemma3ForCausalLM(config).float()


def _tiny_lora(build=build_tiny_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build(97), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


@pytest.mark.parametrize("shared", [0, 5], ids=["no-prefix", "shared-prefix"])
@pytest.mark.parametrize("build", [build_tiny_llama, _tiny_gemma3], ids=["llama", "gemma3"])
def test_packed_loss_and_gradients_equal_the_padded_batch(build, shared, monkeypatch):
    from transformers.masking_utils import AttentionMaskInterface

    model = _tiny_lora(build)
    assert can_pack(model, 64)
    feats = _features([13, 9, 8, 11], prompt=7 if shared else 3, shared=shared)
    assert pack(feats)["shared_prefix_length"] == shared
    padded = PadCollator(pad_token_id=2)(feats)
    loss, _ = batch_token_losses(model, padded)
    loss.sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    use_packed_attention(model)
    # no [tokens x tokens] mask is built for a packed row (the attention reads its boundaries)
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, PACKED_ATTENTION, lambda **_: pytest.fail("mask"))
    total = 0.0
    for part in split_packed(pack(feats), 20):  # three packs, summed as the trainer does
        part_loss, _ = batch_token_losses(model, part)
        part_loss.sum().backward()
        total += part_loss.sum().item()
    assert total == pytest.approx(float(loss.sum()), rel=1e-5)
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_training_reproduces_padded_training(tiny_model_dir, small_data, tmp_path):
    """Same config, packing on or off (dropout 0, so both see the same computation): same run to 1e-4."""
    base = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(small_data),
        "--n_train",
        "24",
        "--n_test",
        "6",
        "--batch_size",
        "8",
        "--max_new_tokens",
        "8",
        "--dropout",
        "0",
        "--method",
        "olora+",
        "--lr_ratio",
        "4",
        "--lr",
        "1e-3",
        "--logging_steps",
        "1",
        "--precision",
        "fp32",
    ]
    runs = {}
    for packing, micro in (("false", "0"), ("true", "64")):  # 64 tokens: every batch trains as several packs
        out = tmp_path / f"packing-{packing}"
        assert main([*base, "--packing", packing, "--micro_batch_tokens", micro, "--output_dir", str(out)]) == 0
        history = json.loads((out / "history.json").read_text())
        preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        runs[packing] = (
            json.loads((out / "metrics.json").read_text()),
            [h["loss"] for h in history if "loss" in h],
            preds,
        )
    (m0, losses0, p0), (m1, losses1, p1) = runs["false"], runs["true"]
    assert len(losses0) == 3 and losses1 == pytest.approx(losses0, rel=1e-4)
    assert m1["eval_loss"] == pytest.approx(m0["eval_loss"], rel=1e-4)
    assert [p["prediction"] for p in p1] == [p["prediction"] for p in p0]
    assert m1["train_tokens"] == m0["train_tokens"]  # every real token counted once, with or without padding


def test_packing_is_used_only_where_it_computes_the_models_own_attention():
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    from oloraplus.packing import can_pack

    assert can_pack(build_tiny_llama(97), 512)
    assert not can_pack(GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2)), 512)
    small = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    assert can_pack(MistralForCausalLM(MistralConfig(**small, sliding_window=4096)), 512)
    assert not can_pack(MistralForCausalLM(MistralConfig(**small, sliding_window=256)), 512)

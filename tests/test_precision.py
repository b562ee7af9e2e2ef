"""bf16 runs store the frozen matmul weights in bf16 once: the same bits as autocast casting them on every call.

Autocast on a CPU without native bf16 is slow but exact, so these run on either CPU kind.
"""

import copy
import os

import datasets
import pytest
import torch
from conftest import build_tiny_llama, build_tokenizer
from transformers import TrainingArguments

from oloraplus import adapters, precision
from oloraplus.data import tokenize_example
from oloraplus.errors import OLoRAPlusError
from oloraplus.evaluate import example_losses, ready_to_evaluate
from oloraplus.generation import generate_answers
from oloraplus.loss import batch_token_losses
from oloraplus.packing import PackCollator, use_packed_attention
from oloraplus.precision import autocast_context, store_frozen_weights_bf16
from oloraplus.train import OLoRAPlusTrainer

RECS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well and sleep."},
    {"instruction": "Translate", "input": "bonjour tout le monde, comment allez vous", "output": "hello everyone"},
    {"instruction": "Why?", "input": "", "output": "Because the sky is blue and the sea is wide."},
]


def _tied_llama(vocab: int):
    """The tiny Llama with its head tied to the input embedding, as SmolLM2's and Gemma 3's are."""
    model = build_tiny_llama(vocab, seed=3)
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _trained_side(model, batch):
    """Packed-batch loss under bf16 autocast, and the adapter's gradients from it."""
    with autocast_context(model, True):
        losses, _ = batch_token_losses(model, batch)
    losses.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses.detach(), grads


def test_training_with_bf16_stored_frozen_weights_gives_the_same_loss_and_gradients():
    tok = build_tokenizer()
    model = adapters.attach_adapter(_tied_llama(len(tok)), "olora", 4, 8.0, 0.0, None)
    use_packed_attention(model)
    batch = PackCollator()([tokenize_example(tok, r, 256) for r in RECS])
    stored = copy.deepcopy(model)
    n = store_frozen_weights_bf16(stored)

    base = stored.get_base_model()
    assert n == 2 * 7 + 1  # every base Linear of both layers (q k v o gate up down) and the head
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert base.model.embed_tokens.weight.dtype == torch.float32  # the lookup autocast leaves in fp32
    assert base.lm_head.weight.dtype == torch.bfloat16 and base.lm_head.weight is not base.model.embed_tokens.weight
    assert all(p.dtype == torch.float32 for p in stored.parameters() if p.requires_grad)  # adapter: fp32 masters

    plain_losses, plain_grads = _trained_side(model, batch)
    losses, grads = _trained_side(stored, batch)
    assert torch.equal(losses, plain_losses)
    assert grads.keys() == plain_grads.keys() and all(torch.equal(grads[k], plain_grads[k]) for k in grads)


def test_evaluating_with_bf16_stored_weights_gives_the_same_losses_logits_and_answers():
    tok = build_tokenizer()
    model = _tied_llama(len(tok)).requires_grad_(False)
    stored = ready_to_evaluate(copy.deepcopy(model), bf16=True)
    assert stored.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16

    ids = torch.tensor([tokenize_example(tok, RECS[1], 256)["input_ids"]])
    with autocast_context(model, True):
        assert torch.equal(stored(input_ids=ids).logits, model(input_ids=ids).logits)
    assert example_losses(stored, tok, RECS, 256, 2, bf16=True) == example_losses(model, tok, RECS, 256, 2, bf16=True)
    assert generate_answers(stored, tok, RECS, 12, 3, bf16=True) == generate_answers(model, tok, RECS, 12, 3, bf16=True)


def test_fp32_evaluation_keeps_fp32_weights():
    model = ready_to_evaluate(build_tiny_llama(97), bf16=False)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())


def test_a_bf16_run_trains_its_matmuls_in_bf16(tmp_path):
    """The head-only loss path calls the decoder itself, past accelerate's autocast of model.forward: bf16 must
    still reach every base matmul of a training step (it once trained in fp32 while the run said bf16)."""
    tok = build_tokenizer()
    model = adapters.attach_adapter(_tied_llama(len(tok)), "olora", 4, 8.0, 0.0, None)
    use_packed_attention(model)
    seen = []
    layer = model.get_base_model().model.layers[0].mlp.down_proj.base_layer
    layer.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, bf16=True, report_to=[], per_device_train_batch_size=3, max_steps=1
    )
    examples = [tokenize_example(tok, r, 256) for r in RECS]
    trainer = OLoRAPlusTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(examples), data_collator=PackCollator()
    )
    trainer.train()
    assert seen and set(seen) == {torch.bfloat16}


def test_bf16_autocast_keeps_the_packed_attention_in_fp32_on_a_cpu(monkeypatch):
    """The CPU flash attention's backward is slower in bf16 than in fp32 (docs/benchmarks.md): under bf16 autocast the
    packed attention of training and test loss must still compute in fp32, while the matmuls around it run in bf16."""
    tok = build_tokenizer()
    model = adapters.attach_adapter(_tied_llama(len(tok)), "olora", 4, 8.0, 0.0, None)
    use_packed_attention(model)
    sdpa, seen = torch.nn.functional.scaled_dot_product_attention, []

    def recording_sdpa(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    batch = PackCollator()([tokenize_example(tok, r, 256) for r in RECS])
    losses, grads = _trained_side(model, batch)
    assert seen and set(seen) == {torch.float32}
    assert torch.isfinite(losses).all() and all(torch.isfinite(g).all() for g in grads.values())


def _cpu(monkeypatch, native: bool, flags: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "bf16_supported", lambda: native)
    monkeypatch.setattr(precision, "cpu_info", lambda: {"flags": flags})


def test_auto_trains_in_bf16_only_on_a_cpu_with_avx512_bf16_and_no_amx(monkeypatch):
    """Measured (docs/benchmarks.md "bf16 on a CPU"): 1.84x fp32 on Zen 5 and 1.54x on Zen 4 (AVX512_BF16,
    no AMX); slower than fp32 on the Intel AMX CPU; hundreds of times slower without native bf16."""
    for native, flags, chosen in (
        (False, "avx2 fma", False),
        (True, "avx2 avx512f avx512_bf16", True),
        (True, "avx512f avx512_bf16 amx_bf16 amx_tile", False),
    ):
        _cpu(monkeypatch, native, flags)
        bf16, why = precision.resolve_precision("auto")
        assert bf16 is chosen and why.startswith("auto:"), flags
    assert precision.resolve_precision("fp32") == (False, "fp32 requested")


def test_auto_evaluates_in_fp32_on_a_cpu_even_after_bf16_training(monkeypatch):
    """bf16 answers scored lower on BLEU/ROUGE-1 than fp32 ones of the same kind of run; bf16-trained adapters
    answered in fp32 scored as fp32-trained ones (docs/results/ablation-precision)."""
    _cpu(monkeypatch, True, "avx512f avx512_bf16")
    assert precision.resolve_eval_precision("auto", train_bf16=True)[0] is False
    assert precision.resolve_eval_precision("bf16", train_bf16=False) == (True, "bf16 requested")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU evaluates as it trained
    assert precision.resolve_eval_precision("auto", train_bf16=True)[0] is True
    assert precision.resolve_eval_precision("auto", train_bf16=False)[0] is False


def test_bf16_where_there_is_none_is_refused_naming_the_setting(monkeypatch):
    _cpu(monkeypatch, False, "avx2")
    for resolve, name in (
        (precision.resolve_precision, "precision"),
        (precision.resolve_eval_precision, "eval_precision"),
    ):
        args = ("bf16",) if name == "precision" else ("bf16", False)
        with pytest.raises(OLoRAPlusError, match=f"^{name} bf16 is not supported"):
            resolve(*args)


def test_the_primitive_caches_are_capped_unless_the_user_set_them(monkeypatch):
    """bf16 packs of ever-new shapes filled oneDNN's and ideep's default 1,024-primitive caches (+1.9 GB and +0.4 GiB
    over a run): the run caps both before its first matmul, and a capacity the user chose is kept."""
    caps = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": precision.ONEDNN_CACHE_CAPACITY, "LRU_CACHE_CAPACITY": 16}
    for name in caps:
        monkeypatch.delenv(name, raising=False)
    precision.lean_process()
    assert {name: os.environ[name] for name in caps} == {name: str(cap) for name, cap in caps.items()}
    for name in caps:
        monkeypatch.setenv(name, "1024")
    precision.lean_process()
    assert all(os.environ[name] == "1024" for name in caps)

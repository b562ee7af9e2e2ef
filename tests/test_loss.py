"""Response-only loss: the LM head sees only labelled positions, yet loss and gradients equal the model's own."""

import pytest
import torch
from conftest import build_tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from oloraplus import loss as loss_module
from oloraplus.data import IGNORE_INDEX, PadCollator
from oloraplus.loss import head_token_losses, response_token_losses
from oloraplus.models import decoder_and_head
from oloraplus.train import OLoRAPlusTrainer


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    """Three right-padded examples of different lengths whose first tokens are prompt (label -100)."""
    g = torch.Generator().manual_seed(0)
    features = []
    for n, prompt in ((13, 5), (9, 4), (6, 2)):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        features.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return PadCollator(pad_token_id=2)(features)


def _lora_llama():
    model = get_peft_model(
        build_tiny_llama(97), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    )
    for name, p in model.named_parameters():  # B = 0 would leave A without gradient: give both a value
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_head_runs_only_on_labelled_positions_with_the_same_loss_and_gradients(monkeypatch):
    model = _lora_llama()
    batch = _batch(97)
    n_labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    rows = []
    head_losses = loss_module.head_token_losses
    monkeypatch.setattr(
        loss_module, "head_token_losses", lambda head, h, t: rows.append(h.shape[0]) or head_losses(head, h, t)
    )

    model(**batch).loss.backward()
    expected, expected_grads = model(**batch).loss.detach(), _lora_grads(model)
    model.zero_grad()
    token_loss, mask = response_token_losses(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    token_loss.mean().backward()

    assert rows == [n_labelled] and n_labelled < batch["input_ids"].numel()
    assert int(mask.sum()) == n_labelled and token_loss.shape == (n_labelled,)
    assert token_loss.mean().item() == pytest.approx(expected.item(), rel=1e-5)
    got = _lora_grads(model)
    assert got.keys() == expected_grads.keys() and got
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_unknown_family_falls_back_to_the_models_own_forward():
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    ).eval()  # no dropout
    batch = _batch(97)
    assert decoder_and_head(model) is None
    token_loss, _ = response_token_losses(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert token_loss.mean().item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)


@pytest.mark.parametrize("num_items", [None, 40])
def test_trainer_loss_equals_the_stock_trainer_loss(tmp_path, num_items):
    model = _lora_llama()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=3)
    trainer = OLoRAPlusTrainer(model=model, args=args, lr_ratio=4.0)
    batch = _batch(97)
    ours = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    stock = super(OLoRAPlusTrainer, trainer).compute_loss(model, dict(batch), num_items_in_batch=num_items)
    assert ours.item() == pytest.approx(stock.item(), rel=1e-5)


@pytest.mark.parametrize("chunk_bytes", [4 * 97 * 3, 1 << 30])  # chunks of 3 rows, and one chunk
def test_frozen_head_loss_in_chunks_equals_cross_entropy_with_the_same_gradient(monkeypatch, chunk_bytes):
    monkeypatch.setattr(loss_module, "LOGITS_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 97, bias=False).requires_grad_(False)
    hidden = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 97, (11,))
    weights = torch.rand(11)  # a weighted sum, so every row's gradient scale matters
    (head_token_losses(head, hidden, targets) * weights).sum().backward()
    got_loss, got_grad = head_token_losses(head, hidden, targets).detach(), hidden.grad.clone()
    hidden.grad = None
    expected = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="none")
    (expected * weights).sum().backward()
    torch.testing.assert_close(got_loss, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, hidden.grad, rtol=1e-5, atol=1e-6)


def test_a_trained_head_gets_its_gradient_through_the_plain_path():
    head = torch.nn.Linear(16, 97, bias=False)
    hidden = torch.randn(5, 16)
    head_token_losses(head, hidden, torch.randint(0, 97, (5,))).sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_test_loss_under_no_grad_stays_chunked_even_where_the_head_says_requires_grad(monkeypatch):
    # a loaded model's parameters all say requires_grad; the plain path would hold every token's logits at once
    monkeypatch.setattr(loss_module, "LOGITS_CHUNK_BYTES", 4 * 97 * 3)
    head = torch.nn.Linear(16, 97, bias=False)
    hidden, targets = torch.randn(11, 16), torch.randint(0, 97, (11,))
    expected = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="none").detach()
    rows, forward = [], head.forward
    monkeypatch.setattr(head, "forward", lambda x: rows.append(len(x)) or forward(x))
    with torch.no_grad():
        got = head_token_losses(head, hidden, targets)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert rows == [3, 3, 3, 2]  # the head's own forward (oneDNN's, when answering's Linears are), a chunk at a time

"""`import oloraplus` from your own code: the OLoRA init on a PEFT model, the LoRA+ optimizer in a stock Trainer,
and examples/finetune_with_your_trainer.py trained end to end on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURE, REPO, build_tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

import oloraplus
from oloraplus.errors import OLoRAPlusError

EXAMPLE = REPO / "examples" / "finetune_with_your_trainer.py"


def _peft_model(**config):
    config = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "task_type": "CAUSAL_LM", **config}
    return get_peft_model(build_tiny_llama(300), LoraConfig(**config))


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_public_names_load_on_first_use_and_import_stays_torch_free():
    code = "import sys, oloraplus; print('torch' in sys.modules, 'transformers' in sys.modules, 'peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]
    names: dict = {}
    exec("from oloraplus import *", names)
    assert (
        sorted(n for n in names if n != "__builtins__")
        == sorted(oloraplus.__all__)
        == ["OLoRAPlusError", "loraplus_optimizer", "loraplus_param_groups", "olora_init", "save_adapter"]
    )
    for name in oloraplus.__all__:
        assert callable(getattr(oloraplus, name)) and getattr(oloraplus, name).__doc__, name
    with pytest.raises(AttributeError):
        oloraplus.not_a_name  # noqa: B018


def test_olora_init_on_a_peft_model_keeps_outputs_and_returns_the_start():
    original = build_tiny_llama(300)
    model = get_peft_model(build_tiny_llama(300), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    initial = oloraplus.olora_init(model)
    ids = torch.randint(0, 300, (2, 10))
    torch.testing.assert_close(_logits(model, ids), _logits(original, ids), rtol=1e-4, atol=1e-4)
    assert len(initial) == 14  # 7 projections x 2 layers, never lm_head
    for name, module in model.named_modules():
        if name in initial:
            a0, b0 = initial[name]
            assert torch.equal(module.lora_B["default"].weight, b0) and torch.equal(module.lora_A["default"].weight, a0)
            torch.testing.assert_close(b0.T @ b0, torch.eye(8), rtol=0, atol=1e-5)  # B = Q_r: orthonormal columns


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: _peft_model(init_lora_weights="olora"), "already changed the base weights"),
        (lambda: _peft_model(use_dora=True), "DoRA"),
        (lambda: build_tiny_llama(300), "no LoRA layers"),
    ],
)
def test_olora_init_refuses_what_it_would_get_wrong(make, message):
    with pytest.raises(OLoRAPlusError, match=message):
        oloraplus.olora_init(make())


@pytest.mark.parametrize("lr_ratio", [1 / 16, 4.0])
def test_loraplus_optimizer_in_a_stock_trainer_keeps_the_ratio_through_the_schedule(tmp_path, lr_ratio):
    model = _peft_model()
    oloraplus.olora_init(model)
    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.1, warmup_steps=0.5, use_cpu=True, report_to=[]
    )
    optimizer = oloraplus.loraplus_optimizer(model, args, lr_ratio)
    assert isinstance(optimizer, torch.optim.AdamW)  # what args.optim asks for
    trainer = Trainer(model=model, args=args, optimizers=(optimizer, None))
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert trainer.optimizer is optimizer
    for _ in range(3):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        lrs = {g["role"]: g["lr"] for g in optimizer.param_groups}
        assert 0 < lrs["lora_A"] < 1e-3
        assert math.isclose(lrs["lora_B"], lr_ratio * lrs["lora_A"], rel_tol=1e-9)
    assert {(g["role"], g["weight_decay"]) for g in optimizer.param_groups} == {("lora_A", 0.1), ("lora_B", 0.1)}


def test_loraplus_optimizer_follows_args_optim_and_refuses_bad_input(tmp_path):
    model = _peft_model()
    sgd = TrainingArguments(output_dir=str(tmp_path), optim="sgd", learning_rate=0.1, use_cpu=True, report_to=[])
    assert type(oloraplus.loraplus_optimizer(model, sgd, 2.0)) is torch.optim.SGD
    with pytest.raises(OLoRAPlusError, match="lr_ratio"):
        oloraplus.loraplus_optimizer(model, sgd, 0.0)
    with pytest.raises(OLoRAPlusError, match="no trainable lora_B"):
        oloraplus.loraplus_optimizer(build_tiny_llama(300), sgd, 2.0)


def test_the_example_trains_with_a_stock_trainer(tiny_model_dir, tmp_path):
    """The example's main on the tiny model: B at lambda x A's lr, B moved, and the saved adapter, on the
    ORIGINAL base, has a lower loss on the training records than the base alone."""
    spec = importlib.util.spec_from_file_location("finetune_with_your_trainer", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "run"
    trainer = example.main(
        [
            "--model",
            str(tiny_model_dir),
            "--data",
            str(FIXTURE),
            "--output_dir",
            str(out),
            "--lr_ratio",
            "4",
            "--lr",
            "2e-3",
            "--n_train",
            "64",
            "--max_steps",
            "10",
        ]
    )
    lrs = {g["role"]: g["initial_lr"] for g in trainer.optimizer.param_groups}  # the schedule ends at lr 0
    assert lrs == {"lora_A": 2e-3, "lora_B": 8e-3}
    assert trainer.state.global_step == 10

    from oloraplus.models import load_base

    base, tok = load_base(str(tiny_model_dir))
    batch = [example.tokenize(tok, r) for r in json.loads(FIXTURE.read_text())[:16]]
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.tensor([b["input_ids"] + [tok.pad_token_id] * (width - len(b["input_ids"])) for b in batch])
    mask = torch.tensor([b["attention_mask"] + [0] * (width - len(b["input_ids"])) for b in batch])
    labels = torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch])

    def loss(model):
        model.eval()
        with torch.no_grad():
            return float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)

    before = loss(base)
    tuned = PeftModel.from_pretrained(base, str(out / "adapter"))
    after = loss(tuned)
    assert after < before - 0.05, (before, after)

"""LoRA+ groups: exact learning rates for lambda < 1 and > 1, through the Trainer's own optimizer creation."""

import math

import pytest
import torch
from conftest import build_tiny_llama
from transformers import TrainingArguments

from oloraplus.adapters import attach_adapter
from oloraplus.optim import loraplus_param_groups
from oloraplus.train import OLoRAPlusTrainer


def _model():
    model = attach_adapter(build_tiny_llama(300), "olora", 4, 8, 0.0, None)
    for name, p in model.named_parameters():  # a trainable non-adapter parameter (a norm), as with modules_to_save
        if name.endswith("model.norm.weight"):
            p.requires_grad_(True)
    return model


@pytest.mark.parametrize("lr_ratio", [1 / 16, 0.25, 1.0, 4.0, 16.0])
def test_trainer_optimizer_has_exact_loraplus_rates(tmp_path, lr_ratio):
    model = _model()
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, weight_decay=0.1, use_cpu=True, report_to=[])
    trainer = OLoRAPlusTrainer(model=model, args=args, lr_ratio=lr_ratio)
    opt = trainer.create_optimizer()
    assert isinstance(opt, torch.optim.AdamW)
    ids = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in opt.param_groups:
        for p in group["params"]:
            name = ids[id(p)]
            seen.add(name)
            expected = 3e-4 * lr_ratio if ".lora_B." in name else 3e-4  # A and the norm keep the base lr
            assert math.isclose(group["lr"], expected, rel_tol=1e-12), name
            assert group["weight_decay"] == (0.0 if name.endswith("norm.weight") else 0.1), name
    assert seen == {n for n, p in model.named_parameters() if p.requires_grad}


def test_warmup_schedule_keeps_the_ratio(tmp_path):
    model = _model()
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, warmup_steps=0.5, use_cpu=True, report_to=[])
    trainer = OLoRAPlusTrainer(model=model, args=args, lr_ratio=1 / 16)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    lrs = {g["role"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert 0 < lrs["lora_A"] < 1e-3  # warming up
    assert math.isclose(lrs["lora_B"], lrs["lora_A"] / 16, rel_tol=1e-9)
    assert math.isclose(lrs["other"], lrs["lora_A"], rel_tol=1e-9)


def test_groups_without_trainer_default_decay_to_matrices():
    groups = loraplus_param_groups(_model(), 1e-3, 2.0, 0.01)
    by_role = {(g["role"], g["weight_decay"]) for g in groups}
    assert by_role == {("lora_A", 0.01), ("lora_B", 0.01), ("other", 0.0)}


@pytest.mark.parametrize("plain", ["olora", "lora"])
def test_plus_at_lambda_one_trains_bit_identically_to_its_parent(plain, tiny_model_dir, small_data, tmp_path):
    """axolotl issue 2065: a LoRA+ ratio of 1 trained differently from plain LoRA. Here it must not, to the bit."""
    import json

    from safetensors.torch import load_file

    from oloraplus.cli import main

    runs = {}
    for method in (plain, plain + "+"):
        out = tmp_path / method
        args = [
            "train",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(small_data),
            "--n_train",
            "16",
            "--n_test",
            "2",
            "--batch_size",
            "4",
            "--method",
            method,
            "--lr",
            "1e-3",
            "--logging_steps",
            "1",
            "--generate",
            "false",
            "--precision",
            "fp32",
            "--output_dir",
            str(out),
        ]
        if method.endswith("+"):
            args += ["--lr_ratio", "1"]
        assert main(args) == 0
        history = [h["loss"] for h in json.loads((out / "history.json").read_text()) if "loss" in h]
        runs[method] = (history, load_file(out / "adapter" / "adapter_model.safetensors"))
    (losses, weights), (plus_losses, plus_weights) = runs[plain], runs[plain + "+"]
    assert len(losses) == 4 and plus_losses == losses  # every logged step, exactly
    assert weights.keys() == plus_weights.keys()
    for key, tensor in weights.items():
        assert torch.equal(plus_weights[key], tensor), key

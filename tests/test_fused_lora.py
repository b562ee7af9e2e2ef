"""The fused LoRA Linear gives PEFT's outputs and gradients, and hands every case it does not cover to PEFT."""

import copy

import pytest
import torch
from conftest import build_tiny_llama
from peft import LoraConfig, get_peft_model

from oloraplus.adapters import attach_adapter, lora_layers
from oloraplus.fused_lora import FusedLoraLinear, _LoRAUp, use_fused_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapted(alpha: float, dropout: float = 0.0):
    torch.manual_seed(0)
    model = attach_adapter(build_tiny_llama(300), "olora", 8, alpha, dropout, TARGETS)
    for _, layer in lora_layers(model):  # B away from its init, so every gradient path carries signal
        layer.lora_B["default"].weight.data.add_(0.05 * torch.randn_like(layer.lora_B["default"].weight))
    return model


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_fused_gives_peft_bits_for_loss_and_every_gradient():
    peft_model = _adapted(8.0)  # alpha = r: scaling 1
    fused = copy.deepcopy(peft_model)
    assert use_fused_lora(fused) == len(TARGETS) * fused.config.num_hidden_layers
    calls = []
    forward = _LoRAUp.forward
    _LoRAUp.forward = staticmethod(lambda *a: calls.append(1) or forward(*a))
    try:
        ids = torch.randint(0, 300, (2, 24))
        loss_p, grads_p = _loss_and_grads(peft_model, ids)
        loss_f, grads_f = _loss_and_grads(fused, ids)
    finally:
        _LoRAUp.forward = forward
    assert len(calls) == len(TARGETS) * fused.config.num_hidden_layers  # every layer took the fused path
    assert grads_p.keys() == grads_f.keys() and len(grads_f) == 2 * len(calls)
    assert torch.equal(loss_f, loss_p)
    for name in grads_p:  # the same matmuls, and each input gradient summed in PEFT's order
        assert torch.equal(grads_f[name], grads_p[name]), name


def test_fused_hands_other_cases_to_peft():
    model = _adapted(8.0, dropout=0.1)  # dropout: PEFT's forward
    use_fused_lora(model)
    layer = next(m for m in model.modules() if isinstance(m, FusedLoraLinear))
    x = torch.randn(3, layer.in_features)
    assert layer._fusable_adapter(x) is None
    layer.lora_dropout["default"] = torch.nn.Identity()
    layer.scaling["default"] = 2.0  # PEFT scales in passes of its own: its forward keeps its bits
    assert layer._fusable_adapter(x) is None
    layer.scaling["default"] = 1.0
    layer.lora_dropout["default"] = torch.nn.Identity()
    assert layer._fusable_adapter(x) == "default"
    assert layer._fusable_adapter(x.double()) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._fusable_adapter(x) is None
    with model.disable_adapter():
        assert layer._fusable_adapter(x) is None
    layer.merge()
    assert layer._fusable_adapter(x) is None
    layer.unmerge()
    layer.base_layer.weight.requires_grad_(True)  # a base that trains needs its own gradient: PEFT's path
    assert layer._fusable_adapter(x) is None


def test_fused_model_saves_and_copies_like_peft(tmp_path):
    plain = get_peft_model(build_tiny_llama(300), LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    fused = copy.deepcopy(plain)
    use_fused_lora(fused)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    twin = copy.deepcopy(fused)  # the copy's layers compute with the copy's weights
    layer = next(m for m in twin.modules() if isinstance(m, FusedLoraLinear))
    layer.lora_B["default"].weight.data.fill_(1.0)
    x = torch.randn(2, layer.in_features)
    original = next(m for m in fused.modules() if isinstance(m, FusedLoraLinear))
    assert layer._fusable_adapter(x) == "default"  # scaling 1: the fused path
    assert not torch.equal(layer(x), original(x))
    fused.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("fused", [True, False])
def test_train_fuses_lora_layers_as_configured(tiny_model_dir, small_data, tmp_path, monkeypatch, fused):
    from conftest import cli_args

    from oloraplus.cli import main

    products = []
    apply = _LoRAUp.apply
    monkeypatch.setattr(_LoRAUp, "apply", lambda *a: products.append(1) or apply(*a))
    out = tmp_path / "run"
    args = cli_args(
        "train",
        model=tiny_model_dir,
        data=small_data,
        n_train=8,
        n_test=2,
        batch_size=4,
        max_steps=1,
        dropout=0,
        precision="fp32",
        generate="false",
        fused_lora=str(fused).lower(),
        output_dir=out,
    )
    assert main(args) == 0
    assert bool(products) is fused  # the training step ran the fused op, or PEFT's forward only
    assert f"fused_lora: {str(fused).lower()}" in (out / "config.yaml").read_text()

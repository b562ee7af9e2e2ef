"""OLoRA init equals PEFT's, leaves the model unchanged, and saves for the original base."""

import copy

import pytest
import torch
from conftest import build_tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

from oloraplus.adapters import adapter_snapshot, attach_adapter, lora_layers, olora_factors, save_adapter
from oloraplus.errors import OLoRAPlusError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (128, 128)])
@pytest.mark.parametrize("rank", [1, 8, 16])
def test_thin_qr_equals_full_qr(shape, rank):
    w = torch.randn(*shape)
    b, a = olora_factors(w, rank)
    q, r = torch.linalg.qr(w)
    torch.testing.assert_close(b, q[:, :rank], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, r[:rank], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.T @ b, torch.eye(rank), rtol=0, atol=1e-5)  # orthonormal columns


def test_olora_init_equals_peft_olora():
    ours = attach_adapter(build_tiny_llama(300), "olora", 8, 16, 0.0, TARGETS)
    peft = get_peft_model(
        build_tiny_llama(300), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights="olora")
    )
    p_ours, p_peft = dict(ours.named_parameters()), dict(peft.named_parameters())
    assert p_ours.keys() == p_peft.keys()
    n_lora = 0
    for name, tensor in p_peft.items():
        if "lora_" in name or "base_layer" in name:
            torch.testing.assert_close(p_ours[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
            n_lora += "lora_" in name
    assert n_lora == 2 * 7 * 2  # A and B for 7 projections in 2 layers


@pytest.mark.parametrize("init", ["olora", "pissa", "gaussian"])
def test_init_leaves_outputs_unchanged(init):
    base = build_tiny_llama(300)
    ids = torch.randint(0, 300, (2, 12))
    before = _logits(base, ids)
    model = attach_adapter(copy.deepcopy(base), init, 8, 16, 0.0, None)
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-4, atol=1e-4)
    b_norm = sum(float(layer.lora_B["default"].weight.abs().sum()) for _, layer in lora_layers(model))
    assert (b_norm == 0) == (init == "gaussian")  # only gaussian LoRA starts from B = 0


def test_default_targets_skip_lm_head():
    model = attach_adapter(build_tiny_llama(300), "olora", 4, 8, 0.0, None)
    names = [n for n, _ in lora_layers(model)]
    assert len(names) == 14 and not any("lm_head" in n for n in names)


def test_rank_too_large_is_a_clear_error():
    with pytest.raises(OLoRAPlusError, match=r"rank 40 is too large for .*k_proj.* at most 32"):
        attach_adapter(build_tiny_llama(300), "olora", 40, 16, 0.0, None)


def test_missing_target_is_a_clear_error():
    with pytest.raises(OLoRAPlusError, match="not in the model: qkv"):
        attach_adapter(build_tiny_llama(300), "olora", 4, 16, 0.0, ["q_proj", "qkv"])


@pytest.mark.parametrize("init", ["olora", "pissa", "gaussian"])
def test_saved_adapter_applies_to_original_base(tmp_path, init):
    """Untouched base + saved adapter reproduces the fine-tuned model's logits."""
    original = build_tiny_llama(300, seed=1)
    model = attach_adapter(copy.deepcopy(original), init, 8, 16, 0.0, None)
    initial = adapter_snapshot(model)
    torch.manual_seed(3)
    with torch.no_grad():  # stand-in for training: move every adapter weight
        for _, layer in lora_layers(model):
            layer.lora_A["default"].weight.add_(0.05 * torch.randn_like(layer.lora_A["default"].weight))
            layer.lora_B["default"].weight.add_(0.05 * torch.randn_like(layer.lora_B["default"].weight))
    ids = torch.randint(0, 300, (2, 12))
    tuned = _logits(model, ids)
    assert not torch.allclose(tuned, _logits(original, ids), atol=1e-3)
    save_adapter(model, tmp_path / "adapter", None if init == "gaussian" else initial)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(reloaded, ids), tuned, rtol=1e-4, atol=1e-4)

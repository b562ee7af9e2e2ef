"""Adapter inits (thin-QR OLoRA, PiSSA, gaussian) on PEFT's LoRA layers, and saving for the original base.

OLoRA+ needs no new tuner: PEFT's LoRA layers carry the adapter; this module only
chooses their starting values (and, for OLoRA/PiSSA, the matching base weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from oloraplus.distributed import full_tensor
from oloraplus.errors import OLoRAPlusError

ADAPTER = "default"


@torch.no_grad()
def olora_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of OLoRA from a thin QR of W's first r columns, in float32.

    Householder QR builds Q's j-th column from W's first j columns only, so the
    first r columns of Q from qr(W) equal Q from qr(W[:, :r]); and since W = QR
    with orthonormal Q, R's first r rows are Q_rᵀ·W. Cost O(out·r² + r·out·in)
    instead of a full QR's O(out·in·min(out, in)).
    """
    w = weight.detach().float()
    q, _ = torch.linalg.qr(w[:, :rank], mode="reduced")
    return q.contiguous(), (q.T @ w).contiguous()


def default_target_modules(model: nn.Module) -> list[str]:
    """Every nn.Linear leaf name (attention and MLP projections), never the output head."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not output
    }
    if not names:
        raise OLoRAPlusError("found no linear layers to adapt; pass target_modules explicitly")
    return sorted(names)


def check_targets(model: nn.Module, targets: list[str], rank: int) -> None:
    """Each target must name a linear layer of the model, and fit the rank."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found: dict[str, list[tuple[str, nn.Linear]]] = {t: [] for t in targets}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in found and isinstance(module, nn.Linear):
            found[leaf].append((name, module))
    missing = [t for t, hits in found.items() if not hits]
    if missing:
        raise OLoRAPlusError(f"target module(s) not in the model: {', '.join(missing)}")
    for hits in found.values():
        for name, module in hits:
            if module is output:
                raise OLoRAPlusError(f"target '{name}' is the output head; adapt attention/MLP projections instead")
            limit = min(module.in_features, module.out_features)
            if rank > limit:
                raise OLoRAPlusError(
                    f"rank {rank} is too large for '{name}' ({module.out_features}x{module.in_features}): at most {limit}"
                )


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]


@torch.no_grad()
def apply_olora(model: nn.Module) -> None:
    """B = Q_r, A = R_r, W <- W - (alpha/r)·B·A: outputs unchanged at step 0."""
    for _, layer in lora_layers(model):
        base = layer.get_base_layer()
        r, scale = layer.r[ADAPTER], layer.scaling[ADAPTER]
        b, a = olora_factors(base.weight, r)
        layer.lora_A[ADAPTER].weight.data = a.to(layer.lora_A[ADAPTER].weight.dtype)
        layer.lora_B[ADAPTER].weight.data = b.to(layer.lora_B[ADAPTER].weight.dtype)
        if base.weight.dtype == torch.float32:  # in place: no out x in temporaries (measured 12x on 5632x2048)
            base.weight.data.addmm_(b, a, alpha=-scale)
        else:
            base.weight.data = (base.weight.float() - scale * (b @ a)).to(base.weight.dtype)


# PEFT inits that leave the base weights as they were: OLoRA's W - s·B·A is only right from an untouched W
_BASE_KEEPING_INITS = (True, False, "gaussian")


def olora_init(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Give a PEFT LoRA model OLoRA's start, by a thin QR; returns (A₀, B₀) per layer for `save_adapter`.

    For a model from `peft.get_peft_model(model, LoraConfig(...))` with PEFT's default
    init: each adapted W gets B = the first r columns of Q and A = the first r rows of
    R from W = QR, and W becomes W - (alpha/r)·B·A, so the model's outputs are unchanged.
    The same factors as PEFT's `init_lora_weights="olora"` (whose full QR costs far more
    on large layers). OLoRA changes the base weights, so keep the returned copies: with
    them `save_adapter` writes an adapter that applies to the ORIGINAL base model.

    Refuses what it would get wrong: a config whose own init already changed W (olora,
    pissa, ...), DoRA (its magnitudes are computed from the old W), and base layers
    that are not plain float nn.Linear (quantized, GPT-2's Conv1D, embeddings).
    """
    config = getattr(model, "peft_config", {}).get(ADAPTER)
    if config is not None:
        if config.init_lora_weights not in _BASE_KEEPING_INITS:
            raise OLoRAPlusError(
                f"the LoRA config's init_lora_weights={config.init_lora_weights!r} already changed the base weights; "
                "create the adapter with the default init (init_lora_weights=True) and let olora_init set it"
            )
        if getattr(config, "use_dora", False):
            raise OLoRAPlusError(
                "olora_init does not support DoRA (its magnitudes depend on the base weights it changes)"
            )
    layers = lora_layers(model)
    if not layers:
        raise OLoRAPlusError(
            f"no LoRA layers with adapter '{ADAPTER}' in the model: wrap it with peft.get_peft_model first"
        )
    for name, layer in layers:
        base = layer.get_base_layer()
        if not isinstance(base, nn.Linear) or not base.weight.dtype.is_floating_point:
            raise OLoRAPlusError(
                f"olora_init needs plain float nn.Linear base layers; '{name}' is {type(base).__name__}"
            )
    apply_olora(model)
    return adapter_snapshot(model)


def attach_adapter(
    model: PreTrainedModel,
    init: str,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | None,
) -> PeftModel:
    """Wrap `model` with a LoRA adapter and initialize it by `init` (call set_seed first for gaussian)."""
    targets = list(target_modules) if target_modules else default_target_modules(model)
    check_targets(model, targets, rank)
    peft_init: bool | str = {"gaussian": "gaussian", "pissa": "pissa", "olora": True}[init]
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        init_lora_weights=peft_init,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    if init == "olora":  # thin QR instead of PEFT's full QR: same factors, a fraction of the time
        apply_olora(peft_model)
    return peft_model


def adapter_snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Copies of each layer's (A, B), keyed by module name: the start point for dynamics and conversion."""
    return {
        name: (
            layer.lora_A[ADAPTER].weight.detach().float().clone(),
            layer.lora_B[ADAPTER].weight.detach().float().clone(),
        )
        for name, layer in lora_layers(model)
    }


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's whole weights, keyed as in `model.state_dict()`, for `save_adapter`.

    Under FSDP2 each rank holds a shard of every weight: all ranks must call this, and each
    gets the whole adapter (the lora_* weights only: megabytes, not the base model).
    """
    return {name: full_tensor(t.detach()).cpu() for name, t in model.state_dict().items() if ".lora_" in name}


def merge_saved_adapter(base: PreTrainedModel, adapter_dir: str | Path) -> PreTrainedModel:
    """The original base model with an adapter saved by `save_adapter` merged into its weights."""
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def save_adapter(
    model: PeftModel,
    out_dir: str | Path,
    initial: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save in PEFT format so it applies to the ORIGINAL base model.

    `initial`: the (A₀, B₀) that `olora_init` returned (or `adapter_snapshot` taken right
    after an init that changed the base); None where the base was left as it was
    (PEFT's default gaussian init), which is a plain `save_pretrained`.
    `state`: the adapter's weights from `adapter_state` where the model's own are sharded
    (FSDP); None reads them from the model.

    OLoRA and PiSSA subtract s·B₀A₀ from the base weights. On the original base the
    fine-tuned delta is s·(BA − B₀A₀) = s·[B, −B₀]·[A; A₀]: a rank-2r LoRA with the
    same scale (alpha doubled with r). PEFT's path_initial_model_for_weight_conversion
    does the same; we hold A₀, B₀ already, so we write the result directly.
    """
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, **({} if state is None else {"state_dict": state}))
    if initial is None:  # the base is untouched, nothing to convert
        return
    weights_file = out_dir / "adapter_model.safetensors"
    state = load_file(weights_file)
    converted = {}
    for key, tensor in state.items():
        module = key.rsplit(".lora_", 1)[0]
        a0, b0 = initial[module]
        if ".lora_A." in key:
            converted[key] = torch.cat([tensor.float(), a0], dim=0).contiguous()
        elif ".lora_B." in key:
            converted[key] = torch.cat([tensor.float(), -b0], dim=1).contiguous()
        else:
            converted[key] = tensor
    save_file(converted, weights_file, metadata={"format": "pt"})
    config_file = out_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["r"] = 2 * config["r"]
    config["lora_alpha"] = 2 * config["lora_alpha"]
    config["init_lora_weights"] = True
    config_file.write_text(json.dumps(config, indent=2) + "\n")

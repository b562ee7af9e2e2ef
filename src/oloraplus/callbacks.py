"""Trainer callbacks of a run: the learning dynamics of the adapter, and a stop at the first non-finite loss."""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from oloraplus import adapters
from oloraplus.distributed import full_tensor


class DynamicsCallback(TrainerCallback):
    """Every k steps: mean ‖A−A₀‖_F, mean ‖B−B₀‖_F, and how far B left span(B₀): ‖(I−P₀)B‖_F/‖B‖_F."""

    def __init__(self, initial: dict[str, tuple[torch.Tensor, torch.Tensor]], every: int):
        self.every = every
        self.initial = initial
        # an orthonormal basis of span(B₀); None where B₀ = 0 (gaussian LoRA: no initial span)
        self.basis = {
            name: (torch.linalg.qr(b0).Q if b0.abs().sum() > 0 else None) for name, (_, b0) in initial.items()
        }
        self.rows: list[dict[str, float | int | None]] = []

    @torch.no_grad()
    def record(self, model: torch.nn.Module, step: int) -> None:
        d_a, d_b, drift = [], [], []
        for name, layer in adapters.lora_layers(model):
            # the snapshot stays on the CPU (taken before the Trainer moves the model to an accelerator)
            # whole weights, also under FSDP2 (where every rank runs this callback and takes part in the gather)
            a = full_tensor(layer.lora_A[adapters.ADAPTER].weight).float().cpu()
            b = full_tensor(layer.lora_B[adapters.ADAPTER].weight).float().cpu()
            a0, b0 = self.initial[name]
            d_a.append(float(torch.linalg.norm(a - a0)))
            d_b.append(float(torch.linalg.norm(b - b0)))
            q = self.basis[name]
            if q is not None:
                residual = b - q @ (q.T @ b)
                drift.append(float(torch.linalg.norm(residual) / torch.linalg.norm(b).clamp_min(1e-12)))
        n = max(len(d_a), 1)
        self.rows.append(
            {
                "step": step,
                "dA": sum(d_a) / n,
                "dB": sum(d_b) / n,
                "drift": (sum(drift) / len(drift)) if drift else None,
            }
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.rows:  # a resumed run has its rows so far from the checkpoint
            self.record(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self.record(model, state.global_step)


class DivergenceCallback(TrainerCallback):
    """Stop as soon as a logged training loss is NaN or infinite, and remember the step."""

    def __init__(self) -> None:
        self.diverged_step: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss) and self.diverged_step is None:
            self.diverged_step = state.global_step
            control.should_training_stop = True
            control.should_save = False  # a run resumed from NaN weights would log its divergence at a later step

"""OLoRA init, ours (thin QR of W[:, :r]) vs PEFT's `init_lora_weights="olora"` (full QR of W).

Why: OLoRA only needs the first r columns of Q and the first r rows of R, but
PEFT factors the whole weight, O(out·in·min(out, in)) per layer. This script
times both on the TinyLlama-1.1B shape (random weights, no download), whole model,
in one run, and checks that they give the same B, A and residual base weight.

    python benchmarks/bench_init.py                     # 22 layers, r = 16 and 64
    python benchmarks/bench_init.py --layers 2 --ranks 16
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from oloraplus import adapters

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tinyllama_config(layers: int) -> LlamaConfig:
    """TinyLlama-1.1B: q/o 2048x2048, k/v 256x2048, gate/up 5632x2048, down 2048x5632."""
    return LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def build_model(layers: int, device: str, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(tinyllama_config(layers))
    return model.float().eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def warm_up(device: str) -> None:
    """First LAPACK/BLAS calls pay one-off set-up; pay it before any timed call, for both sides."""
    w = torch.randn(512, 256, device=device)
    torch.linalg.qr(w)
    torch.linalg.qr(w[:, :8])
    w.addmm_(w[:, :8], torch.randn(8, 256, device=device), alpha=-1.0)
    sync(device)


def ours(model: LlamaForCausalLM, rank: int, alpha: float, device: str) -> tuple[object, float, float]:
    """attach_adapter(init="olora"): get_peft_model (plain LoRA init) + thin-QR OLoRA. Returns (model, total s, init-only s)."""
    sync(device)
    t0 = time.perf_counter()
    peft_model = adapters.attach_adapter(model, "gaussian", rank, alpha, 0.0, TARGETS)  # wrap only, time apart
    sync(device)
    t1 = time.perf_counter()
    adapters.apply_olora(peft_model)
    sync(device)
    t2 = time.perf_counter()
    return peft_model, t2 - t0, t2 - t1


@torch.no_grad()
def proposed_inplace(model: LlamaForCausalLM, rank: int, alpha: float, device: str) -> tuple[object, float, float]:
    """Same thin-QR math, but the residual W -= s·B·A is one in-place addmm_ (no out x in temporary).

    Not what src/oloraplus does today: measured here to size the change before making it.
    """
    sync(device)
    t0 = time.perf_counter()
    peft_model = adapters.attach_adapter(model, "gaussian", rank, alpha, 0.0, TARGETS)
    sync(device)
    t1 = time.perf_counter()
    for _, layer in adapters.lora_layers(peft_model):
        w = layer.get_base_layer().weight.data
        b, a = adapters.olora_factors(w, layer.r[adapters.ADAPTER])
        layer.lora_A[adapters.ADAPTER].weight.data = a
        layer.lora_B[adapters.ADAPTER].weight.data = b
        w.addmm_(b, a, alpha=-layer.scaling[adapters.ADAPTER])  # fp32 weights here
    sync(device)
    t2 = time.perf_counter()
    return peft_model, t2 - t0, t2 - t1


def peft_olora(model: LlamaForCausalLM, rank: int, alpha: float, device: str) -> tuple[object, float]:
    """What a PEFT user writes: LoraConfig(init_lora_weights="olora")."""
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights="olora")
    sync(device)
    t0 = time.perf_counter()
    peft_model = get_peft_model(model, config)
    sync(device)
    return peft_model, time.perf_counter() - t0


@torch.no_grad()
def max_rel_diff(ours_model, peft_model) -> dict[str, float]:
    """Per tensor max|ours - peft| / max|peft|; the worst layer for B, A and the residual base weight."""
    worst = {"B": 0.0, "A": 0.0, "W_residual": 0.0}
    theirs = dict(adapters.lora_layers(peft_model))
    for name, layer in adapters.lora_layers(ours_model):
        other = theirs[name]
        pairs = {
            "B": (layer.lora_B[adapters.ADAPTER].weight, other.lora_B[adapters.ADAPTER].weight),
            "A": (layer.lora_A[adapters.ADAPTER].weight, other.lora_A[adapters.ADAPTER].weight),
            "W_residual": (layer.get_base_layer().weight, other.get_base_layer().weight),
        }
        for key, (x, y) in pairs.items():
            rel = float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30))
            worst[key] = max(worst[key], rel)
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=22, help="decoder layers (TinyLlama-1.1B has 22) [22]")
    p.add_argument("--ranks", default="16,64", help="comma-separated LoRA ranks [16,64]")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/r on the residual) [16]")
    p.add_argument("--device", default="cpu", help="cpu | cuda [cpu]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default) [0]")
    p.add_argument(
        "--proposed",
        action="store_true",
        help="also time the thin QR with an in-place residual (a proposed change, not in src) [off]",
    )
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}  threads {torch.get_num_threads()}  device {args.device}  "
        f"{platform.processor() or platform.machine()}"
    )
    if hasattr(os, "getloadavg"):  # other users of the cores skew CPU timings: say how busy they were
        print("load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"TinyLlama-1.1B shape, {args.layers} layer(s), 7 projections each, random fp32 weights\n")
    warm_up(args.device)
    rows = []
    for rank in ranks:
        t0 = time.perf_counter()
        original = build_model(args.layers, args.device, args.seed)
        build_s = time.perf_counter() - t0
        # ours on a copy, PEFT in place on the original: two copies of the weights at most
        ours_model, ours_s, ours_init_s = ours(copy.deepcopy(original), rank, args.alpha, args.device)
        peft_model, peft_s = peft_olora(original, rank, args.alpha, args.device)
        diff = max_rel_diff(ours_model, peft_model)
        row = {
            "rank": rank,
            "layers": args.layers,
            "adapted_linears": len(adapters.lora_layers(ours_model)),
            "build_s": build_s,
            "ours_s": ours_s,
            "ours_init_only_s": ours_init_s,
            "peft_s": peft_s,
            "speedup": peft_s / ours_s,
            "max_rel_diff": diff,
        }
        rows.append(row)
        print(
            f"r={rank:<3} ours {ours_s:8.3f} s (init math {ours_init_s:.3f} s)   peft olora {peft_s:8.3f} s   "
            f"speedup {row['speedup']:6.1f}x"
        )
        print(
            f"       max rel diff  B {diff['B']:.2e}  A {diff['A']:.2e}  residual W {diff['W_residual']:.2e}  "
            f"(model build {build_s:.1f} s, not timed)"
        )
        del peft_model, original
        gc.collect()
        if args.proposed:  # a fresh copy of the same weights (same seed), in place; checked against ours
            prop_model, prop_s, prop_init_s = proposed_inplace(
                build_model(args.layers, args.device, args.seed), rank, args.alpha, args.device
            )
            prop_diff = max_rel_diff(prop_model, ours_model)
            row.update(
                proposed_s=prop_s,
                proposed_init_only_s=prop_init_s,
                proposed_speedup=peft_s / prop_s,
                proposed_max_rel_diff_vs_ours=prop_diff,
            )
            print(
                f"       proposed in-place residual {prop_s:8.3f} s (init math {prop_init_s:.3f} s)   "
                f"speedup vs peft {peft_s / prop_s:6.1f}x   max rel diff vs ours {max(prop_diff.values()):.1e}"
            )
            del prop_model
        del ours_model
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""OLoRA+ training-step throughput and MFU on the TinyLlama-1.1B shape (random weights), for a GPU.

Why: the CPU numbers in docs/benchmarks.md say little about an accelerator. This
runs our pieces (attach_adapter with the thin-QR OLoRA init, loraplus_param_groups,
AdamW) in a plain loop on random tokens: bf16 autocast over frozen bf16 base
weights, fp32 adapter weights. It reports tokens/s and MFU against the chip's
dense bf16 spec peak and against a matmul peak measured in the same run.
Called by benchmarks/gpu_check.sh; on a CPU it runs as a smoke test:

    python benchmarks/gpu_train.py --device cpu --layers 1 --steps 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

from bench_init import tinyllama_config  # noqa: E402

from oloraplus import adapters  # noqa: E402
from oloraplus.optim import loraplus_param_groups  # noqa: E402

H200_BF16_DENSE = 989e12  # NVIDIA H200 SXM spec, dense bf16 tensor-core FLOP/s (no sparsity)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, n: int, iters: int) -> float:
    """Best-of-three FLOP/s of `iters` back-to-back n x n matmuls."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = a @ b
    best = 0.0
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=c)
        sync(device)
        best = max(best, iters * 2 * n**3 / (time.perf_counter() - t0))
    return best


def count_params(model) -> tuple[int, int]:
    """(frozen base weights used in matmuls incl. lm_head, trainable adapter weights)."""
    base = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".lora_" not in n
    )
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return base, lora


def flops_per_token(base: int, lora: int, layers: int, hidden: int, seq_len: int) -> float:
    """Frozen base: forward 2·P + backward 2·P (activation grads only); adapter 6·P_lora;
    attention scores and values 12·layers·seq·hidden (PaLM's convention, no causal discount)."""
    return 4.0 * base + 6.0 * lora + 12.0 * layers * seq_len * hidden


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=22, help="decoder layers [22 = TinyLlama-1.1B]")
    p.add_argument("--batch_size", type=int, default=None, help="sequences per step [8 on cuda, 2 on cpu]")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sequence [1024 on cuda, 64 on cpu]")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps [30]")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first [5 on cuda, 1 on cpu]")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lr_ratio", type=float, default=4.0)
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="[bf16 on cuda, fp32 on cpu]")
    p.add_argument(
        "--spec_peak", type=float, default=H200_BF16_DENSE, help="spec dense peak FLOP/s [989e12, H200 bf16]"
    )
    p.add_argument("--matmul_n", type=int, default=None, help="matmul size for the measured peak [8192 cuda, 512 cpu]")
    p.add_argument("--json", help="write the figures to this JSON file")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    batch = args.batch_size or (8 if cuda else 2)
    seq = args.seq_len or (1024 if cuda else 64)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    bf16 = (args.precision or ("bf16" if cuda else "fp32")) == "bf16"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}")

    dtype = torch.bfloat16 if bf16 else torch.float32
    n = args.matmul_n or (8192 if cuda else 512)
    peak = matmul_peak(args.device, dtype, n, 50 if cuda else 3)
    print(f"measured {str(dtype).split('.')[-1]} matmul peak ({n}x{n}): {peak / 1e12:.1f} TFLOP/s")

    config = tinyllama_config(args.layers)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(args.device):
        model = LlamaForCausalLM(config)
    model = model.to(dtype)  # frozen base weights in the compute dtype; the adapter stays fp32 (PEFT's default)
    sync(args.device)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = adapters.attach_adapter(model, "olora", args.rank, args.alpha, args.dropout, None)
    sync(args.device)
    init_s = time.perf_counter() - t0
    model.train()
    optimizer = torch.optim.AdamW(
        loraplus_param_groups(model, args.lr, args.lr_ratio, 0.0), lr=args.lr, fused=cuda or None
    )
    base_p, lora_p = count_params(model)
    _, first = adapters.lora_layers(model)[0]
    dtypes = f"base {first.get_base_layer().weight.dtype}, adapter {first.lora_A[adapters.ADAPTER].weight.dtype}"
    print(
        f"TinyLlama-1.1B shape, {args.layers} layers: {base_p / 1e6:.1f}M frozen matmul weights, "
        f"{lora_p / 1e6:.2f}M trainable (r={args.rank}; {dtypes}); build {build_s:.1f} s, OLoRA attach {init_s:.2f} s"
    )

    autocast = (
        torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device=args.device).manual_seed(0)
    losses = []
    for step in range(warmup + args.steps):
        if step == warmup:
            sync(args.device)
            t0 = time.perf_counter()
        ids = torch.randint(0, config.vocab_size, (batch, seq), device=args.device, generator=gen)
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == warmup + args.steps - 1 or step < warmup:
            losses.append(float(loss))  # a host sync only outside the timed steps, and at the very end
    sync(args.device)
    seconds = time.perf_counter() - t0

    tokens = batch * seq * args.steps
    per_token = flops_per_token(base_p, lora_p, args.layers, config.hidden_size, seq)
    achieved = per_token * tokens / seconds
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "layers": args.layers,
        "batch_size": batch,
        "seq_len": seq,
        "steps": args.steps,
        "rank": args.rank,
        "precision": "bf16 autocast, bf16 base weights, fp32 adapter" if bf16 else "fp32",
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "step_ms": 1000 * seconds / args.steps,
        "flops_per_token": per_token,
        "achieved_flops_per_s": achieved,
        "measured_matmul_peak": peak,
        "mfu_vs_measured": achieved / peak,
        "spec_peak": args.spec_peak,
        "mfu_vs_spec": achieved / args.spec_peak,
        "olora_attach_s": init_s,
        "losses_first_last": [losses[0], losses[-1]],
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    print(
        f"{args.steps} steps of {batch}x{seq} tokens: {seconds:.2f} s, {result['step_ms']:.0f} ms/step, "
        f"{result['tokens_per_s']:,.0f} tokens/s"
    )
    print(
        f"FLOPs/token 4·P + 6·P_lora + 12·l·L·d = {per_token / 1e9:.2f} GFLOP; achieved {achieved / 1e12:.2f} TFLOP/s"
    )
    print(
        f"MFU {result['mfu_vs_spec']:.1%} of the {args.spec_peak / 1e12:.0f} TFLOP/s spec peak, "
        f"{result['mfu_vs_measured']:.1%} of the measured matmul peak"
    )
    if cuda:
        print(f"peak GPU memory allocated: {result['peak_gpu_memory_gib']:.1f} GiB")
    print(f"loss first {losses[0]:.3f}, last {losses[-1]:.3f} (random tokens: ~ln(vocab) = 10.4)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

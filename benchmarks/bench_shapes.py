"""Larger shapes than the embedded model: memory and speed of ours vs before vs the baseline, side by side.

Two random-weight models built from a config (no download), each with SmolLM2's tokenizer:
  tinyllama  TinyLlama-1.1B's shape (22 layers, hidden 2048, MLP 5632, 32 heads / 4 KV heads,
             vocab 32000): the source study's model size. Goal: trains at batch 8 x 512 tokens
             within 12 GB peak RSS.
  vocab256k  a ~270M model with a 262,144-token vocabulary (Gemma-3-270M's shape as a Llama:
             18 layers, hidden 640, MLP 2048, 4 heads / 1 KV head of 256): the whole run
             (training, test loss, answers) within 5 GB.
Training examples are synthetic Alpaca records whose answers fill max_length (512 tokens), so
every batch carries batch_size x 512 tokens. This script builds the folder and the data, then
runs benchmarks/bench_train.py (ours, before, baseline: tokens/s and peak RSS of training) and
the whole run of ours and before under /usr/bin/time (peak RSS of the process, start to end).

    python benchmarks/bench_shapes.py --shape tinyllama --n_train 16
    python benchmarks/bench_shapes.py --shape vocab256k --n_train 32 --n_test 16 --max_new_tokens 48
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_train import BEFORE_REV, extract_revision  # noqa: E402
from common import DEFAULT_DATA  # noqa: E402

SHAPES = {
    "tinyllama": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "vocab256k": dict(
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=262144,
    ),
}


def build_model(shape: str, folder: Path, layers: int | None = None) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from oloraplus.models import load_base

    _, tok = load_base("smollm2-135m")
    torch.manual_seed(0)
    dims = {**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}
    # the data is tokenized with SmolLM2's tokenizer: every id it makes needs a row (TinyLlama's 32,000 would not
    # hold its 49,152, so that shape grows by 17,152 rows: ~3% more parameters, a slightly harder memory goal)
    dims["vocab_size"] = max(dims["vocab_size"], len(tok))
    config = LlamaConfig(
        **dims,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    print(f"{shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters", flush=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def long_records(n: int, data: str, seed: int = 0) -> list[dict]:
    """Alpaca instructions with answers long enough to fill 512 tokens (words drawn from real answers)."""
    records = json.loads(Path(data).read_text())
    words = " ".join(r["output"] for r in records[:400]).split()
    rng = random.Random(seed)
    return [
        {"instruction": r["instruction"], "input": r["input"], "output": " ".join(rng.choices(words, k=600))}
        for r in records[:n]
    ]


def timed_run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of a command, from /usr/bin/time."""
    proc = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M", *cmd], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-3000:]}")
    wall, kib = re.findall(r"TIME ([\d.]+) (\d+)", proc.stderr)[-1]
    return float(wall), int(kib) / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, required=True)
    p.add_argument("--n_train", type=int, default=16)
    p.add_argument("--n_test", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--before_rev", default=BEFORE_REV)
    p.add_argument("--sides", default="ours,before,baseline", help="bench_train sides [ours,before,baseline]")
    p.add_argument(
        "--whole_sides",
        default="ours,before",
        help="sides of the whole run under /usr/bin/time [ours,before]; drop `before` where it cannot fit in memory",
    )
    p.add_argument("--layers", type=int, help="fewer decoder layers, for a quick check of the script itself")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="bench_shapes_") as tmp:
        tmp = Path(tmp)
        build_model(args.shape, tmp / "model", args.layers)
        data = tmp / "long.json"
        data.write_text(json.dumps(long_records(args.n_train + args.n_test, args.data)))
        train_json = tmp / "train.json"
        subprocess.run(
            [
                py,
                str(REPO / "benchmarks" / "bench_train.py"),
                "--model",
                str(tmp / "model"),
                "--data",
                str(data),
                "--n_train",
                str(args.n_train),
                "--batch_size",
                str(args.batch_size),
                "--padding_n",
                "0",
                "--order",
                args.sides,
                "--before_rev",
                args.before_rev,
                "--json",
                str(train_json),
            ],
            check=True,
        )
        run_args = [
            "train",
            "--model",
            str(tmp / "model"),
            "--data",
            str(data),
            "--n_train",
            str(args.n_train),
            "--n_test",
            str(args.n_test),
            "--batch_size",
            str(args.batch_size),
            "--max_new_tokens",
            str(args.max_new_tokens),
            "--method",
            "olora+",
            "--lr_ratio",
            "4",
            "--overwrite",
        ]
        before_src = extract_revision(args.before_rev, tmp / "before_tree")
        whole = {}
        for side, src in (("ours", REPO / "src"), ("before", before_src)):
            if side not in args.whole_sides.split(","):
                continue
            env = {**os.environ, "PYTHONPATH": str(src)}
            whole[side] = timed_run([py, "-m", "oloraplus.cli", *run_args, "--output_dir", str(tmp / side)], env)
            m = json.loads((tmp / side / "metrics.json").read_text())
            whole[side] += (m["train_tokens_per_s"], m["eval_loss"])
        print(
            f"\nwhole run ({args.n_train} train x 512 tokens, batch {args.batch_size}, {args.n_test} test, "
            f"{args.max_new_tokens} new tokens), /usr/bin/time:"
        )
        for side, (wall, gib, tps, loss) in whole.items():
            print(
                f"  {side:<7} {wall:8.1f} s   peak RSS {gib:6.2f} GiB   train {tps:7.1f} tokens/s   test loss {loss:.4f}"
            )
        if {"ours", "before"} <= whole.keys():
            print(
                f"  ours/before: wall {whole['ours'][0] / whole['before'][0]:.2f}x, peak RSS "
                f"{whole['ours'][1] / whole['before'][1]:.2f}x"
            )
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {"args": vars(args), "whole_run": whole, "train": json.loads(train_json.read_text())}, indent=2
                )
                + "\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

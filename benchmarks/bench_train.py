"""Training throughput and peak memory: our pipeline vs before (this project at an earlier commit) vs the plain
PEFT + Trainer baseline, one run.

Before: `run_training` of the revision --before_rev (default ea9ebf0, the last commit before the
lean-runs issue), extracted with `git archive` into a temporary folder and run in its own
subprocess with its own defaults (length-grouped padded batches, dropout 0.05), so "today's
figure" is measured in the same run, on the same machine, not copied from a document.

Why: the issue asks whether `run_training` (length-grouped batches, our LoRA+
groups, precision auto) beats what a user writes by hand with PEFT's OLoRA init,
PEFT's LoRA+ optimizer and a stock Trainer on randomly ordered, padded batches.
Both train SmolLM2-135M on the same Alpaca examples (same split, same tokens),
same r/alpha/dropout/targets, lr, schedule, batch and steps, in fp32. Each runs
in its own subprocess so their peak memories are measured apart; this driver
prints the ratios, and the MFU of each against this machine's fp32 matmul peak
measured in the same run.

    python benchmarks/bench_train.py                         # 64 examples, 8 steps of 8
    python benchmarks/bench_train.py --n_train 48 --batch_size 4 --threads 1   # the run in docs/benchmarks.md
    python benchmarks/bench_train.py --n_train 32 --profile  # + torch.profiler top ops
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# run from a checkout without installing; the "before" worker imports an older revision's src instead
SRC = sys.argv[sys.argv.index("--src") + 1] if "--src" in sys.argv else str(REPO / "src")
sys.path.insert(0, SRC)
BEFORE_REV = "ea9ebf0"

from common import DEFAULT_DATA  # noqa: E402

SPLIT_SEED = 42  # our config's default split seed; the baseline uses the same split
N_TEST = 1  # the test split only has to exist: our run evaluates it (eval loss on one example, no generation)


# ---------------------------------------------------------------- measuring
class PeakRSS:
    """High-water RSS over a block, sampled every `interval` s by a thread with psutil; CPU time of the block.

    RSS is cheap to read (/proc/PID/statm, ~0.04 ms). USS (memory private to the
    process) is read only at the start and the end: psutil gets it from
    /proc/PID/smaps_rollup, which walks the page tables, ~80 ms of kernel time per
    call at 4 GiB, so sampling it would itself load the CPU being measured. RSS and
    USS differ by file-backed pages: safetensors weights are memory-mapped and read
    pages stay resident (clean, reclaimable) while the mapping lives. ru_maxrss
    (resource.getrusage) is the process-lifetime RSS peak, model loading included.
    """

    def __init__(self, interval: float = 0.005):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start_uss = self.proc.memory_full_info().uss
        self.start_rss = self.peak = self.proc.memory_info().rss
        self.cpu0 = time.process_time()
        self.ru0 = resource.getrusage(resource.RUSAGE_SELF)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cpu_seconds = time.process_time() - self.cpu0  # user + system CPU of every thread of the process
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.user_s, self.sys_s = ru.ru_utime - self.ru0.ru_utime, ru.ru_stime - self.ru0.ru_stime
        self.minor_faults = ru.ru_minflt - self.ru0.ru_minflt
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.end_uss = self.proc.memory_full_info().uss


def lifetime_max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def matmul_peak(n: int = 2048, seconds: float = 3.0) -> tuple[float, float]:
    """Best fp32 FLOP/s of n x n matmuls over ~`seconds`: (per wall second, per CPU second of this process).

    The second is what the cores deliver while this process runs on them, so it holds
    when other users' jobs take CPU time away (each pipeline's CPU-time MFU uses it).
    """
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    c = a @ b  # warm-up
    best = best_cpu = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(3):
            torch.mm(a, b, out=c)
        flops = 3 * 2 * n**3
        best = max(best, flops / (time.perf_counter() - t0))
        best_cpu = max(best_cpu, flops / max(time.process_time() - c0, 1e-9))
    return best, best_cpu


def matmul_params(model) -> tuple[int, int]:
    """(frozen base weights used in matmuls, incl. a tied lm_head; LoRA adapter weights)."""
    from torch import nn

    base = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if ".lora_A." in name + "." or ".lora_B." in name + ".":
                lora += module.weight.numel()
            else:
                base += module.weight.numel()
    return base, lora


class CountingCollator:
    """Wraps a collator: counts padded (processed) and real (attention-mask) tokens of every batch."""

    def __init__(self, inner):
        self.inner = inner
        self.padded = 0
        self.real = 0
        self.batches = 0

    def __call__(self, features):
        batch = self.inner(features)
        self.padded += int(batch["input_ids"].numel())
        self.real += int(batch["attention_mask"].sum())
        self.batches += 1
        return batch


def profiled(fn, enabled: bool, rows: int = 15) -> tuple[Any, str | None]:
    """Run fn(); with `enabled`, under torch.profiler, returning its top ops by self CPU time."""
    if not enabled:
        return fn(), None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# ---------------------------------------------------------------- the two pipelines (workers)
def worker_ours(args: argparse.Namespace, out_dir: Path, before: bool = False) -> dict[str, Any]:
    """`run_training` as a user runs it, with its revision's defaults (before: that revision's, dropout 0.05)."""
    from oloraplus import train as train_mod
    from oloraplus.config import build_config

    counter: dict[str, CountingCollator] = {}

    def counting(cls):  # count the tokens of whichever collator run_training builds (padded or packed)
        class Counted(CountingCollator):
            def __init__(self, *a):
                super().__init__(cls(*a))
                counter["c"] = self

        return Counted

    train_mod.PadCollator = counting(train_mod.PadCollator)
    if hasattr(train_mod, "PackCollator"):
        train_mod.PackCollator = counting(train_mod.PackCollator)
    sampled: dict[str, Any] = {}
    original_train = train_mod.OLoRAPlusTrainer.train

    def train_with_probe(self, *a, **kw):  # peak RSS and profile over trainer.train() only
        with PeakRSS() as rss:
            result, table = profiled(lambda: original_train(self, *a, **kw), args.profile)
        # counted now: run_training merges the adapter into the base right after training
        sampled.update(
            peak=rss.peak,
            start=rss.start_rss,
            end_uss=rss.end_uss,
            start_uss=rss.start_uss,
            cpu=rss.cpu_seconds,
            user=rss.user_s,
            sys=rss.sys_s,
            faults=rss.minor_faults,
            table=table,
            params=matmul_params(self.model),
        )
        return result

    train_mod.OLoRAPlusTrainer.train = train_with_probe
    cfg = build_config(
        None,
        {
            "model": args.model,
            "data": args.data,
            "n_train": args.n_train,
            "n_test": N_TEST,
            "split_seed": SPLIT_SEED,
            "method": "olora+",
            "lr_ratio": args.lr_ratio,
            "rank": args.rank,
            "alpha": args.alpha,
            "dropout": args.before_dropout if before else args.dropout,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "max_steps": args.max_steps,
            "max_length": args.max_length,
            "seed": args.seed,
            "dynamics_every": args.dynamics_every,
            "generate": False,
            "output_dir": str(out_dir / "ours_run"),
        },
    )
    t0 = time.perf_counter()
    metrics = train_mod.run_training(cfg, overwrite=True)
    total = time.perf_counter() - t0
    base_p, lora_p = sampled["params"]
    c = counter["c"]
    return {
        "pipeline": "before" if before else "ours",
        "precision": metrics["precision"],
        "steps": metrics["train_steps"],
        "train_seconds": metrics["train_seconds"],
        "trainer_tokens": metrics["train_tokens"],
        "real_tokens": c.real,
        "padded_tokens": c.padded,
        "train_cpu_seconds": sampled["cpu"],
        "train_user_seconds": sampled["user"],
        "train_sys_seconds": sampled["sys"],
        "train_minor_faults": sampled["faults"],
        "train_peak_rss": sampled["peak"],
        "rss_before_train": sampled["start"],
        "uss_after_train": sampled["end_uss"],
        "uss_before_train": sampled["start_uss"],
        "lifetime_max_rss": lifetime_max_rss(),
        "whole_call_seconds": total,
        "base_matmul_params": base_p,
        "lora_params": lora_p,
        "final_train_loss": metrics["final_train_loss"],
        "profile": sampled["table"],
    }


def baseline_trainer(args: argparse.Namespace, out_dir: Path, n_test: int = N_TEST):
    """What a user writes by hand: PEFT OLoRA init + PEFT LoRA+ optimizer + stock Trainer, padded random batches.

    Returns (trainer, counting collator, tokenizer, records, split)."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from oloraplus.adapters import default_target_modules
    from oloraplus.data import load_records, split_indices, tokenize_records
    from oloraplus.models import load_base

    records = load_records(args.data)
    split = split_indices(len(records), args.n_train, n_test, 0.0, SPLIT_SEED, args.data)
    model, tok = load_base(args.model)
    examples, _ = tokenize_records(tok, [records[i] for i in split.train], args.max_length)
    train_ds = datasets.Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    set_seed(args.seed)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=default_target_modules(model),  # the same targets our pipeline adapts
        init_lora_weights="olora",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    optimizer = create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=args.lr, loraplus_lr_ratio=args.lr_ratio, weight_decay=0.0
    )
    training_args = TrainingArguments(
        output_dir=str(out_dir / "baseline_run"),
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        max_steps=args.max_steps,
        warmup_steps=0.03,  # our default warmup_ratio
        lr_scheduler_type="linear",
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        seed=args.seed,
        data_seed=args.seed,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
    )
    collator = CountingCollator(DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        data_collator=collator,
        optimizers=(optimizer, None),
    )
    return trainer, collator, tok, records, split


def worker_baseline(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    trainer, collator, _, _, _ = baseline_trainer(args, out_dir)
    model = trainer.model
    with PeakRSS() as rss:
        t1 = time.perf_counter()
        _, table = profiled(trainer.train, args.profile)
        train_seconds = time.perf_counter() - t1
    base_p, lora_p = matmul_params(model)
    history = trainer.state.log_history
    return {
        "pipeline": "baseline",
        "precision": "fp32",
        "steps": trainer.state.global_step,
        "train_seconds": train_seconds,
        "trainer_tokens": int(trainer.state.num_input_tokens_seen),
        "real_tokens": collator.real,
        "padded_tokens": collator.padded,
        "train_cpu_seconds": rss.cpu_seconds,
        "train_user_seconds": rss.user_s,
        "train_sys_seconds": rss.sys_s,
        "train_minor_faults": rss.minor_faults,
        "train_peak_rss": rss.peak,
        "rss_before_train": rss.start_rss,
        "uss_after_train": rss.end_uss,
        "uss_before_train": rss.start_uss,
        "lifetime_max_rss": lifetime_max_rss(),
        "whole_call_seconds": time.perf_counter() - t0,
        "base_matmul_params": base_p,
        "lora_params": lora_p,
        "final_train_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        "profile": table,
    }


# ---------------------------------------------------------------- driver
def flops_per_real_token(base_p: int, lora_p: int) -> float:
    """Frozen base: forward 2·P, backward 2·P (activation gradients only, no weight gradients);
    LoRA weights train fully: 6·P_lora. Attention-score matmuls are left out (~5% at ~100-token sequences)."""
    return 4.0 * base_p + 6.0 * lora_p


def epoch_padding(args: argparse.Namespace, n: int) -> dict[str, float]:
    """Padding of one epoch of n examples under each sampler, counted without training (cheap at any n).

    Ours: transformers' own length grouping (megabatches of min(n // (4·batch), 50)·batch, sorted),
    padded to a multiple of 8 like PadCollator; baseline: random batches padded to their longest.
    """
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from oloraplus.data import load_records, split_indices, tokenize_records
    from oloraplus.models import load_base

    records = load_records(args.data)
    split = split_indices(len(records), n, N_TEST, 0.0, SPLIT_SEED, args.data)
    _, tok = load_base(args.model)
    lengths = [e["length"] for e in tokenize_records(tok, [records[i] for i in split.train], args.max_length)[0]]
    g = torch.Generator().manual_seed(args.seed)
    orders = {
        "ours": (get_length_grouped_indices(lengths, args.batch_size, generator=g), 8),
        "baseline": (torch.randperm(len(lengths), generator=g).tolist(), 1),
    }
    real = sum(lengths)
    out = {}
    for kind, (order, multiple) in orders.items():
        padded = 0
        for i in range(0, len(order), args.batch_size):
            batch = order[i : i + args.batch_size]
            padded += -(-max(lengths[j] for j in batch) // multiple) * multiple * len(batch)
        out[kind] = 1 - real / padded
    return out


def extract_revision(rev: str, into: Path) -> Path:
    """The src/ folder of an earlier revision of this repository, for the "before" worker."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def run_worker(kind: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    result = tmp / f"{kind}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--result", str(result), "--tmp", str(tmp)]
    if kind == "before":
        cmd += ["--src", str(extract_revision(args.before_rev, tmp / "before_tree"))]
    for key in (
        "model",
        "data",
        "n_train",
        "max_steps",
        "batch_size",
        "rank",
        "alpha",
        "dropout",
        "before_dropout",
        "lr",
        "lr_ratio",
        "max_length",
        "seed",
        "threads",
        "dynamics_every",
    ):
        cmd += [f"--{key}", str(getattr(args, key))]
    if args.profile:
        cmd.append("--profile")
    log = tmp / f"{kind}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"{kind} worker failed with exit code {proc.returncode} (log above)")
    out = json.loads(result.read_text())
    out["subprocess_seconds"] = time.perf_counter() - t0
    return out


def report(results: dict[str, dict[str, Any]], peaks: list[tuple[float, float]], args: argparse.Namespace) -> dict:
    peak = max(p[0] for p in peaks)
    peak_cpu = max(p[1] for p in peaks)
    rows = {}
    for kind, r in results.items():
        per_token = flops_per_real_token(r["base_matmul_params"], r["lora_params"])
        useful = per_token * r["real_tokens"] / r["train_seconds"]
        processed = per_token * r["padded_tokens"] / r["train_seconds"]
        rows[kind] = {
            "real_tokens_per_s": r["real_tokens"] / r["train_seconds"],
            "real_tokens_per_cpu_s": r["real_tokens"] / r["train_cpu_seconds"],
            "useful_flops_per_s": useful,
            "mfu": useful / peak,
            "mfu_cpu_time": per_token * r["real_tokens"] / r["train_cpu_seconds"] / peak_cpu,
            "hardware_flops_per_s": processed,
            "hfu": processed / peak,
            "padding_fraction": 1 - r["real_tokens"] / r["padded_tokens"],
        }
    o = results["ours"]
    others = [k for k in ("before", "baseline") if k in results]
    kinds = ["ours", *others]
    print(
        f"\n{args.model}, {args.n_train} Alpaca examples, {o['steps']} steps of batch {args.batch_size}, "
        f"r={args.rank}, alpha={args.alpha:g}, lambda={args.lr_ratio:g}, dropout ours/baseline {args.dropout:g}, "
        f"before {args.before_dropout:g}; precision " + ", ".join(f"{k} {results[k]['precision']}" for k in kinds)
    )
    print(
        f"fp32 matmul peak ({args.peak_n}x{args.peak_n}): {peaks[0][0] / 1e9:.1f} GFLOP/s before, "
        f"{peaks[1][0] / 1e9:.1f} after, per wall second; {peaks[0][1] / 1e9:.1f} and {peaks[1][1] / 1e9:.1f} "
        "per CPU second; MFU uses the larger of each"
    )
    print(
        f"FLOPs per real token: 4·P_base + 6·P_lora = 4·{o['base_matmul_params'] / 1e6:.1f}M + "
        f"6·{o['lora_params'] / 1e6:.2f}M\n"
    )
    header = f"{'':<24}" + "".join(f"{k:>14}" for k in kinds) + "".join(f"{'ours/' + k:>16}" for k in others)
    print(header)
    print("-" * len(header))

    def line(label: str, values: dict[str, float], fmt: str, ratio: bool = True) -> None:
        cells = "".join(f"{fmt.format(values[k]):>14}" for k in kinds)
        ratios = "".join(f"{values['ours'] / values[k]:>15.2f}x" if ratio and values[k] else " " * 16 for k in others)
        print(f"{label:<24}{cells}{ratios}")

    def field(key: str) -> dict[str, float]:
        return {k: results[k][key] for k in kinds}

    def derived(key: str) -> dict[str, float]:
        return {k: rows[k][key] for k in kinds}

    line("train seconds", field("train_seconds"), "{:.1f}")
    line("real tokens", field("real_tokens"), "{:,.0f}")
    line("padded tokens", field("padded_tokens"), "{:,.0f}")
    line("padding fraction", derived("padding_fraction"), "{:.1%}", False)
    line("real tokens/s", derived("real_tokens_per_s"), "{:.1f}")
    line("train CPU seconds", field("train_cpu_seconds"), "{:.1f}")
    line("  of which user s", field("train_user_seconds"), "{:.1f}")
    line("  of which system s", field("train_sys_seconds"), "{:.1f}")
    line(
        "  kernel share of CPU",
        {k: results[k]["train_sys_seconds"] / results[k]["train_cpu_seconds"] for k in kinds},
        "{:.1%}",
        False,
    )
    line("  minor page faults", field("train_minor_faults"), "{:,.0f}")
    line("real tokens/CPU-s", derived("real_tokens_per_cpu_s"), "{:.1f}")
    line("MFU (real tokens)", derived("mfu"), "{:.1%}", False)
    line("MFU, CPU time", derived("mfu_cpu_time"), "{:.1%}", False)
    line("HFU (padded tokens)", derived("hfu"), "{:.1%}", False)
    for label, key in (
        ("train peak RSS", "train_peak_rss"),
        ("RSS before train", "rss_before_train"),
        ("USS before train", "uss_before_train"),
        ("USS after train", "uss_after_train"),
        ("lifetime max RSS", "lifetime_max_rss"),
    ):
        line(label + " (MiB)", {k: results[k][key] / 2**20 for k in kinds}, "{:,.0f}")
    line("whole subprocess s", field("subprocess_seconds"), "{:.1f}")
    print("\nfinal train loss: " + ", ".join(f"{k} {results[k]['final_train_loss']}" for k in kinds))
    print(
        "train peak RSS: psutil sampling thread over trainer.train() (every 5 ms); USS: psutil, before and after; "
        "lifetime: resource.getrusage ru_maxrss (the whole process, loading included); CPU seconds: "
        "time.process_time over trainer.train()"
    )
    summary = {
        "results": results,
        "derived": rows,
        "peak_flops": peak,
        "peak_flops_per_cpu_s": peak_cpu,
        "load_average": list(os.getloadavg()),
    }
    for k in others:
        speedup = rows["ours"]["real_tokens_per_s"] / rows[k]["real_tokens_per_s"]
        cpu_speedup = rows["ours"]["real_tokens_per_cpu_s"] / rows[k]["real_tokens_per_cpu_s"]
        mem = o["lifetime_max_rss"] / results[k]["lifetime_max_rss"]
        print(
            f"ours vs {k}: real tokens/s {speedup:.2f}x wall, {cpu_speedup:.2f}x per CPU-second; "
            f"lifetime peak RSS {mem:.2f}x"
        )
        summary[f"vs_{k}"] = {"speedup": speedup, "cpu_speedup": cpu_speedup, "lifetime_peak_rss_ratio": mem}
    for kind, r in results.items():
        if r.get("profile"):
            print(f"\n== torch.profiler, {kind}: top ops by self CPU time (timings above include profiler overhead)")
            print(r["profile"])
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_train", type=int, default=64, help="training examples, same for both [64]")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps [one epoch: ceil(n_train/batch_size)]")
    p.add_argument("--batch_size", type=int, default=8, help="per-step batch, same for both (no accumulation) [8]")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=None, help="ours and the baseline [our default]")
    p.add_argument("--before_dropout", type=float, default=0.05, help="before: its default [0.05]")
    p.add_argument("--before_rev", default=BEFORE_REV, help=f"the revision 'before' runs [{BEFORE_REV}]")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lr_ratio", type=float, default=4.0, help="LoRA+ lambda [4]")
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=DEFAULT_DATA, help="Alpaca JSON [$OLORAPLUS_DATA or ../shared/data/alpaca/...]")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0: torch's default) [0]")
    p.add_argument(
        "--dynamics_every",
        type=int,
        default=10,
        help="ours: learning-dynamics snapshot every N steps (our default 10; the baseline has none) [10]",
    )
    p.add_argument("--peak_n", type=int, default=2048, help="matmul size for the fp32 peak [2048]")
    p.add_argument("--profile", action="store_true", help="torch.profiler over each training run; prints top ops")
    p.add_argument(
        "--padding_n",
        type=int,
        default=1000,
        help="also count (not time) one epoch's padding at this n, e.g. the protocol's 1000; 0: skip [1000]",
    )
    p.add_argument(
        "--order", default="ours,before,baseline", help="which pipelines run, in order [ours,before,baseline]"
    )
    p.add_argument("--json", help="also write all figures to this JSON file")
    p.add_argument("--worker", choices=["ours", "before", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.max_steps is None:
        args.max_steps = math.ceil(args.n_train / args.batch_size)
    if args.dropout is None:
        from oloraplus.config import AdapterConfig

        args.dropout = AdapterConfig().dropout
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:  # one pipeline, in its own process
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.worker == "baseline":
            out = worker_baseline(args, Path(args.tmp))
        else:
            out = worker_ours(args, Path(args.tmp), before=args.worker == "before")
        Path(args.result).write_text(json.dumps(out))
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    peaks = [matmul_peak(args.peak_n)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for kind in [k.strip() for k in args.order.split(",")]:
            print(f"running {kind} ...", flush=True)
            results[kind] = run_worker(kind, args, Path(tmp))
    peaks.append(matmul_peak(args.peak_n))
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    summary = report(results, peaks, args)
    if args.padding_n:
        pad = epoch_padding(args, args.padding_n)
        summary["epoch_padding"] = {"n": args.padding_n, **pad}
        print(
            f"\npadding of one epoch of {args.padding_n} examples, batch {args.batch_size} (counted, not timed): "
            f"ours {pad['ours']:.1%}, baseline {pad['baseline']:.1%} -> baseline processes "
            f"{(1 - pad['ours']) / (1 - pad['baseline']):.2f}x the tokens ours does"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

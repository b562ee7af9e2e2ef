"""Evaluation: per-example eval loss, batched greedy generation, corpus BLEU and ROUGE-1/2/L (scoring.py).

Per-example numbers (loss, ROUGE, BLEU sufficient statistics) are kept so the
report can run a paired bootstrap over test examples without recomputing.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from oloraplus.adapters import merge_saved_adapter
from oloraplus.config import load_config
from oloraplus.data import PadCollator, length_sorted_batches, tokenize_example
from oloraplus.distributed import ALONE, Ranks
from oloraplus.errors import OLoRAPlusError
from oloraplus.fsutil import atomic_write_json, atomic_write_jsonl
from oloraplus.generation import generate_answers, linears_in_onednn
from oloraplus.loss import batch_token_losses
from oloraplus.models import compute_device
from oloraplus.packing import PackCollator, can_pack, example_bounds, use_packed_attention
from oloraplus.precision import (
    autocast_context,
    lean_process,
    return_freed_memory_when_grown,
    store_frozen_weights_bf16,
)
from oloraplus.prepare import PreparedRun
from oloraplus.runs import recorded_eval_precision

# moved to scoring.py (torch-free, for stats.py); still importable from here until report's tests import them there
from oloraplus.scoring import ROUGE_TYPES, score_texts


@torch.no_grad()
def example_losses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, str]],
    max_length: int,
    batch_size: int,
    bf16: bool = False,
    ranks: Ranks = ALONE,
    onednn: str | None = None,
) -> list[tuple[float, int]]:
    """(summed response-token loss, response tokens) per record; (nan, 0) where truncation left none.

    Known families run packed batches of `batch_size` examples (no padding; packing.py),
    others right-padded ones; the sums agree to float rounding. Under torchrun (`ranks`) each
    rank runs every world-th batch of the same length-sorted batches, so each record's loss
    comes from the very batch it has on one process: the same numbers, on every rank.
    `onednn`: which Linears run through oneDNN (`generation.linears_in_onednn`); None: as when answering on this
    CPU (`generation.onednn_linears_pay`: every Linear on Zen 3 and Zen 4, where the test loss was measured too;
    MKL elsewhere). A loss is not an answer: oneDNN moves it by float rounding only (benchmarks/bench_test_loss.py on
    SmolLM2's 500 test examples: Zen 3 8e-10 relative, 1.09x to 1.18x faster in four pairs; Zen 4 1.4e-9,
    every Linear 1.22x and 1.20x in two pairs, the head alone 1.07x and 1.04x).
    """
    model.eval()
    examples = [tokenize_example(tokenizer, r, max_length) for r in records]
    out: list[tuple[float, int]] = [(math.nan, 0)] * len(records)
    kept = [i for i, ex in enumerate(examples) if ex is not None]
    packed = can_pack(model, max_length)
    if packed:
        use_packed_attention(model)
    collate = PackCollator() if packed else PadCollator(tokenizer.pad_token_id)
    batches = list(length_sorted_batches([examples[i]["length"] for i in kept], batch_size))

    def losses_of(share: list[list[int]]) -> list[list[tuple[float, int]]]:
        return [_batch_losses(model, [examples[kept[j]] for j in ids], collate, packed, bf16) for ids in share]

    with linears_in_onednn(model, "none" if bf16 else onednn):
        shared = ranks.map_shared(losses_of, batches)
    for ids, results in zip(batches, shared):
        for j, result in zip(ids, results):
            out[kept[j]] = result
    return out


def _batch_losses(
    model: PreTrainedModel, examples: list[dict], collate, packed: bool, bf16: bool
) -> list[tuple[float, int]]:
    """(summed response-token loss, response tokens) per example of one batch."""
    return_freed_memory_when_grown()
    device = next(model.parameters()).device
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collate(examples).items()}
    with autocast_context(model, bf16):
        token_loss, mask = batch_token_losses(model, batch)
    if packed:  # which example each labelled target belongs to (the shared prefix, -1 here, holds none)
        bounds = torch.tensor(example_bounds(batch), device=device)
        owner = torch.full((batch["input_ids"].shape[1],), -1, device=device)
        owner[bounds[0] :] = torch.repeat_interleave(torch.arange(len(examples), device=device), bounds.diff())
        row = owner[1:][mask[0]]
        counts = torch.zeros(len(examples), dtype=torch.long, device=device).index_add_(0, row, torch.ones_like(row))
    else:
        row = mask.nonzero()[:, 0]
        counts = mask.sum(1)
    sums = torch.zeros(len(examples), device=device).index_add_(0, row, token_loss)
    return [(float(sums[k]), int(counts[k])) for k in range(len(examples))]


def ready_to_evaluate(model: PreTrainedModel, bf16: bool) -> PreTrainedModel:
    """On the compute device, frozen, and under bf16 its matmul weights stored in bf16 (the same bits autocast uses)."""
    model.to(compute_device())
    model.requires_grad_(False)
    if bf16:
        store_frozen_weights_bf16(model)
    return model


def corpus_loss(losses: list[tuple[float, int]]) -> float:
    """Token-weighted mean: the eval loss a Trainer reports for the same tokens."""
    total = sum(s for s, n in losses if n)
    count = sum(n for _, n in losses)
    return total / count if count else math.nan


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, str]],
    indices: list[int],
    max_length: int,
    batch_size: int,
    max_new_tokens: int,
    bf16: bool,
    generate: bool = True,
    ranks: Ranks = ALONE,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics and one prediction row per test record; under torchrun (`ranks`) split over ranks, whole on each."""
    t0 = time.perf_counter()
    losses = example_losses(model, tokenizer, records, max_length, batch_size, bf16, ranks)
    metrics: dict[str, Any] = {"eval_loss": corpus_loss(losses), "eval_loss_seconds": time.perf_counter() - t0}
    rows = [
        {
            "index": idx,
            "instruction": r["instruction"],
            "input": r["input"],
            "reference": r["output"],
            "loss": (s / n) if n else None,
            "loss_sum": s if n else None,
            "n_tokens": n,
        }
        for idx, r, (s, n) in zip(indices, records, losses)
    ]
    if generate:
        t1 = time.perf_counter()
        answers, n_generated = generate_answers(
            model, tokenizer, records, max_new_tokens, batch_size, bf16, ranks=ranks
        )
        gen_seconds = time.perf_counter() - t1
        scores = score_texts(answers, [r["output"] for r in records])
        metrics.update({k: scores[k] for k in ("bleu", *ROUGE_TYPES)})
        metrics.update(
            generation_seconds=gen_seconds,
            generated_tokens=n_generated,
            generation_tokens_per_s=n_generated / gen_seconds if gen_seconds else None,
        )
        for row, answer, rouge, stats in zip(
            rows, answers, scores["per_example"]["rouge"], scores["per_example"]["bleu_stats"]
        ):
            row.update(prediction=answer, **rouge, bleu_stats=stats)
    return metrics, rows


def evaluate_run(
    run_dir: str | None, config_path: str | None, overrides: dict[str, Any], eval_dir: str | None
) -> tuple[dict[str, Any], Path]:
    """`oloraplus evaluate`: the untouched base model plus a run's saved adapter (or the base alone) on the test split."""
    if run_dir is not None:
        run = Path(run_dir)
        adapter = run / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise OLoRAPlusError(f"{run} has no saved adapter (adapter/adapter_config.json)")
        config_path = config_path or str(run / "config.yaml")
        out = Path(eval_dir) if eval_dir else run / "evaluation"
        recorded = run / "metrics.json"
        if "eval_precision" not in overrides and recorded.is_file():
            # the precision the run evaluated in, not a fresh `auto` rule that could choose the other one
            precision = recorded_eval_precision(json.loads(recorded.read_text()))
            if precision in ("fp32", "bf16"):
                overrides = {**overrides, "eval_precision": precision}
    else:
        if not eval_dir:
            raise OLoRAPlusError("evaluating the base model needs --eval_dir (where to write its results)")
        out = Path(eval_dir)
    cfg = load_config(config_path, overrides)
    lean_process()  # before the first matmul: the libraries read its settings once
    prep = PreparedRun(cfg)
    model = prep.model
    if run_dir is not None:
        model = merge_saved_adapter(model, Path(run_dir) / "adapter")
    ready_to_evaluate(model, prep.eval_bf16)
    test = [prep.records[i] for i in prep.split.test]
    metrics, rows = evaluate_model(
        model,
        prep.tokenizer,
        test,
        prep.split.test,
        cfg.data.max_length,
        prep.memory.eval_batch_size,
        cfg.eval.max_new_tokens,
        prep.eval_bf16,
        generate=cfg.eval.generate,
    )
    metrics.update(status="finished", **prep.eval_precision_record())
    atomic_write_jsonl(out / "predictions.jsonl", rows)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics, out

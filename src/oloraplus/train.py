"""One run, config to run folder: the Trainer glue (its callbacks for dynamics and divergence: callbacks.py).

A run folder holds config.yaml (first), then history.json, dynamics.jsonl,
predictions.jsonl, train_loss.png, adapter/, and metrics.json LAST: a folder with
metrics.json is a finished run; one without it is unfinished: it resumes from its last
complete checkpoint (checkpoints.py) when it has one of the same config, else it is redone.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, set_seed

from oloraplus import adapters, checkpoints, plots, tracking
from oloraplus.budget import peak_rss_gb
from oloraplus.callbacks import DivergenceCallback, DynamicsCallback
from oloraplus.config import RunConfig
from oloraplus.data import IGNORE_INDEX, PadCollator, tokenize_records
from oloraplus.distributed import ALONE, Ranks
from oloraplus.errors import OLoRAPlusError
from oloraplus.evaluate import corpus_loss, evaluate_model, example_losses, ready_to_evaluate
from oloraplus.fsutil import atomic_write_json, atomic_write_jsonl, atomic_write_text
from oloraplus.fused_lora import use_fused_lora
from oloraplus.loss import batch_token_losses
from oloraplus.models import load_base
from oloraplus.optim import loraplus_optimizer
from oloraplus.packing import PackCollator, can_pack, is_packed, split_packed, use_packed_attention
from oloraplus.precision import (
    autocast_context,
    device_name,
    lean_process,
    return_freed_memory,
    store_frozen_weights_bf16,
)
from oloraplus.prepare import PreparedRun
from oloraplus.runs import METRICS_FILE, is_finished


def labelled_tokens(batch: dict) -> torch.Tensor:
    """How many next-token targets a causal-LM batch carries (labels shift by one)."""
    return (batch["labels"][..., 1:] != IGNORE_INDEX).sum()


class OLoRAPlusTrainer(Trainer):
    """Trainer whose optimizer has LoRA+ groups, and whose batches may be packed and split.

    Overriding create_optimizer (rather than passing `optimizers=`) keeps the
    DeepSpeed/FSDP paths, which call it themselves, working. A packed batch (see
    packing.py) longer than `micro_batch_tokens` is trained as several packs of whole
    examples, each loss divided by the whole batch's labelled-token count: the same
    gradient as one forward over the batch, with activations bounded by the pack.
    """

    # compute_loss always divides by the batch's labelled tokens: Trainer must not rescale it
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, lr_ratio: float = 1.0, micro_batch_tokens: int = 0, **kwargs: Any):
        self.lr_ratio = lr_ratio
        self.micro_batch_tokens = micro_batch_tokens
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The public loraplus_optimizer, as a stock Trainer user gets it; this trainer's own decay rule."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            self.optimizer = loraplus_optimizer(opt_model, self.args, self.lr_ratio, decay)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        if num_items_in_batch is None:  # a model without loss kwargs: count this batch's share ourselves
            num_items_in_batch = labelled_tokens(inputs) * self.current_gradient_accumulation_steps
        packs = split_packed(inputs, self.micro_batch_tokens) if is_packed(inputs) else [inputs]
        total = None
        for i, part in enumerate(packs):
            # DDP: synchronise gradients once, after the last pack
            sync = contextlib.nullcontext() if i == len(packs) - 1 else self.accelerator.no_sync(model)
            with sync:
                loss = super().training_step(model, part, num_items_in_batch)
            total = loss if total is None else total + loss
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The stock causal-LM loss (summed over labelled tokens / num_items_in_batch), head run only where labelled.

        Falls back to Trainer's own path where that path does more than a plain loss:
        outputs wanted, a label smoother or custom loss, or a wrapped model (DDP, whose
        gradient sync needs the forward to go through the wrapper; FSDP, whose root gathers
        the embeddings and head only in its own forward). Families loss.py does not
        know get the full logits from response_token_losses itself.
        """
        plain = not return_outputs and self.label_smoother is None and self.compute_loss_func is None
        if not plain or self.is_fsdp_enabled or self.accelerator.unwrap_model(model) is not model:
            if is_packed(inputs):  # the packed forward takes positions and boundaries, not a mask
                inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model_accepts_loss_kwargs or num_items_in_batch is None:
                return out
            # the model averaged over this pack's tokens: rescale to the whole batch's count
            scale = labelled_tokens(inputs) / num_items_in_batch
            return (out[0] * scale, *out[1:]) if return_outputs else out * scale
        # accelerate's autocast wraps model.forward, which this path does not call: without this, bf16 trained in fp32
        with autocast_context(model, self.args.bf16):
            token_loss, _ = batch_token_losses(model, inputs)
        if num_items_in_batch is None:
            return token_loss.mean()
        return token_loss.sum() / num_items_in_batch


@dataclass
class RunArguments(TrainingArguments):
    """TrainingArguments plus the run's method and λ.

    Every tracker logs the training arguments as the run's params (MLflow params, W&B config,
    TensorBoard's args text), so a run is found by method and λ there without extra calls.
    """

    method: str = field(default="", metadata={"help": "adapter method (lora, olora+, ...)"})
    lr_ratio: float = field(default=1.0, metadata={"help": "LoRA+ lambda: lora_B learns at lr_ratio x lr"})


@dataclass
class TrainedAdapter:
    """What training leaves for the steps after it."""

    trainer: OLoRAPlusTrainer
    initial: dict[str, tuple[torch.Tensor, torch.Tensor]]  # (A₀, B₀) per layer: dynamics and conversion on save
    dynamics: DynamicsCallback
    divergence: DivergenceCallback
    trackers: tracking.TrackerRun  # closed by run_training once the final scores are logged
    n_examples: int
    n_dropped: int
    seconds: float


def run_training(cfg: RunConfig, overwrite: bool = False) -> dict[str, Any]:
    """Train, evaluate and save one run; returns its metrics (also in run_dir/metrics.json).

    An unfinished run in output_dir (killed, kill -9 included) resumes from its last complete
    checkpoint and ends as an uninterrupted run would; one without a checkpoint starts over.
    A finished run, or a checkpoint made with another config, is refused (OLoRAPlusError,
    nothing touched) unless `overwrite`, which always starts the run over.
    """
    lean_process()
    out = Path(cfg.output_dir)
    if is_finished(out) and not overwrite:
        raise OLoRAPlusError(
            f"{out} already holds a finished run ({METRICS_FILE}); pick another output_dir or pass --overwrite"
        )
    resume = None if overwrite else checkpoints.resumable_checkpoint(out, cfg)
    prep = PreparedRun(cfg)  # everything validated and loaded: a bad input fails here, before any file is written
    tracking.check_report_to(cfg.train.report_to, installed=True)
    start_run_folder(out, cfg, resume)
    if resume is not None:
        print(f"resuming {out} from its checkpoint at step {checkpoints.checkpoint_step(resume)}", flush=True)
    trained = train_adapter(prep, out, resume)
    trackers, metrics = trained.trackers, None
    ranks = Ranks.current()  # under torchrun: rank 0 records and saves, all ranks share the evaluation
    try:
        tokens = int(trained.trainer.state.num_input_tokens_seen)
        diverged = trained.divergence.diverged_step is not None
        # every rank takes part in gathering the adapter whole (FSDP2 shards it; elsewhere its own weights are read)
        state = None if diverged else adapters.adapter_state(trained.trainer.model)
        if ranks.is_main:
            metrics = record_training(prep, trained, out)
            if diverged:
                metrics.update(status="diverged", diverged_step=trained.divergence.diverged_step)
            else:
                # gaussian leaves the base as it was: nothing to convert
                initial = None if cfg.adapter.init == "gaussian" else trained.initial
                adapters.save_adapter(trained.trainer.model, out / "adapter", initial, state)
        diverged = ranks.from_main(diverged)  # the workers wait here until rank 0 has saved the adapter
        if not diverged:
            del trained
            prep.model = None  # the trained copy goes before the evaluated one loads: one model in memory at a time
            gc.collect()  # Trainer and its callbacks hold each other: free the model now, not at some later collection
            return_freed_memory()
            evaluated = evaluate_saved_adapter(prep, out, ranks)
            if metrics is not None:
                metrics.update(evaluated)
        if not ranks.is_main:
            return {"status": "worker", "train_tokens": tokens}
        if resume is not None:  # provenance: the results equal an uninterrupted run's, the path to them did not
            metrics["resumed_from_step"] = checkpoints.checkpoint_step(resume)
        metrics["peak_rss_gb"] = peak_rss_gb()
        atomic_write_json(out / METRICS_FILE, metrics)  # last: marks the run finished
        checkpoints.remove_checkpoints(out)  # nothing left to resume
        return metrics
    finally:  # the trackers get the final scores (if any) and close, also when evaluation failed
        a = cfg.adapter
        trackers.finish(
            metrics, {"method": a.method, "lr_ratio": a.resolved_lr_ratio, "lr": cfg.train.lr, "seed": cfg.train.seed}
        )


def start_run_folder(out: Path, cfg: RunConfig, resume: Path | None = None) -> None:
    """An empty folder holding config.yaml, or for a resumed run its config.yaml, checkpoint and TensorBoard logs
    alone (partial checkpoints, temp files of a kill and results of an evaluation cut short go); rank 0 only."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if resume is not None:
        checkpoints.clear_for_resume(out, resume)
        return
    if out.exists():  # an unfinished (or overwritten) run: start clean so no stale file survives
        shutil.rmtree(out)
    out.mkdir(parents=True)
    atomic_write_text(out / "config.yaml", cfg.to_yaml())


def training_arguments(cfg: RunConfig, prep: PreparedRun, out: Path) -> RunArguments:
    t = cfg.train
    return RunArguments(
        method=cfg.adapter.method,
        lr_ratio=cfg.adapter.resolved_lr_ratio,
        run_name=out.name,  # a study's run id: the trackers' name for the run
        output_dir=str(out),  # Trainer writes its checkpoints here (checkpoint-STEP) and TensorBoard logs (runs/)
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.scheduler,
        weight_decay=t.weight_decay,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must reach DivergenceCallback, not be filtered out
        gradient_checkpointing=prep.memory.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},  # the frozen embeddings give no grad to re-enter with
        # Trainer's own checkpoints; CheckpointCallback marks them complete and keeps the last one
        save_strategy="steps" if t.checkpoint_every else "no",
        save_steps=checkpoints.save_steps(t.checkpoint_every, t.logging_steps) if t.checkpoint_every else 500,
        report_to=tracking.report_to_value(t.report_to),
        bf16=prep.bf16,
        use_cpu=not torch.cuda.is_available(),
        seed=t.seed,
        data_seed=t.seed,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def train_adapter(prep: PreparedRun, out: Path, resume: Path | None = None) -> TrainedAdapter:
    """Tokenize the training split, attach and initialize the adapter, train it with LoRA+ groups.

    `resume`: a checkpoint of this run; the adapter is attached and initialized as at the
    start (the same A₀, B₀ and base weights), then Trainer loads the checkpoint on top.
    """
    import datasets

    cfg = prep.cfg
    train_records = [prep.records[i] for i in prep.split.train]
    examples, dropped = tokenize_records(prep.tokenizer, train_records, cfg.data.max_length)
    if not examples:
        raise OLoRAPlusError(
            f"every training example is longer than max_length {cfg.data.max_length} before its answer"
        )
    set_seed(cfg.train.seed)
    a = cfg.adapter
    model = adapters.attach_adapter(prep.model, a.init, a.rank, a.alpha, a.dropout, a.target_modules)
    initial = adapters.adapter_snapshot(model)
    dynamics = DynamicsCallback(initial, cfg.train.dynamics_every)
    progress = checkpoints.read_progress(resume)
    dynamics.rows = progress.get("dynamics", [])
    seconds_before = progress.get("train_seconds", 0.0)
    saver = checkpoints.CheckpointCallback(out, cfg, dynamics.rows, seconds_before)
    divergence = DivergenceCallback()
    packing = cfg.train.packing and can_pack(model, cfg.data.max_length)  # else padded batches, as before
    if packing:
        use_packed_attention(model)
    if cfg.train.fused_lora:
        use_fused_lora(model)  # plain fp32 LoRA on a CPU without PEFT's scaling passes, same bits
    trainer = OLoRAPlusTrainer(
        model=model,
        args=training_arguments(cfg, prep, out),
        train_dataset=datasets.Dataset.from_list(examples),
        data_collator=PackCollator() if packing else PadCollator(prep.tokenizer.pad_token_id),
        processing_class=prep.tokenizer,
        callbacks=[dynamics, divergence, saver],
        lr_ratio=a.resolved_lr_ratio,
        micro_batch_tokens=prep.memory.micro_batch_tokens,
    )
    if prep.bf16 and not trainer.is_fsdp_enabled:  # FSDP shards flat buffers of one dtype: it keeps fp32
        store_frozen_weights_bf16(model)
    trackers = tracking.TrackerRun(trainer)  # their runs stay open for the final scores, logged after evaluation
    t0 = time.perf_counter()
    try:
        if progress.get("training_done"):  # killed after training, while evaluating: nothing left to train
            checkpoints.load_trained(trainer, resume)
        else:
            trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    except BaseException:
        trackers.finish()
        raise
    trackers.follow(trainer)
    seconds = seconds_before + time.perf_counter() - t0
    return TrainedAdapter(trainer, initial, dynamics, divergence, trackers, len(examples), dropped, seconds)


def record_training(prep: PreparedRun, trained: TrainedAdapter, out: Path) -> dict[str, Any]:
    """history.json, dynamics.jsonl and the loss curve; the training half of metrics.json."""
    cfg, state = prep.cfg, trained.trainer.state
    history = [dict(h) for h in state.log_history]
    atomic_write_json(out / "history.json", history)
    atomic_write_jsonl(out / "dynamics.jsonl", trained.dynamics.rows)
    title = f"{cfg.adapter.method} λ={cfg.adapter.resolved_lr_ratio:g}"
    plots.train_loss_curve(history, out / "train_loss.png", title=title)
    tokens = int(state.num_input_tokens_seen)  # summed over processes by Trainer
    return {
        "method": cfg.adapter.method,
        "init": cfg.adapter.init,
        "lr_ratio": cfg.adapter.resolved_lr_ratio,
        "lr": cfg.train.lr,
        "seed": cfg.train.seed,
        "n_train": trained.n_examples,
        "n_train_dropped": trained.n_dropped,
        "n_val": len(prep.split.val),
        "n_test": len(prep.split.test),
        "train_steps": state.global_step,
        "train_seconds": trained.seconds,
        "train_tokens": tokens,
        "train_tokens_per_s": tokens / trained.seconds if trained.seconds else None,
        "precision": "bf16" if prep.bf16 else "fp32",
        "precision_choice": prep.precision_choice,
        **prep.eval_precision_record(),
        "memory_plan": prep.memory.to_dict(),
        "peak_rss_gb_training": peak_rss_gb(),  # beside the whole run's peak: which phase sets it
        "device": device_name(),  # timings of one study can come from several machines
        "final_train_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
    }


def evaluate_saved_adapter(prep: PreparedRun, out: Path, ranks: Ranks = ALONE) -> dict[str, Any]:
    """Validation loss, and unless this is a selection run, test loss, answers and scores (predictions.jsonl).

    Under torchrun every rank calls it and evaluates its share (`ranks`); only rank 0 writes.

    Evaluates exactly what a user gets, and what `oloraplus evaluate` loads: the original base
    with the saved adapter merged (one matmul per layer instead of three: faster generation).
    In bf16 the trained W_res + s·BA and the original W + s·(BA − B₀A₀) would round differently.
    """
    cfg, split, tok, batch = prep.cfg, prep.split, prep.tokenizer, prep.memory.eval_batch_size
    merged = adapters.merge_saved_adapter(load_base(cfg.model.name, cfg.model.cache_dir)[0], out / "adapter")
    ready_to_evaluate(merged, prep.eval_bf16)
    metrics: dict[str, Any] = {}
    if split.val:
        val_records = [prep.records[i] for i in split.val]
        val = example_losses(merged, tok, val_records, cfg.data.max_length, batch, prep.eval_bf16, ranks)
        metrics["val_loss"] = corpus_loss(val)
    if not cfg.eval.test:  # a selection run: validation only, the test split stays unread
        metrics["status"] = "finished" if math.isfinite(metrics.get("val_loss", 0.0)) else "diverged"
        return metrics
    test = [prep.records[i] for i in split.test]
    eval_metrics, rows = evaluate_model(
        merged,
        tok,
        test,
        split.test,
        cfg.data.max_length,
        batch,
        cfg.eval.max_new_tokens,
        prep.eval_bf16,
        generate=cfg.eval.generate,
        ranks=ranks,
    )
    if ranks.is_main:
        atomic_write_jsonl(out / "predictions.jsonl", rows)
    return {**metrics, **eval_metrics, "status": "finished" if math.isfinite(eval_metrics["eval_loss"]) else "diverged"}

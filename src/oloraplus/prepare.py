"""One run's inputs, validated and loaded before any file is written.

Records and split, base model and tokenizer, adapter targets, precision and memory
plan: what train.py trains on, what evaluate.py evaluates a saved adapter with, and
what study.py checks once before a grid starts; and a finished run's base model with
its adapter merged, for chat.py and export.py. A bad input fails here, early.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from oloraplus import adapters
from oloraplus.budget import plan_memory
from oloraplus.config import RunConfig, load_config
from oloraplus.errors import OLoRAPlusError
from oloraplus.loss import LOGITS_CHUNK_BYTES
from oloraplus.models import load_base
from oloraplus.precision import resolve_eval_precision, resolve_precision
from oloraplus.records import Split, load_records, split_indices


class PreparedRun:
    """Everything validated and loaded before a single file is written."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.records = load_records(cfg.data.source)
        self.split: Split = split_indices(
            len(self.records),
            cfg.data.n_train,
            cfg.data.n_test,
            cfg.data.val_fraction,
            cfg.data.split_seed,
            cfg.data.source,
        )
        self.model, self.tokenizer = load_base(cfg.model.name, cfg.model.cache_dir)
        targets = cfg.adapter.target_modules or adapters.default_target_modules(self.model)
        adapters.check_targets(self.model, targets, cfg.adapter.rank)
        self.bf16, self.precision_choice = resolve_precision(cfg.model.precision)
        self.eval_bf16, self.eval_precision_choice = resolve_eval_precision(cfg.eval.precision, self.bf16)
        t, d, e = cfg.train, cfg.data, cfg.eval
        self.memory = plan_memory(
            self.model,
            t.max_memory_gb,
            t.micro_batch_tokens,
            d.max_length,
            t.batch_size,
            e.eval_batch_size,
            e.max_new_tokens,
            LOGITS_CHUNK_BYTES,
        )

    def eval_precision_record(self) -> dict[str, str]:
        """What a run's and an evaluation's metrics say of the evaluation precision: fp32 on a CPU by default."""
        return {
            "eval_precision": "bf16" if self.eval_bf16 else "fp32",
            "eval_precision_choice": self.eval_precision_choice,
        }


def checked_run(run_dir: str | Path) -> tuple[Path, RunConfig]:
    """A run folder's saved adapter and its config (config.yaml), checked before anything is loaded or written."""
    run = Path(run_dir)
    if not run.is_dir():
        raise OLoRAPlusError(f"run folder not found: {run}")
    if not (run / "config.yaml").is_file():
        raise OLoRAPlusError(f"{run} is not a run folder (no config.yaml)")
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise OLoRAPlusError(f"{run} has no saved adapter (adapter/adapter_config.json)")
    return adapter, load_config(run / "config.yaml")


def load_tuned(run_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, RunConfig]:
    """The run's ORIGINAL base model (from its config.yaml) with its adapter merged: what `evaluate RUN` loads."""
    adapter, cfg = checked_run(run_dir)
    model, tokenizer = load_base(cfg.model.name, cfg.model.cache_dir)
    return adapters.merge_saved_adapter(model, adapter), tokenizer, cfg

"""One run's inputs, validated and loaded before any file is written.

Records and split, base model and tokenizer, adapter targets, precision and memory
plan: what train.py trains on, what evaluate.py evaluates a saved adapter with, and
what study.py checks once before a grid starts. A bad input fails here, early.
"""

from __future__ import annotations

from oloraplus import adapters
from oloraplus.budget import plan_memory
from oloraplus.config import RunConfig
from oloraplus.data import Split, load_records, split_indices
from oloraplus.loss import LOGITS_CHUNK_BYTES
from oloraplus.models import load_base
from oloraplus.precision import resolve_precision


class PreparedRun:
    """Everything validated and loaded before a single file is written."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.records = load_records(cfg.data.source)
        self.split: Split = split_indices(
            len(self.records), cfg.data.n_train, cfg.data.n_test, cfg.data.val_fraction, cfg.data.split_seed, cfg.data.source
        )
        self.model, self.tokenizer = load_base(cfg.model.name, cfg.model.cache_dir)
        targets = cfg.adapter.target_modules or adapters.default_target_modules(self.model)
        adapters.check_targets(self.model, targets, cfg.adapter.rank)
        self.bf16, self.precision_choice = resolve_precision(cfg.model.precision, self.model)
        t, d, e = cfg.train, cfg.data, cfg.eval
        self.memory = plan_memory(
            self.model, t.max_memory_gb, t.micro_batch_tokens, d.max_length, t.batch_size, e.eval_batch_size,
            e.max_new_tokens, LOGITS_CHUNK_BYTES,
        )

"""Alpaca-format records: load, validate, split, format prompts, tokenize with label masks."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from oloraplus.errors import OLoRAPlusError

FIELDS = ("instruction", "input", "output")
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
IGNORE_INDEX = -100

# The Stanford Alpaca prompt, for models without a chat template.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


# ---------------------------------------------------------------- loading
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise OLoRAPlusError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise OLoRAPlusError(f"{path}: malformed JSON on line {lineno}: {e.msg}") from None
    return rows


def _read_file(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = _read_json(path)
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise OLoRAPlusError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
            return data
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except (OSError, UnicodeDecodeError) as e:
        raise OLoRAPlusError(f"{path}: cannot read file: {e.__class__.__name__}: {e}") from None
    except Exception as e:  # pyarrow's errors for a broken parquet file
        if e.__class__.__module__.startswith("pyarrow"):
            raise OLoRAPlusError(f"{path}: cannot read parquet: {str(e).splitlines()[0]}") from None
        raise
    raise OLoRAPlusError(f"{path}: unsupported data file type '{suffix}' (use {', '.join(FILE_SUFFIXES)})")


def _read_hub(dataset_id: str) -> list[Any]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split="train")
    except Exception as e:  # offline, unknown id, ...: one line, not a traceback
        raise OLoRAPlusError(
            f"cannot load dataset '{dataset_id}' from the hub: {str(e).splitlines()[0][:200]}"
        ) from None
    return [dict(r) for r in ds]


def validate_records(rows: list[Any], source: str) -> list[dict[str, str]]:
    """Keep {instruction, input, output}; name the record and field of the first problem."""
    if not rows:
        raise OLoRAPlusError(f"{source}: the dataset is empty")
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise OLoRAPlusError(f"{source}: record {i} is a {type(row).__name__}, not an object")
        rec = {}
        for key in FIELDS:
            if key not in row:
                raise OLoRAPlusError(f"{source}: record {i} has no field '{key}'")
            if not isinstance(row[key], str):
                raise OLoRAPlusError(
                    f"{source}: record {i} field '{key}' must be a string, got {type(row[key]).__name__}"
                )
            rec[key] = row[key]
        if not rec["instruction"].strip():
            raise OLoRAPlusError(f"{source}: record {i} field 'instruction' is empty")
        records.append(rec)
    return records


def load_records(source: str) -> list[dict[str, str]]:
    """A local file if `source` names one (or looks like a file), else a hub dataset id."""
    path = Path(source).expanduser()
    if path.is_dir():
        raise OLoRAPlusError(f"data source is a folder, not a file: {source}")
    if path.exists() or path.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        if not path.is_file():
            raise OLoRAPlusError(f"data file not found: {source}")
        return validate_records(_read_file(path), str(path))
    return validate_records(_read_hub(source), source)


# ---------------------------------------------------------------- splitting
@dataclass(frozen=True)
class Split:
    """Indices into the loaded records; disjoint by construction."""

    train: list[int]
    val: list[int]
    test: list[int]


def split_indices(
    n_records: int, n_train: int, n_test: int, val_fraction: float, seed: int, source: str = "data"
) -> Split:
    """Seeded permutation: test first, then the training pool (validation carved from it).

    The test set depends only on (seed, n_test, n_records), so changing n_train or
    the validation fraction never moves an example into or out of the test set.
    """
    if n_train + n_test > n_records:
        raise OLoRAPlusError(
            f"{source}: n_train + n_test = {n_train} + {n_test} = {n_train + n_test} exceeds the {n_records} records"
        )
    perm = np.random.default_rng(seed).permutation(n_records).tolist()
    test = perm[:n_test]
    pool = perm[n_test : n_test + n_train]
    n_val = int(round(val_fraction * n_train))
    if val_fraction > 0 and not 0 < n_val < n_train:
        raise OLoRAPlusError(
            f"val_fraction {val_fraction} of n_train {n_train} leaves no validation or no training data"
        )
    return Split(train=pool[n_val:], val=pool[:n_val], test=test)


# ---------------------------------------------------------------- prompts and tokens
def user_message(rec: dict[str, str]) -> str:
    return rec["instruction"] if not rec["input"].strip() else f"{rec['instruction']}\n\n{rec['input']}"


def prompt_text(tokenizer: PreTrainedTokenizerBase, rec: dict[str, str]) -> str:
    """The model's chat template when it has one, else the Alpaca prompt."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message(rec)}], add_generation_prompt=True, tokenize=False
        )
    template = ALPACA_PROMPT_WITH_INPUT if rec["input"].strip() else ALPACA_PROMPT_NO_INPUT
    return template.format(**rec)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, rec: dict[str, str]) -> list[int]:
    return text_prompt_ids(tokenizer, prompt_text(tokenizer, rec))


def conversation_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """A multi-turn prompt ({role: user|assistant, content} messages, the last one the user's) in the run's format.

    With a chat template: the template over all messages. Without one, the Alpaca prompt grown turn by turn:
    the preamble once, then per exchange "### Instruction:\n{user}\n\n### Response:\n{answer}", exchanges
    separated by a blank line, ending on the open "### Response:\n". One user message gives exactly
    `prompt_text` of a record with that instruction and no input, the prompt the run was trained on.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    preamble, turn = ALPACA_PROMPT_NO_INPUT.split("### Instruction:")
    parts = []
    for m in messages:
        if m["role"] == "user":
            parts.append("### Instruction:" + turn.format(instruction=m["content"]))
        elif m["role"] == "assistant":
            parts[-1] += m["content"] + "\n\n"
    return preamble + "".join(parts)


def conversation_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    return text_prompt_ids(tokenizer, conversation_text(tokenizer, messages))


def text_prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A prompt's token ids: as the template wrote it, or with the BOS (never an EOS) the tokenizer adds."""
    if getattr(tokenizer, "chat_template", None):  # the template already holds its special tokens
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(text)["input_ids"]  # BOS where the model expects one
    if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids


def response_ids(tokenizer: PreTrainedTokenizerBase, rec: dict[str, str]) -> list[int]:
    """The answer plus EOS: EOS is trained so the model learns to stop, even when pad == eos."""
    return tokenizer(rec["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, rec: dict[str, str], max_length: int
) -> dict[str, list[int]] | None:
    """input_ids and labels with the prompt masked; None when truncation leaves no response token."""
    p, r = prompt_ids(tokenizer, rec), response_ids(tokenizer, rec)
    ids = (p + r)[:max_length]
    labels = ([IGNORE_INDEX] * len(p) + r)[:max_length]
    if all(t == IGNORE_INDEX for t in labels):
        return None
    return {"input_ids": ids, "labels": labels, "length": len(ids)}


def tokenize_records(
    tokenizer: PreTrainedTokenizerBase, records: list[dict[str, str]], max_length: int
) -> tuple[list[dict], int]:
    """Tokenized examples, and how many were dropped because the prompt filled max_length."""
    out, dropped = [], 0
    for rec in records:
        ex = tokenize_example(tokenizer, rec, max_length)
        if ex is None:
            dropped += 1
        else:
            out.append(ex)
    return out, dropped


def length_sorted_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Indices sorted longest first, so each batch pads little (and memory peaks at once, not late)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


class PadCollator:
    """Right-pad input_ids (pad id), labels (-100) and the attention mask to a multiple of 8."""

    def __init__(self, pad_token_id: int, multiple: int = 8):
        self.pad_token_id = pad_token_id
        self.multiple = multiple

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        width = -(-longest // self.multiple) * self.multiple
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

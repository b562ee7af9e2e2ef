"""Alpaca-format records: format prompts, tokenize with label masks (loading and splitting: records.py)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import PreTrainedTokenizerBase

# loading and splitting live in records.py (no torch); named here too, where the training code has always found them
from oloraplus.records import FIELDS as FIELDS
from oloraplus.records import FILE_SUFFIXES as FILE_SUFFIXES
from oloraplus.records import Split as Split
from oloraplus.records import load_records as load_records
from oloraplus.records import split_indices as split_indices
from oloraplus.records import validate_records as validate_records

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

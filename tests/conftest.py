"""Shared fixtures: a tiny random Llama with a tokenizer trained in code on a committed synthetic fixture (fast tests,
no ../shared needed), and the real Alpaca sample for integration tests (skipped with a reason when it is absent)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ALPACA = Path(os.environ.get("OLORAPLUS_DATA", REPO.parent / "shared" / "data" / "alpaca" / "alpaca_sample.json"))
# synthetic instruction records written by tests/fixtures/make_records.py (never Alpaca data)
FIXTURE = Path(__file__).with_name("fixtures") / "records.json"
# short reference answers for report/statistics tests on synthetic study folders
SAMPLE_REFS = [
    "the cat sat on the mat near the door",
    "water boils at one hundred degrees celsius",
    "paris is the capital city of france",
    "plants need light water and air to grow",
    "a triangle has three sides and three angles",
    "the sun rises in the east every morning",
    "exercise helps keep the body and mind healthy",
    "reading books can widen your vocabulary a lot",
]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# The smallest run that still trains several steps (16 examples, batch 4) and scores generated answers (4 test
# records, 4 new tokens): what tests of the study, Ray and tracking plumbing train, as cli_args(..., **TINY).
TINY = {"n_train": 16, "n_test": 4, "batch_size": 4, "max_new_tokens": 4}


def cli_args(command: str, *extra: str, **flags: object) -> list[str]:
    """A CLI call written as keyword flags: cli_args("train", n_train=16) -> ["train", "--n_train", "16"].

    A flag set to None is left out; `extra` (raw arguments) comes last, so it overrides a flag it repeats.
    """
    args = [command]
    for name, value in flags.items():
        if value is not None:
            args += [f"--{name}", str(value)]
    return args + list(extra)


def _records() -> list[dict]:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def build_tokenizer(chat_template: bool = True):
    """A 600-token byte-level BPE trained on the synthetic fixture: English words, tiny vocabulary, pad == eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in _records()]
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>"
    )
    if chat_template:
        fast.chat_template = CHATML
    return fast


def count_onednn_calls(monkeypatch) -> list:
    """The Linears whose oneDNN forward (generation.onednn_forward) runs from now on, once per call."""
    from oloraplus import generation

    calls = []
    made = generation.onednn_forward

    def counted(linear):
        forward = made(linear)
        counted_forward = lambda x: calls.append(linear) or forward(x)  # noqa: E731
        counted_forward.packed = forward.packed
        return counted_forward

    monkeypatch.setattr(generation, "onednn_forward", counted)
    return calls


def build_tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=2,
        pad_token_id=2,
        bos_token_id=1,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved folder (the local-folder load path users take): tiny random Llama + ChatML tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer()
    model = build_tiny_llama(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def alpaca_path() -> Path:
    if not ALPACA.is_file():
        pytest.skip(f"Alpaca sample not found at {ALPACA} (set OLORAPLUS_DATA)")
    return ALPACA


@pytest.fixture()
def small_data(tmp_path) -> Path:
    """60 synthetic records in a temp file."""
    path = tmp_path / "small.json"
    path.write_text(json.dumps(_records()[:60]), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished run of `oloraplus train` on the tiny model, trained hard enough (lr 1e-2) that its adapter moves
    the logits by a large margin (chat and export tests check that they see the adapter)."""
    from oloraplus.cli import main

    data = tmp_path_factory.mktemp("run-data") / "records.json"
    data.write_text(json.dumps(_records()[:60]), encoding="utf-8")
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    args = cli_args(
        "train",
        model=tiny_model_dir,
        data=data,
        n_train=16,
        n_test=4,
        batch_size=4,
        max_steps=3,
        lr="1e-2",
        dropout=0.05,  # pinned: the export tolerances were measured on this adapter, whatever the default becomes
        precision="fp32",  # and the same adapter on a CPU where auto would pick bf16
        generate="false",
        output_dir=out,
    )
    assert main(args) == 0
    return out

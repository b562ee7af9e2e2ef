"""Loading, validation, the seeded split, prompts and label masks."""

import json

import pytest
from conftest import build_tokenizer

from oloraplus.data import (
    IGNORE_INDEX,
    PadCollator,
    load_records,
    prompt_ids,
    prompt_text,
    split_indices,
    tokenize_example,
)
from oloraplus.errors import OLoRAPlusError

REC = {"instruction": "Name a color.", "input": "", "output": "Blue is a color."}


def test_split_is_deterministic_and_disjoint():
    a = split_indices(2000, 1000, 500, 0.1, seed=7)
    b = split_indices(2000, 1000, 500, 0.1, seed=7)
    assert a == b
    assert (len(a.train), len(a.val), len(a.test)) == (900, 100, 500)
    assert not set(a.train) & set(a.test) and not set(a.val) & set(a.test) and not set(a.train) & set(a.val)
    assert split_indices(2000, 1000, 500, 0.1, seed=8).test != a.test


def test_test_set_does_not_depend_on_training_size():
    assert split_indices(2000, 100, 50, 0.0, 3).test == split_indices(2000, 1500, 50, 0.2, 3).test


def test_split_larger_than_data_is_an_error():
    with pytest.raises(OLoRAPlusError, match=r"n_train \+ n_test = 1500 \+ 600 = 2100 exceeds the 2000 records"):
        split_indices(2000, 1500, 600, 0.0, 0, source="data.json")


def test_prompt_tokens_are_masked_and_eos_is_trained():
    tok = build_tokenizer()
    assert tok.pad_token_id == tok.eos_token_id  # SmolLM2's case
    ex = tokenize_example(tok, REC, 512)
    n_prompt = len(prompt_ids(tok, REC))
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["labels"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"][n_prompt:-1]) == REC["output"]
    batch = PadCollator(tok.pad_token_id)([ex, tokenize_example(tok, {**REC, "output": "Red."}, 512)])
    assert batch["labels"][1, -1] == IGNORE_INDEX  # padding is not trained, even though pad == eos
    assert batch["input_ids"].shape[1] % 8 == 0


def test_truncation_keeps_labels_aligned_and_drops_prompt_only_examples():
    tok = build_tokenizer()
    n_prompt = len(prompt_ids(tok, REC))
    ex = tokenize_example(tok, REC, n_prompt + 2)
    assert len(ex["input_ids"]) == len(ex["labels"]) == n_prompt + 2
    assert tokenize_example(tok, REC, n_prompt) is None


def test_chat_template_when_present_else_alpaca_prompt():
    with_template = prompt_text(build_tokenizer(True), {**REC, "input": "ctx"})
    assert with_template.startswith("<|im_start|>user\nName a color.\n\nctx<|im_end|>")
    plain = prompt_text(build_tokenizer(False), {**REC, "input": "ctx"})
    assert "### Instruction:\nName a color.\n\n### Input:\nctx\n\n### Response:\n" in plain


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_every_file_format_loads_the_same_records(tmp_path, suffix):
    rows = [REC, {"instruction": "Add 2+2", "input": "numbers", "output": "4"}]
    path = tmp_path / f"d{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == ".csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_records(str(path)) == rows


@pytest.mark.parametrize(
    "content, message",
    [
        ("[", r"malformed JSON at line 1"),
        ("[]", r"the dataset is empty"),
        (json.dumps([REC, {"instruction": "x", "output": "y"}]), r"record 1 has no field 'input'"),
        (json.dumps([REC, REC, {**REC, "output": 3}]), r"record 2 field 'output' must be a string, got int"),
        (json.dumps({"a": 1}), r"expected a JSON list"),
    ],
)
def test_bad_records_are_named(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(OLoRAPlusError, match=message) as e:
        load_records(str(path))
    assert str(path) in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(OLoRAPlusError, match=r"data file not found: .*nope\.json"):
        load_records(str(tmp_path / "nope.json"))


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(REC) + "\n{oops\n")
    with pytest.raises(OLoRAPlusError, match="line 2"):
        load_records(str(path))

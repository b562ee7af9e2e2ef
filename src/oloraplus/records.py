"""Alpaca-format records: load, validate and split (no torch, so the report can read them too).

data.py builds prompts and tokens on top of these; report/load.py reads a study's
test records from here to quote them, from the data file the runs name.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oloraplus.errors import OLoRAPlusError

FIELDS = ("instruction", "input", "output")
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


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

"""The test records' own texts (instruction, input, reference) that the report quotes beside the answers.

A run keeps each test record's index in the data file, not its texts: the Alpaca
data is CC BY-NC, so a run folder meant to be shared holds nothing from it
(benchmarks/strip_record_texts.py strips older folders). The report reads the
texts at report time from the data file config.yaml names (resolved from the
current folder, as the runs resolved it) or from --data, after checking that the
file's seeded test split holds every record the runs scored; without the file it
falls back to the texts older run folders still keep, and otherwise leaves them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from oloraplus.errors import OLoRAPlusError
from oloraplus.records import load_records, split_indices
from oloraplus.report.load import Study

# Where the texts came from (the examples_texts macro words each)
FROM_DATA, FROM_RUNS, LEFT_OUT, NOT_FOUND, MISMATCH = "data", "runs", "left_out", "not_found", "mismatch"


@dataclass(frozen=True)
class RecordTexts:
    """{record index: {instruction, input, output}}, and where they came from (or why there are none)."""

    by_index: dict[int, dict[str, str]] = field(default_factory=dict)
    origin: str = LEFT_OUT
    source: str = ""  # the data file read or looked for


def _kept_in_runs(study: Study) -> dict[int, dict[str, str]]:
    """The texts older predictions.jsonl rows repeat (from before runs kept only the index)."""
    kept: dict[int, dict[str, str]] = {}
    for run in study.runs:
        for idx, row in run.predictions.items():
            if "instruction" in row and "reference" in row:
                kept[idx] = {
                    "instruction": row["instruction"],
                    "input": row.get("input", ""),
                    "output": row["reference"],
                }
    return kept


def _matches(study: Study, records: list[dict[str, str]], source: str) -> bool:
    """The file's seeded test split holds every record the runs scored, with the texts old rows kept, if any."""
    d = study.base.data
    try:
        test = set(split_indices(len(records), d.n_train, d.n_test, d.val_fraction, d.split_seed, source).test)
    except OLoRAPlusError:  # too few records for the split: another file
        return False
    for run in study.runs:
        for idx, row in run.predictions.items():
            if idx not in test or row.get("reference", records[idx]["output"]) != records[idx]["output"]:
                return False
    return True


def record_texts(study: Study, data: str | None = None, use_data: bool = True) -> RecordTexts:
    """The texts to quote: from the data file when it is there and is the runs' file, else what the runs kept.

    `data` names the file (default: config.yaml's data.source); a named file that is
    missing or does not match is an error. use_data=False quotes nothing from the data.
    """
    if not use_data:
        return RecordTexts()
    source = data or study.base.data.source
    path = Path(source).expanduser()
    if path.is_file():
        records = load_records(str(path))
        if _matches(study, records, source):
            used = {i for run in study.runs for i in run.predictions}
            return RecordTexts({i: records[i] for i in sorted(used)}, FROM_DATA, source)
        if data:
            raise OLoRAPlusError(
                f"--data {data}: not the data file of {study.path} (its test split does not hold the runs' test records)"
            )
        origin = MISMATCH
    elif data:
        raise OLoRAPlusError(f"--data {data}: file not found")
    else:
        origin = NOT_FOUND
    kept = _kept_in_runs(study)
    return RecordTexts(kept, FROM_RUNS, source) if kept else RecordTexts({}, origin, source)

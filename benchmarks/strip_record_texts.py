"""Drop the Alpaca records' own texts (instruction, input, reference) from run folders kept as evidence.

Why: the sample is CC BY-NC 4.0 and never committed; a run's predictions.jsonl repeats each
test record's texts beside the scores. Kept: the record's index in the data file (to look it
up), the model's prediction, the losses and the BLEU/ROUGE statistics the comparisons use.

    python benchmarks/strip_record_texts.py docs/results/ablation-order-dropout
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from oloraplus.fsutil import atomic_write_jsonl, read_jsonl  # noqa: E402

RECORD_TEXTS = ("instruction", "input", "reference")


def main(folders: list[str]) -> int:
    for folder in folders:
        for path in sorted(Path(folder).rglob("predictions.jsonl")):
            rows = read_jsonl(path)
            if any(key in row for row in rows for key in RECORD_TEXTS):
                atomic_write_jsonl(path, [{k: v for k, v in row.items() if k not in RECORD_TEXTS} for row in rows])
                print(f"stripped {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

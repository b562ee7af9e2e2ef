"""Text scores of generated answers: corpus BLEU (sacreBLEU) and ROUGE-1/2/L F1 (rouge-score), per example too.

Pure Python, no torch: stats.py recomputes corpus BLEU from these per-example
sufficient statistics for its bootstrap, and the report never loads a model.
"""

from __future__ import annotations

from typing import Any

import sacrebleu
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def bleu_statistics(predictions: list[str], references: list[str]) -> list[list[int]]:
    """Per-example sacreBLEU sufficient statistics; summing any subset gives that subset's corpus BLEU."""
    return [list(map(int, s)) for s in sacrebleu.BLEU()._extract_corpus_statistics(predictions, [references])]


def bleu_from_statistics(stats: list[list[int]]) -> float:
    summed = [sum(col) for col in zip(*stats)]
    return float(sacrebleu.BLEU()._compute_score_from_stats(summed).score)


def rouge_per_example(predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    return [
        {k: float(v.fmeasure) for k, v in scorer.score(ref, pred).items()} for pred, ref in zip(predictions, references)
    ]


def score_texts(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """Corpus BLEU (sacrebleu, 0-100) and mean ROUGE F1 (rouge-score with stemmer, 0-1)."""
    rouge = rouge_per_example(predictions, references)
    n = max(len(rouge), 1)
    return {
        "bleu": float(sacrebleu.corpus_bleu(predictions, [references]).score),
        **{k: sum(r[k] for r in rouge) / n for k in ROUGE_TYPES},
        "per_example": {"rouge": rouge, "bleu_stats": bleu_statistics(predictions, references)},
    }

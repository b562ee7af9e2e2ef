"""BLEU/ROUGE agree with the libraries; batched generation equals one-at-a-time greedy decoding."""

import math

import pytest
import sacrebleu
import torch
from conftest import build_tiny_llama, build_tokenizer, count_onednn_calls
from rouge_score import rouge_scorer

from oloraplus.evaluate import corpus_loss, example_losses
from oloraplus.generation import generate_answers
from oloraplus.scoring import bleu_from_statistics, score_texts

PREDS = ["The cat sat on the mat.", "Paris is the capital of France.", "Running quickly helps."]
REFS = ["A cat was sitting on the mat.", "The capital of France is Paris.", "He runs quick."]


def test_scores_match_sacrebleu_and_rouge_score():
    s = score_texts(PREDS, REFS)
    assert s["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(r, p)[key].fmeasure for p, r in zip(PREDS, REFS)) / len(PREDS)
        assert s[key] == pytest.approx(expected)
    assert bleu_from_statistics(s["per_example"]["bleu_stats"]) == pytest.approx(s["bleu"])


def test_known_extremes():
    same = score_texts(REFS, REFS)
    assert same["bleu"] == pytest.approx(100.0) and same["rouge1"] == pytest.approx(1.0)
    disjoint = score_texts(["zebra xylophone"] * 3, REFS)
    assert disjoint["bleu"] == pytest.approx(0.0, abs=1e-6) and disjoint["rougeL"] == 0.0
    # stemming on: "running"/"runs" and "cats"/"cat" share stems
    assert score_texts(["running cats"], ["runs cat"])["rouge1"] == pytest.approx(1.0)


def _tiny():
    tok = build_tokenizer()
    return build_tiny_llama(len(tok), seed=5), tok


RECS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well."},
    {"instruction": "Translate", "input": "bonjour tout le monde, comment allez vous aujourd'hui", "output": "hello"},
    {"instruction": "Why?", "input": "", "output": "Because the sky is blue and the sea is wide."},
]


def test_batched_generation_equals_one_at_a_time():
    model, tok = _tiny()
    batched, n = generate_answers(model, tok, RECS, max_new_tokens=12, batch_size=3)
    single = [generate_answers(model, tok, [r], max_new_tokens=12, batch_size=1)[0][0] for r in RECS]
    assert batched == single
    assert n > 0


def test_example_losses_match_the_model_loss():
    model, tok = _tiny()
    losses = example_losses(model, tok, RECS, max_length=256, batch_size=2)
    from oloraplus.data import PadCollator, tokenize_example

    for rec, (s, n) in zip(RECS, losses):
        batch = PadCollator(tok.pad_token_id)([tokenize_example(tok, rec, 256)])
        with torch.no_grad():
            ref = model(**batch).loss
        assert s / n == pytest.approx(float(ref), rel=1e-4)
    assert corpus_loss(losses) == pytest.approx(sum(s for s, _ in losses) / sum(n for _, n in losses))
    assert math.isnan(corpus_loss([(math.nan, 0)]))


def test_sacrebleu_still_has_the_private_statistics_api_we_use():
    """Per-example BLEU statistics need sacrebleu's private BLEU methods (no public API gives them);
    sacrebleu is pinned to the tested range, and this fails by name if a release renames them."""
    bleu = sacrebleu.BLEU()
    for name in ("_extract_corpus_statistics", "_compute_score_from_stats"):
        assert callable(getattr(bleu, name, None)), f"sacrebleu {sacrebleu.__version__} has no BLEU.{name}"
    stats = bleu._extract_corpus_statistics(PREDS, [REFS])
    assert len(stats) == len(PREDS) and all(
        len(row) == 10 for row in stats
    )  # hits/totals for 1-4 grams, sys/ref length


def test_evaluation_runs_on_this_process_gpu_where_there_is_one(monkeypatch):
    """A model loaded for evaluation is not placed by Trainer: without this it stayed on the CPU of a GPU run."""
    import torch

    from oloraplus.models import compute_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's second process on this node
    assert compute_device() == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert compute_device() == torch.device("cuda", 0)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch build without oneDNN")
def test_test_loss_through_onednn_runs_every_linear_there_head_included_and_moves_only_by_rounding(monkeypatch):
    """Forced on (whatever this CPU's rule): every Linear's forward, the LM head's in the chunked loss too, is
    oneDNN's, the losses agree with MKL's to float rounding, and each module gets its weight back; bf16 keeps it off."""
    model, tok = _tiny()
    calls = count_onednn_calls(monkeypatch)
    plain = example_losses(model, tok, RECS, max_length=256, batch_size=2, onednn="none")
    assert calls == []
    weights = [m.weight.detach().clone() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ours = example_losses(model, tok, RECS, max_length=256, batch_size=2, onednn="all")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert {id(m) for m in calls} == {id(m) for m in linears}
    assert all("forward" not in vars(m) for m in linears)
    assert all(torch.equal(m.weight, w) for m, w in zip(linears, weights))
    for (s, n), (a, m) in zip(ours, plain):
        assert n == m and s == pytest.approx(a, rel=1e-5)
    calls.clear()
    example_losses(model, tok, RECS[:1], max_length=256, batch_size=2, bf16=True, onednn="all")
    assert calls == []


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch build without oneDNN")
@pytest.mark.parametrize("rule, through_onednn", [(None, False), ("all", True)])
def test_test_loss_by_default_runs_every_linear_through_onednn_on_the_cpus_measured(monkeypatch, rule, through_onednn):
    """The default follows answering's rule for the CPU: every Linear where it says "all" (Zen 3 and Zen 4, where the
    test loss was measured faster that way too), MKL where it keeps MKL (None)."""
    from oloraplus import generation

    model, tok = _tiny()
    monkeypatch.setattr(generation, "onednn_linears_pay", lambda: rule)
    calls = count_onednn_calls(monkeypatch)
    example_losses(model, tok, RECS[:2], max_length=256, batch_size=2)
    linears = {id(m) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert {id(m) for m in calls} == (linears if through_onednn else set())

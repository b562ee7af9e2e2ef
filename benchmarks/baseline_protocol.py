"""The paper-cpu protocol the way a user writes it by hand: the baseline side of bench_protocol.sh.

Training: bench_train.baseline_trainer (PEFT OLoRA init, PEFT's LoRA+ optimizer, a stock Trainer
on padded random batches). Test loss: the plain way (bench_eval.plain_losses: padded batches, full
logits) on the unmerged PEFT model. Answers: peft_model.generate one prompt at a time
(bench_eval.baseline_answers). Writes OUTPUT_DIR/metrics.json with the fields our runs write.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_eval import baseline_answers, plain_losses  # noqa: E402
from bench_train import baseline_trainer  # noqa: E402
from common import DEFAULT_DATA  # noqa: E402

from oloraplus.evaluate import corpus_loss  # noqa: E402
from oloraplus.scoring import score_texts  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n_train", type=int, default=1000)
    p.add_argument("--n_test", type=int, default=500)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--output_dir", required=True)
    args = p.parse_args()
    # the same recipe as our protocol run: r 16, alpha 16, dropout 0.05, lr 2e-4, lambda 4, one epoch
    args.rank, args.alpha, args.dropout, args.lr, args.lr_ratio, args.max_length, args.seed = (
        16,
        16.0,
        0.05,
        2e-4,
        4.0,
        512,
        0,
    )
    args.max_steps = math.ceil(args.n_train / args.batch_size)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer, collator, tok, records, split = baseline_trainer(args, out, n_test=args.n_test)
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    model = trainer.model.eval()
    test = [records[i] for i in split.test]
    t0 = time.perf_counter()
    loss = corpus_loss(plain_losses(model, tok, test, args.max_length, 16))
    loss_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    answers, generated = baseline_answers(model, tok, test, args.max_new_tokens)
    gen_seconds = time.perf_counter() - t0
    scores = score_texts(answers, [r["output"] for r in test])
    metrics = {
        "train_seconds": train_seconds,
        "train_tokens": collator.real,
        "train_tokens_per_s": collator.real / train_seconds,
        "eval_loss": loss,
        "eval_loss_seconds": loss_seconds,
        "generation_seconds": gen_seconds,
        "generated_tokens": generated,
        "generation_tokens_per_s": generated / gen_seconds,
        **{k: scores[k] for k in ("bleu", "rouge1", "rouge2", "rougeL")},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

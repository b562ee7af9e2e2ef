"""Answer generation: ours vs before (this project's previous method) vs the baseline (unmerged PEFT, one prompt at a time).

Ours: `oloraplus.generation.generate_answers`, length-sorted batches through
`greedy_decode`, which drops a row from the batch and its KV cache once it emits EOS.
Before: the method this project used until the lean-runs issue, re-run here side by
side: the same merged model and batches through `model.generate`, which computes
finished rows until the batch's longest answer ends.

Why: evaluation generates up to max_new_tokens for every test prompt, the longest
part of the protocol on a CPU. Ours merges the adapter into the base weights
(one matmul per layer instead of three) and decodes prompts in length-sorted,
left-padded batches with the KV cache (`oloraplus.generation.generate_answers`).
The baseline is what a PEFT user writes: `peft_model.generate` per prompt, the
adapter unmerged. Both run in this process on the same OLoRA adapter (B randomly
perturbed, so the adapter changes the model) and the same prompts (the first N
of our test split); we report the wall time ratio and how many greedy answers
are exactly equal (merging and batching change float rounding, so a few may not be).

    python benchmarks/bench_eval.py                          # 16 prompts, 64 new tokens
    python benchmarks/bench_eval.py --n 500 --max_new_tokens 128   # the protocol's size (hours on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from bench_decode_batch import test_records  # noqa: E402
from common import DEFAULT_DATA  # noqa: E402

from oloraplus import adapters  # noqa: E402
from oloraplus.data import prompt_ids  # noqa: E402
from oloraplus.evaluate import corpus_loss, example_losses  # noqa: E402
from oloraplus.generation import generate_answers  # noqa: E402
from oloraplus.models import load_base  # noqa: E402
from oloraplus.scoring import score_texts  # noqa: E402


@torch.no_grad()
def perturbed_olora(model, rank: int, alpha: float, perturb: float, seed: int):
    """An OLoRA adapter whose B moved off its init: B += perturb·std(B)·N(0, 1), so it is not a no-op."""
    torch.manual_seed(seed)
    peft_model = adapters.attach_adapter(model, "olora", rank, alpha, 0.0, None)
    for _, layer in adapters.lora_layers(peft_model):
        b = layer.lora_B[adapters.ADAPTER].weight
        b.add_(torch.randn_like(b) * b.std() * perturb)
    return peft_model.eval()


@torch.no_grad()
def before_answers(model, tokenizer, records, max_new_tokens: int, batch_size: int) -> tuple[list[str], int]:
    """The previous generate_answers: left-padded length-sorted batches through model.generate."""
    from transformers import GenerationConfig

    from oloraplus.data import length_sorted_batches

    prompts = [prompt_ids(tokenizer, r) for r in records]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True, pad_token_id=pad, eos_token_id=eos
    )
    answers, generated = [""] * len(records), 0
    for idx in length_sorted_batches([len(p) for p in prompts], batch_size):
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:]
        for k, i in enumerate(idx):
            row = out[k].tolist()
            if eos in row:
                row = row[: row.index(eos) + 1]
            generated += len(row)
            answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return answers, generated


@torch.no_grad()
def plain_losses(model, tokenizer, records, max_length: int, batch_size: int) -> list[tuple[float, int]]:
    """Test loss the plain way: right-padded batches, the model's full logits, cross-entropy on response tokens."""
    from oloraplus.data import IGNORE_INDEX, PadCollator, tokenize_example

    examples = [tokenize_example(tokenizer, r, max_length) for r in records]
    out = []
    for start in range(0, len(examples), batch_size):
        batch = PadCollator(tokenizer.pad_token_id)(examples[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        for row, t in zip(loss, targets):
            out.append((float(row.sum()), int((t != IGNORE_INDEX).sum())))
    return out


@torch.no_grad()
def baseline_answers(peft_model, tokenizer, records, max_new_tokens: int) -> tuple[list[str], int]:
    """One prompt at a time through the unmerged PEFT model: what a plain user loop does."""
    eos, answers, generated = tokenizer.eos_token_id, [], 0
    for rec in records:
        ids = torch.tensor([prompt_ids(tokenizer, rec)])
        out = peft_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
        )
        row = out[0, ids.shape[1] :].tolist()
        if eos in row:
            row = row[: row.index(eos) + 1]
        generated += len(row)
        answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers, generated


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16, help="test prompts (the first N of our test split) [16]")
    p.add_argument("--max_new_tokens", type=int, default=64, help="longest answer in tokens [64]")
    p.add_argument("--batch_size", type=int, default=16, help="our generation batch size [16, our eval default]")
    p.add_argument("--before_batch_size", type=int, default=16, help="the previous method's batch size [16]")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--perturb", type=float, default=0.1, help="noise on B, relative to std(B) [0.1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=DEFAULT_DATA, help="Alpaca JSON [$OLORAPLUS_DATA or ../shared/data/alpaca/...]")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default) [0]")
    p.add_argument(
        "--order",
        default="ours,before,baseline",
        help="which runs first; drop one to skip it "
        "(the baseline takes hours at the protocol's size) [ours,before,baseline]",
    )
    p.add_argument("--json", help="also write the figures (and both answer lists) to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    test = test_records(args.data, args.n)
    model, tok = load_base(args.model)
    original = copy.deepcopy(model)
    peft_model = perturbed_olora(model, args.rank, args.alpha, args.perturb, args.seed)
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()

    with torch.no_grad():  # the adapter must change the model, else the comparison proves nothing
        ids = torch.tensor([prompt_ids(tok, test[0])])
        changed = float((original(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max())
        merge_err = float((merged(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max())
    del original
    print(
        f"adapter effect: max |logits(adapted) - logits(base)| = {changed:.3f}; "
        f"merged vs unmerged max |dlogits| = {merge_err:.2e}"
    )

    # test loss, ours (packed, chunked head) against the plain way, on the same merged model
    t0 = time.perf_counter()
    ours_losses = example_losses(merged, tok, test, 512, args.batch_size)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = plain_losses(merged, tok, test, 512, args.batch_size)
    t_plain = time.perf_counter() - t0
    loss_ours, loss_plain = corpus_loss(ours_losses), corpus_loss(plain)
    print(
        f"test loss (token-weighted): ours {loss_ours:.6f} in {t_ours:.1f} s, plain padded full-logits "
        f"{loss_plain:.6f} in {t_plain:.1f} s; relative difference {abs(loss_ours - loss_plain) / loss_plain:.1e}"
    )

    # warm-up: one short generation each, so neither side pays first-call set-up in its timing
    generate_answers(merged, tok, test[:1], 2, 1)
    before_answers(merged, tok, test[:1], 2, 1)
    baseline_answers(peft_model, tok, test[:1], 2)

    timed = {}
    for kind in [k.strip() for k in args.order.split(",")]:
        t0 = time.perf_counter()
        if kind == "ours":
            answers, generated = generate_answers(merged, tok, test, args.max_new_tokens, args.batch_size)
        elif kind == "before":
            answers, generated = before_answers(merged, tok, test, args.max_new_tokens, args.before_batch_size)
        else:
            answers, generated = baseline_answers(peft_model, tok, test, args.max_new_tokens)
        timed[kind] = {"seconds": time.perf_counter() - t0, "generated_tokens": generated, "answers": answers}
        print(
            f"{kind:<9} {timed[kind]['seconds']:8.1f} s  {generated:6d} tokens  "
            f"{generated / timed[kind]['seconds']:6.1f} tokens/s",
            flush=True,
        )

    refs = [r["output"] for r in test]
    o = timed["ours"]
    so = score_texts(o["answers"], refs)
    print(
        f"\n{args.n} prompts, max_new_tokens {args.max_new_tokens}, our batch {args.batch_size}, "
        f"r={args.rank}, alpha={args.alpha:g}, fp32; ROUGE-L ours {so['rougeL']:.4f}, BLEU ours {so['bleu']:.2f}"
    )
    summary = {
        "args": vars(args),
        "adapter_logit_change": changed,
        "merge_logit_error": merge_err,
        "ours": o,
        "test_loss": {"ours": loss_ours, "plain": loss_plain, "ours_seconds": t_ours, "plain_seconds": t_plain},
    }
    for kind in ("before", "baseline"):
        if kind not in timed:
            continue
        b = timed[kind]
        same = [x == y for x, y in zip(o["answers"], b["answers"])]
        prefixes = [common_prefix(x, y) / max(len(y), 1) for x, y, s in zip(o["answers"], b["answers"], same) if not s]
        sb = score_texts(b["answers"], refs)
        speedup = b["seconds"] / o["seconds"]
        print(
            f"ours vs {kind}: {o['seconds']:.1f} s / {b['seconds']:.1f} s -> speedup {speedup:.2f}x; tokens/s "
            f"{o['generated_tokens'] / o['seconds']:.1f} vs {b['generated_tokens'] / b['seconds']:.1f}; identical greedy "
            f"answers {sum(same)}/{len(same)}"
            + (
                f" (differing ones agree on their first {100 * sum(prefixes) / len(prefixes):.0f}% of characters)"
                if prefixes
                else ""
            )
            + f"; ROUGE-L {sb['rougeL']:.4f}, BLEU {sb['bleu']:.2f}"
        )
        summary[kind] = b
        summary[f"vs_{kind}"] = {
            "speedup": speedup,
            "exact_match": sum(same) / len(same),
            "rougeL": sb["rougeL"],
            "bleu": sb["bleu"],
        }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

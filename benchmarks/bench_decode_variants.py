"""Decode-step changes tried for goal 3, side by side with the plain decoder: do they pay?

Why: on an fp32 CPU a decode step is mostly matmuls (benchmarks/profile_decode.py: at the fp32 peak on Zen 5,
at 82 GFLOP/s of ~180 on Zen 4), so what is left to win is in how they are computed and in the attention.
This tries, in one process, on the same prompts, alternating so that a host's drift shows as spread rather
than as an effect:
  plain  - the run's decoder with MKL's sgemm for every matmul (SDPA attention, separate q/k/v and gate/up);
  fused  - q/k/v and gate/up each computed as one matmul over their stacked weights, sliced after
           (fewer, wider matmuls; the same bits when the kernel sums each column alike, checked below);
  eager  - transformers' eager attention (matmul + softmax, K/V repeated per query head) in decode steps
           instead of SDPA's flash kernel (until 2026-12-07 this variant set the model's attention, which the
           decoder's packed attention overrode: its earlier figures timed SDPA);
  mm     - decode steps' attention as two batched matmuls over the key/value heads (the query heads of one
           KV head stacked as rows: no K/V copy) and a softmax between, instead of SDPA's flash kernel;
  onednn - every Linear (the LM head included) through oneDNN's inner product on its weight packed once
           into oneDNN's layout (`generation.linears_in_onednn`), instead of MKL's sgemm, which packs the
           weight on every call: decode steps stream all weights once per step; the run's default where
           `generation.onednn_linears_pay` says "all" (plain here keeps MKL for every Linear on every CPU);
  onednn_head - the same for the LM head alone (a fifth of a step's FLOPs, its widest matmul): Zen 4's
           default until 2026-12-07, when every Linear measured faster there with the row groups.
Variants combine with "+" (`onednn+eager`: every Linear in oneDNN and eager attention).
Prints answer tokens/s per try and how many answers equal the first try of the first variant. SmolLM2-135M, fp32 (`--run RUN`:
the run's model, whose answers are those a run times, shorter than the base model's):

    python benchmarks/bench_decode_variants.py --n 128 --repeats 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import eager_attention_forward

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from bench_decode_batch import answering_model, test_records  # noqa: E402
from common import DEFAULT_DATA, machine_line  # noqa: E402

from oloraplus import packing  # noqa: E402
from oloraplus.config import EvalConfig  # noqa: E402
from oloraplus.data import prompt_ids  # noqa: E402
from oloraplus.generation import greedy_decode  # noqa: E402
from oloraplus.precision import lean_process  # noqa: E402

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # projections of one input


def eager_step(module, query, key, value, attention_mask, **kwargs):
    """transformers' eager attention; the decoder builds SDPA's boolean mask, eager adds a float one."""
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill_(~attention_mask, -torch.inf)
    return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)


def mm_step(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """One query position per row: scores and output as batched matmuls per KV head; SDPA otherwise."""
    b, heads, q_len, d = query.shape
    if q_len != 1 or (attention_mask is not None and attention_mask.dtype != torch.bool):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    q = query.reshape(b, key.shape[1], heads // key.shape[1], d)  # [batch, kv heads, query heads per kv, d]
    scores = torch.matmul(q, key.transpose(-1, -2)).mul_(scaling)
    if attention_mask is not None:  # [batch, 1, 1, positions]: True where a row attends
        scores.masked_fill_(~attention_mask, -torch.inf)
    out = torch.matmul(torch.softmax(scores, dim=-1), value)
    return out.reshape(b, 1, heads, d), None


DECODE_ATTENTION = {"eager": eager_step, "mm": mm_step}
PARTS = {"plain", "fused", "onednn", "onednn_head", *DECODE_ATTENTION}


def variant_error(variant: str) -> str | None:
    """Why `variant` names no decoder this script can build (a misspelt part would time plain in silence)."""
    parts = set(variant.split("+"))
    if parts - PARTS:
        return (
            f"--variants: unknown {', '.join(sorted(parts - PARTS))} in {variant!r} (known: {', '.join(sorted(PARTS))})"
        )
    if len(parts & DECODE_ATTENTION.keys()) > 1 or {"onednn", "onednn_head"} <= parts:
        return f"--variants: {variant!r} asks for two attentions or two oneDNN choices at once"
    return None


def fuse_projections(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """Each group of SIBLINGS becomes one matmul: the first call computes all, the others take their slice.

    The weights move into one stacked tensor (each Linear keeps a row view of it: no extra memory).
    Returns the Linears whose forward was replaced (`del linear.forward` restores it).
    """
    replaced = []
    for module in model.modules():
        for names in SIBLINGS:
            members = [getattr(module, n, None) for n in names]
            if not all(isinstance(m, torch.nn.Linear) and m.bias is None for m in members):
                continue
            stacked = torch.cat([m.weight.detach() for m in members])
            shared = {"input": None, "output": None, "left": 0}
            start = 0
            for m in members:
                end = start + m.out_features
                m.weight.data = stacked[start:end]
                m.forward = _slice_of(shared, stacked, start, end, len(members))
                replaced.append(m)
                start = end
    return replaced


def _slice_of(shared: dict, stacked: torch.Tensor, start: int, end: int, members: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if shared["input"] is not x or shared["left"] == 0:  # a new input: compute the whole group once
            shared.update(input=x, output=torch.nn.functional.linear(x, stacked), left=members)
        out = shared["output"][..., start:end]
        shared["left"] -= 1
        if shared["left"] == 0:
            shared.update(input=None, output=None)
        return out

    return forward


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=128, help="test prompts (the first N of our test split) [128]")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument(
        "--batch_size", type=int, default=EvalConfig().eval_batch_size, help="the eval batch size [the run's default]"
    )
    p.add_argument("--repeats", type=int, default=2, help="tries of each variant, interleaved [2]")
    p.add_argument("--variants", default="plain,fused,eager,mm,onednn,onednn_head", help="which, in order [all]")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--run", help="a run folder: answer with its base + merged adapter, as the run did [the base model]")
    args = p.parse_args(argv)
    for variant in args.variants.split(","):
        if error := variant_error(variant):
            print(error, file=sys.stderr)
            return 2
    lean_process()
    print(machine_line())
    model, tok = answering_model(args.run)
    model.eval().requires_grad_(False)
    test = test_records(args.data, args.n)
    prompts = sorted((prompt_ids(tok, r) for r in test), key=lambda q: -len(q))  # as a run orders them
    reference = None
    for attempt in range(args.repeats):
        for variant in args.variants.split(","):
            parts = set(variant.split("+"))
            replaced = fuse_projections(model) if "fused" in parts else []
            # the decoder's packed attention hands decode steps to packing.sdpa_attention_forward: swap that
            step = next((DECODE_ATTENTION[p] for p in parts if p in DECODE_ATTENTION), sdpa_attention_forward)
            packing.sdpa_attention_forward = step
            onednn = "all" if "onednn" in parts else "head" if "onednn_head" in parts else "none"  # else MKL
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    answers = greedy_decode(
                        model,
                        prompts,
                        args.max_new_tokens,
                        tok.eos_token_id,
                        tok.pad_token_id,
                        args.batch_size,
                        onednn=onednn,
                    )
            finally:
                packing.sdpa_attention_forward = sdpa_attention_forward
                for m in replaced:
                    del m.forward
            seconds = time.perf_counter() - t0
            reference = reference or answers
            tokens = sum(len(a) for a in answers)
            same = sum(a == b for a, b in zip(answers, reference))
            print(
                f"try {attempt + 1} {variant:<13} {seconds:7.1f} s  {tokens:6d} tokens  {tokens / seconds:6.1f} tokens/s"
                f"  answers equal to the first variant's: {same}/{len(answers)}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How far a prompt's next-token logits move with the prompts beside it in a batch (fp32, left-padded).

Why: under torchrun each rank decodes its own share of the test prompts (distributed.py),
so a prompt shares its batch with other prompts than on one process. Greedy answers are
then the same unless some step's top two logits are closer than this movement. Prints the
largest |logit alone - logit in the batch| over the prompts, and the smallest top-2 gap.

    python benchmarks/batch_dependence.py                    # SmolLM2-135M, 8 Alpaca prompts, one thread
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from common import DEFAULT_DATA, machine_line  # noqa: E402

from oloraplus.data import load_records, prompt_ids  # noqa: E402
from oloraplus.generation import _left_padded  # noqa: E402
from oloraplus.models import load_base  # noqa: E402


@torch.no_grad()
def last_logits(model, prompts: list[list[int]], pad_token_id: int) -> torch.Tensor:
    ids, mask, positions = _left_padded(prompts, pad_token_id, "cpu")
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--n", type=int, default=8, help="prompts, all in one batch")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_base(args.model)
    model.eval()
    prompts = [prompt_ids(tok, r) for r in load_records(args.data)[: args.n]]
    batched = last_logits(model, prompts, tok.pad_token_id)
    moved, gaps = 0.0, []
    for k, prompt in enumerate(prompts):
        alone = last_logits(model, [prompt], tok.pad_token_id)[0]
        moved = max(moved, float((alone - batched[k]).abs().max()))
        top = alone.topk(2).values
        gaps.append(float(top[0] - top[1]))
    print(f"{args.model}, {args.n} prompts, fp32, {machine_line()}")
    print(f"largest |logit alone - in batch|: {moved:.3g} (largest |logit|: {float(batched.abs().max()):.3g})")
    print(f"smallest top-2 gap of the first answer token: {min(gaps):.3g}")


if __name__ == "__main__":
    main()

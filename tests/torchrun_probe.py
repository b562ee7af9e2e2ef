"""`oloraplus train` as `python -m oloraplus.cli` runs it, plus what tests/test_torchrun.py checks on each rank.

Usage: torchrun ... tests/torchrun_probe.py PROBE_DIR WATCHED_DIR train ARGS...

Writes PROBE_DIR/rank-R.json on each rank: a digest of every weight right after the adapter
init (before Trainer wraps the model) and of the trainable ones right after training, how many test/val batches and prompts this rank computed, and every write, rename,
removal or mkdir this process made under WATCHED_DIR (Python's audit hooks see them all but
those made by native code, e.g. safetensors' own file writes).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
CHANGE_EVENTS = ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate")


def main() -> int:
    probe, watched, argv = Path(sys.argv[1]), os.path.abspath(sys.argv[2]), sys.argv[3:]
    rank = int(os.environ.get("RANK", "0"))
    report: dict = {"writes": [], "loss_batches": 0, "prompts": 0, "init_digest": None, "digest": None}

    def under_watch(path) -> bool:
        if path is None or isinstance(path, int):
            return False
        path = os.path.abspath(os.fsdecode(path))
        return path == watched or path.startswith(watched + os.sep)

    def audit(event: str, args: tuple) -> None:
        if event == "open" and args[2] & WRITE_FLAGS and under_watch(args[0]):
            report["writes"].append(["open", os.fsdecode(args[0])])
        elif event in CHANGE_EVENTS:
            touched = [a for a in args[:2] if isinstance(a, str | bytes | os.PathLike) and under_watch(a)]
            if touched:
                report["writes"].append([event, *map(os.fsdecode, touched)])

    sys.addaudithook(audit)

    import torch

    from oloraplus import adapters, evaluate, generation, train
    from oloraplus.cli import main as cli_main
    from oloraplus.distributed import full_tensor

    def digest(model, trainable_only: bool) -> str:
        h = hashlib.sha256()
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad or not trainable_only:
                h.update(name.encode())
                h.update(full_tensor(p.detach()).to(torch.float32).cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def digest_after(fn, key, model_of, trainable_only):
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)
            report[key] = digest(model_of(result), trainable_only)
            return result

        return wrapped

    def counting(fn, key, size):
        def wrapped(*args, **kwargs):
            report[key] += size(*args, **kwargs)
            return fn(*args, **kwargs)

        return wrapped

    # every weight right after the OLoRA init, before Trainer wraps (DDP, FSDP) the model
    adapters.attach_adapter = digest_after(adapters.attach_adapter, "init_digest", lambda m: m, False)
    train.train_adapter = digest_after(train.train_adapter, "digest", lambda t: t.trainer.model, True)
    evaluate._batch_losses = counting(evaluate._batch_losses, "loss_batches", lambda *a, **k: 1)
    generation.greedy_decode = counting(
        generation.greedy_decode, "prompts", lambda model, prompts, *a, **k: len(prompts)
    )
    try:
        return cli_main(argv)
    finally:
        probe.mkdir(parents=True, exist_ok=True)
        (probe / f"rank-{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())

"""The FSDP2 paths of a run on real shards: torchrun ... tests/fsdp2_probe.py OUT_DIR (gloo, CPU).

Trainer refuses FSDP on a CPU (accelerate only shards on accelerators), so this shards the
tiny OLoRA model with torch's own `fully_shard`, as accelerate does, and runs what a run
does on such a model: the dynamics record and the adapter gather + conversion on save.
Writes OUT_DIR/rank-R.json, and rank 0 the adapters saved from the sharded and the whole model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import build_tiny_llama, build_tokenizer
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from oloraplus import adapters
from oloraplus.callbacks import DynamicsCallback


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = adapters.attach_adapter(build_tiny_llama(len(build_tokenizer())), "olora", 8, 16, 0.0, None)
    initial = adapters.adapter_snapshot(model)
    with torch.no_grad():  # a "trained" adapter: B moved off its start
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.add_(torch.linspace(0, 0.01, p.numel()).reshape(p.shape))
    whole = DynamicsCallback(initial, 1)
    whole.record(model, 1)
    if rank == 0:
        adapters.save_adapter(model, out / "whole", initial)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = [n for n, p in model.named_parameters() if ".lora_" in n and isinstance(p, DTensor)]
    dynamics = DynamicsCallback(initial, 1)
    dynamics.record(model, 1)
    state = adapters.adapter_state(model)  # every rank, as run_training calls it
    if rank == 0:
        adapters.save_adapter(model, out / "sharded", initial, state)
    out.mkdir(parents=True, exist_ok=True)
    report = {"sharded": len(sharded), "dynamics": dynamics.rows, "whole_dynamics": whole.rows}
    (out / f"rank-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

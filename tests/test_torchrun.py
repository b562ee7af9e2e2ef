"""One run on two processes (torchrun, gloo on the CPU) trains and evaluates as the same run on one process.

Both train on the tiny model in fp32 with the same global batch (2 ranks x 2 = 1 process x 4).
tests/torchrun_probe.py runs `oloraplus.cli train` and records, per rank, a digest of the
trainable parameters after training, how many eval batches and prompts that rank computed,
and the files it wrote under the run folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_args
from safetensors.torch import load_file

from oloraplus.cli import main

PROBE = Path(__file__).with_name("torchrun_probe.py")
FSDP2_PROBE = Path(__file__).with_name("fsdp2_probe.py")
SRC = Path(__file__).resolve().parents[1] / "src"
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

# DDP averages the two ranks' gradients where one process sums one batch: the same numbers up to
# float rounding, which 4 Adam steps grow to ~1e-7 relative (measured); 1e-5 leaves room, and a
# wrong global batch or data order moves the loss by ~1e-3.
LOSS_RTOL = 1e-5


def _train_args(model_dir: Path, data: Path, out: Path, batch_size: int) -> list[str]:
    return cli_args(
        "train",
        model=model_dir,
        data=data,
        n_train=16,
        val_fraction="0.25",
        n_test=6,
        batch_size=batch_size,
        max_steps=4,
        logging_steps=1,
        lr="1e-3",  # small enough that the answers still differ from prompt to prompt
        dropout=0,  # no per-rank random stream
        precision="fp32",
        max_new_tokens=8,
        eval_batch_size=2,  # 2 val and 3 test batches: split 3 / 2 over the ranks
        output_dir=out,
    )


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]


def _launch(script: Path, *args) -> None:
    """`torchrun --nproc_per_node 2 script args`, one thread per rank."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [*LAUNCH, str(script), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _on_one_thread(argv: list[str]) -> int:
    """As each torchrun rank runs (OMP_NUM_THREADS=1), so both sides round alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    from conftest import _records

    tmp = tmp_path_factory.mktemp("torchrun")
    data = tmp / "records.json"
    data.write_text(json.dumps(_records()[:60]))
    two, one, probe = tmp / "two" / "run", tmp / "one" / "run", tmp / "probe"
    _launch(PROBE, probe, two.parent, *_train_args(tiny_model_dir, data, two, 2))
    assert _on_one_thread(_train_args(tiny_model_dir, data, one, 4)) == 0
    ranks = [json.loads((probe / f"rank-{r}.json").read_text()) for r in (0, 1)]
    return two, one, ranks


def test_the_adapters_are_identical_on_both_ranks_and_match_one_process(runs):
    two, one, ranks = runs
    # OLoRA's thin QR gives every rank the same start before DDP (or FSDP) takes the model over
    assert ranks[0]["init_digest"] is not None and ranks[0]["init_digest"] == ranks[1]["init_digest"]
    assert ranks[0]["digest"] is not None and ranks[0]["digest"] == ranks[1]["digest"]
    ours, theirs = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (two, one))
    assert ours.keys() == theirs.keys()
    trained = [k for k in ours if ".lora_B." in k]
    assert trained
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6)


def test_the_loss_curve_matches_one_process_with_the_same_global_batch(runs):
    two, one = runs[0], runs[1]
    steps = [[h for h in json.loads((run / "history.json").read_text()) if "loss" in h] for run in (two, one)]
    assert len(steps[0]) == len(steps[1]) == 4
    for ours, theirs in zip(*steps):
        assert ours["step"] == theirs["step"]
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=LOSS_RTOL)
    m2, m1 = (json.loads((run / "metrics.json").read_text()) for run in (two, one))
    assert m2["train_tokens"] == m1["train_tokens"]  # summed over ranks: every example seen once
    assert m2["final_train_loss"] == pytest.approx(m1["final_train_loss"], rel=LOSS_RTOL)


def test_evaluation_is_split_over_the_ranks_and_gathered_whole(runs):
    two, one, ranks = runs
    assert [r["loss_batches"] for r in ranks] == [3, 2]  # val batch 0, test 0 and 2 | val 1, test 1
    assert [r["prompts"] for r in ranks] == [3, 3]
    m2, m1 = (json.loads((run / "metrics.json").read_text()) for run in (two, one))
    for key in ("val_loss", "eval_loss", "bleu", "rougeL"):
        assert m2[key] == pytest.approx(m1[key], rel=LOSS_RTOL), key
    rows2, rows1 = _rows(two), _rows(one)
    assert [r["index"] for r in rows2] == [r["index"] for r in rows1]
    assert [r["prediction"] for r in rows2] == [r["prediction"] for r in rows1]
    assert len({r["prediction"] for r in rows1}) > 1  # answers that differ: a misplaced one would show
    assert [r["n_tokens"] for r in rows2] == [r["n_tokens"] for r in rows1]
    assert [r["loss_sum"] for r in rows2] == pytest.approx([r["loss_sum"] for r in rows1], rel=LOSS_RTOL)


def test_split_evaluation_equals_one_process_on_the_same_adapter(runs, tmp_path):
    """The same adapter evaluated on one process: the same batches, so the very same losses and answers."""
    two = runs[0]
    assert _on_one_thread(["evaluate", str(two), "--eval_dir", str(tmp_path)]) == 0
    ours, alone = _rows(two), _rows(tmp_path)
    for key in ("index", "loss_sum", "n_tokens", "prediction"):
        assert [r[key] for r in ours] == [r[key] for r in alone], key


def test_each_file_is_written_once_by_rank_zero(runs):
    two, one, ranks = runs
    # rank 1 writes only into checkpoints (Trainer keeps each process's RNG state there, for an exact resume)
    assert all(
        Path(path).name.startswith("checkpoint-") or "/checkpoint-" in path for _, path, *_ in ranks[1]["writes"]
    )
    renamed = [Path(w[2]).name for w in ranks[0]["writes"] if w[0] == "os.rename"]
    assert sorted(renamed) == sorted(set(renamed)) and "metrics.json" in renamed  # once each, atomically
    assert _files(two) == _files(one)  # no rank-suffixed copy, no temp file left over


def test_fsdp2_shards_are_gathered_whole_for_the_dynamics_and_the_saved_adapter(tmp_path):
    """Trainer shards only on accelerators; torch's fully_shard on 2 CPU ranks gives the same DTensor shards."""
    _launch(FSDP2_PROBE, tmp_path)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert report["sharded"] > 0  # the adapter's weights really are shards
        assert report["whole_dynamics"][0]["dB"] > 0
        assert report["dynamics"][0] == pytest.approx(report["whole_dynamics"][0], rel=1e-6)
    sharded, whole = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("sharded", "whole"))
    assert sharded.keys() == whole.keys() and all(torch.equal(sharded[k], whole[k]) for k in whole)
    configs = [json.loads((tmp_path / name / "adapter_config.json").read_text()) for name in ("sharded", "whole")]
    assert configs[0] == configs[1] and configs[0]["r"] == 16  # converted: rank 2r for the original base

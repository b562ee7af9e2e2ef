"""--max_memory_gb: packs, checkpointing and eval batches chosen to fit, or a one-line refusal before anything runs."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from oloraplus import generation
from oloraplus.budget import activation_bytes_per_token, plan_memory
from oloraplus.cli import main
from oloraplus.errors import OLoRAPlusError


class _Shaped(torch.nn.Module):
    """A model of TinyLlama-1.1B's shape whose 1.1B float32 weights live on the meta device (no memory)."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
        )
        self.weights = torch.nn.Parameter(torch.empty(1_100_000_000, device="meta"))


def _plan(budget_gb, micro=512):
    return plan_memory(
        _Shaped(),
        budget_gb,
        micro,
        max_length=512,
        batch_size=8,
        eval_batch_size=32,
        max_new_tokens=128,
        vocab_chunk_bytes=64 << 20,
    )


def test_checkpointing_costs_less_memory_per_token():
    assert activation_bytes_per_token(_Shaped(), True) < activation_bytes_per_token(_Shaped(), False) / 5


def test_a_roomy_budget_keeps_the_configured_packs_without_checkpointing():
    plan = _plan(12)
    assert plan.micro_batch_tokens == 512 and not plan.gradient_checkpointing
    assert plan.estimated_peak_gb <= 12


def test_a_tighter_budget_turns_checkpointing_on_and_eval_batches_shrink():
    roomy, tight = _plan(12), _plan(7)
    assert tight.gradient_checkpointing and tight.micro_batch_tokens >= 512
    assert tight.eval_batch_size < roomy.eval_batch_size and tight.estimated_peak_gb <= 7


def test_the_plan_counts_the_row_group_decoders_larger_cache(monkeypatch):
    """generation.GROUPED_ROWS times the eval batch's rows sit in the answers' cache: a budget fits fewer rows."""
    counted = _plan(7).eval_batch_size
    monkeypatch.setattr(generation, "GROUPED_ROWS", 1.0)
    assert counted < _plan(7).eval_batch_size


def test_no_budget_changes_nothing():
    plan = _plan(0, micro=2048)
    assert (plan.micro_batch_tokens, plan.gradient_checkpointing, plan.eval_batch_size) == (2048, False, 32)


def test_a_budget_below_the_weights_is_refused_with_what_it_needs():
    with pytest.raises(OLoRAPlusError, match=r"max_memory_gb 5 is too small .* weights 4.10 GB"):
        _plan(5)


def test_cli_refuses_an_impossible_budget_before_writing(tiny_model_dir, small_data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(small_data),
            "--n_train",
            "8",
            "--n_test",
            "2",
            "--max_memory_gb",
            "0.5",
            "--output_dir",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "max_memory_gb 0.5 is too small" in err
    assert not out.exists()


def test_a_budgeted_run_records_its_plan(tiny_model_dir, small_data, tmp_path):
    import json

    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(small_data),
            "--n_train",
            "8",
            "--n_test",
            "2",
            "--max_new_tokens",
            "4",
            "--max_memory_gb",
            "4",
            "--output_dir",
            str(out),
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    plan = metrics["memory_plan"]
    assert rc == 0 and plan["estimated_peak_gb"] <= 4 and plan["micro_batch_tokens"] >= 512
    # the measured peaks sit beside the plan: this test process holds torch, so well over 0.1 GiB
    assert 0.1 < metrics["peak_rss_gb_training"] <= metrics["peak_rss_gb"]


def test_peak_rss_follows_what_the_process_holds():
    import subprocess
    import sys

    # a fresh process, so no earlier test's peak hides the block
    code = (
        "from oloraplus.budget import peak_rss_gb; before = peak_rss_gb(); block = bytearray(512 << 20); "
        "block[::4096] = b'x' * (len(block) // 4096); print(before, peak_rss_gb())"
    )
    before, after = map(
        float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    assert 0.4 < after - before < 0.6  # the 512 MiB block, touched page by page


def test_checkpointed_packed_training_gives_the_same_losses(tiny_model_dir, small_data, tmp_path, monkeypatch):
    import json

    from oloraplus import prepare
    from oloraplus.budget import MemoryPlan

    args = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(small_data),
        "--n_train",
        "16",
        "--n_test",
        "2",
        "--generate",
        "false",
        "--dropout",
        "0",
        "--logging_steps",
        "1",
        "--precision",
        "fp32",
    ]
    losses = {}
    for checkpointing in (False, True):
        monkeypatch.setattr(prepare, "plan_memory", lambda *a, **k: MemoryPlan(64, checkpointing, 4, 1.0))
        out = tmp_path / f"ckpt-{checkpointing}"
        assert main([*args, "--output_dir", str(out)]) == 0
        history = json.loads((out / "history.json").read_text())
        losses[checkpointing] = [h["loss"] for h in history if "loss" in h]
        assert json.loads((out / "metrics.json").read_text())["memory_plan"]["gradient_checkpointing"] is checkpointing
    assert len(losses[True]) == 2 and losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_memory_kept_for_reuse_goes_back_to_the_os_between_phases():
    # in a fresh process, so this one's malloc settings stay as they were
    script = """
import torch
from oloraplus.precision import keep_freed_memory_mapped, return_freed_memory
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
keep_freed_memory_mapped()
base = rss()
blocks = [torch.ones(1 << 20) for _ in range(256)]  # 1 GiB in 4 MiB blocks, as activations come
del blocks
kept = rss() - base
return_freed_memory()
print(kept >> 20, (rss() - base) >> 20)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    kept, after = int(out[0]), int(out[1])
    assert kept > 900  # glibc kept the freed blocks: the next step reuses them without page faults
    assert after < 100


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_evaluation_returns_freed_memory_only_once_the_process_has_grown_past_the_margin():
    script = """
import torch
from oloraplus.precision import keep_freed_memory_mapped, return_freed_memory, return_freed_memory_when_grown
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
keep_freed_memory_mapped()
return_freed_memory()
base = rss()
def grow(mib):
    blocks = [torch.ones(1 << 20) for _ in range(mib // 4)]  # freed again at once: kept by glibc
    del blocks
grow(64)
return_freed_memory_when_grown(128 << 20)  # grown 64 MiB: under the margin, kept for reuse
small = rss() - base
grow(512)
return_freed_memory_when_grown(128 << 20)  # grown past it: back to the OS
print(small >> 20, (rss() - base) >> 20)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    small, after = int(out[0]), int(out[1])
    assert small > 48
    assert after < 48

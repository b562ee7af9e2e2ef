"""`oloraplus export` on a tiny run: a merged folder that plain transformers loads with base + adapter's logits,
GGUF files transformers reads back within a stated tolerance per type, and bad input refused before any write."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from conftest import build_tokenizer

import oloraplus.export as export_module
from oloraplus.cli import main
from oloraplus.models import load_base
from oloraplus.prepare import load_tuned

TEXT = "Give three tips for staying healthy. Water boils at one hundred degrees."
# Largest |logit difference| from the merged fp32 model on the tiny test model (logits up to ~0.7), with room
# over what was measured: f32 0, f16 8e-4, bf16 1.8e-2, q8_0 7.7e-3, q4_0 0.13, q4_1 0.18.
GGUF_TOLERANCE = {"f32": 1e-5, "f16": 3e-3, "bf16": 5e-2, "q8_0": 3e-2, "q4_1": 0.3, "q4_0": 0.3}


@pytest.fixture(scope="module")
def reference(tiny_run, tiny_model_dir):
    """Input ids, base + adapter logits, and how far the adapter moves them from the base's."""
    tuned, tok, _ = load_tuned(tiny_run)
    base, _ = load_base(str(tiny_model_dir))
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        logits = tuned(ids).logits
        effect = float((logits - base(ids).logits).abs().max())
    return ids, logits, effect, tok


LOAD_PLAIN = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
assert "peft" not in sys.modules, "loading the merged folder imported peft"
"""


def test_merged_folder_loads_with_plain_transformers_and_gives_base_plus_adapter(tiny_run, reference, tmp_path):
    ids, logits, effect, _ = reference
    assert effect > 1e-2  # the adapter changes the logits, so a folder without it fails below
    out = tmp_path / "merged"
    assert main(["export", str(tiny_run), "--merged", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert not any(n.startswith("adapter") for n in names)
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_PLAIN, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("gguf_type", list(GGUF_TOLERANCE))
def test_gguf_reads_back_in_transformers_within_the_stated_tolerance(gguf_type, tiny_run, reference, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids, logits, effect, tok = reference
    tolerance = GGUF_TOLERANCE[gguf_type]
    assert effect > 2 * tolerance  # a file without the adapter would be off by more than the tolerance
    path = tmp_path / "model.gguf"
    assert main(["export", str(tiny_run), "--gguf", str(path), "--gguf_type", gguf_type]) == 0

    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf_type.upper() and types["blk.0.attn_norm.weight"] == "F32"
    assert types["token_embd.weight"] == ("Q8_0" if gguf_type.startswith("q4") else gguf_type.upper())

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        error = float((model(ids).logits - logits).abs().max())
    print(f"{gguf_type}: max |logit difference| {error:.2e} (tolerance {tolerance:g}, adapter effect {effect:.2f})")
    assert error <= tolerance

    read_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    sample = TEXT + "<|im_end|>\n<|im_start|>assistant\n"
    assert read_tok(sample)["input_ids"] == tok(sample)["input_ids"]
    assert read_tok.chat_template == tok.chat_template and read_tok.eos_token == tok.eos_token


def test_overwrite_replaces_targets(tiny_run, tmp_path):
    merged, gguf_file = tmp_path / "merged", tmp_path / "m.gguf"
    merged.mkdir()
    (merged / "old.txt").write_text("old")
    gguf_file.write_bytes(b"old")
    args = ["export", str(tiny_run), "--merged", str(merged), "--gguf", str(gguf_file), "--gguf_type", "q8_0"]
    assert main(args + ["--overwrite"]) == 0
    assert not (merged / "old.txt").exists() and (merged / "model.safetensors").is_file()
    assert gguf_file.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "merged"]  # no temp siblings left


@pytest.mark.parametrize("broken", ["save_merged", "write_gguf"])
def test_a_failed_overwrite_keeps_the_old_target(broken, tiny_run, tmp_path, monkeypatch):
    merged, gguf_file = tmp_path / "merged", tmp_path / "m.gguf"
    merged.mkdir()
    (merged / "old.txt").write_text("old")
    gguf_file.write_bytes(b"old")

    def half_written(*args):
        target = args[-1] if broken == "save_merged" else args[-2]
        (target / "partial" if broken == "save_merged" else target).write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, broken, half_written)
    target = ["--merged", str(merged)] if broken == "save_merged" else ["--gguf", str(gguf_file)]
    with pytest.raises(RuntimeError, match="disk full"):
        main(["export", str(tiny_run), *target, "--overwrite"])
    assert (merged / "old.txt").read_text() == "old" and not (merged / "partial").exists()
    assert gguf_file.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "merged"]


@pytest.fixture(scope="module")
def qwen2_run(tiny_run, tmp_path_factory):
    """A run folder whose base is a tiny Qwen2: merged export works, GGUF export is refused."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from oloraplus.adapters import attach_adapter, save_adapter

    root = tmp_path_factory.mktemp("qwen2")
    tok = build_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=2,
        pad_token_id=2,
    )
    Qwen2ForCausalLM(config).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    run = root / "run"
    model = attach_adapter(Qwen2ForCausalLM.from_pretrained(root / "base"), "gaussian", 4, 8, 0.0, None)
    save_adapter(model, run / "adapter", None)  # gaussian: the base is untouched, a plain save
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    cfg["model"]["name"] = str(root / "base")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


BAD = [
    (["{missing}", "--merged", "{out}"], "run folder not found: {missing}"),
    (["{not_a_run}", "--merged", "{out}"], "{not_a_run} is not a run folder (no config.yaml)"),
    (["{no_adapter}", "--gguf", "{out}"], "{no_adapter} has no saved adapter (adapter/adapter_config.json)"),
    (["{run}"], "nothing to export: give --merged DIR and/or --gguf FILE"),
    (["{run}", "--merged", "{existing_dir}"], "{existing_dir} already exists (pass --overwrite to replace it)"),
    (["{run}", "--gguf", "{existing_file}"], "{existing_file} already exists (pass --overwrite to replace it)"),
    (
        ["{run}", "--gguf", "{existing_dir}", "--overwrite"],
        "{existing_dir} is a folder; the export writes a file there",
    ),
    (
        ["{run}", "--merged", "{out}", "--gguf", "{out2}", "--gguf_type", "q3_k"],
        "unknown GGUF type 'q3_k' (known: f32, f16, bf16, q8_0, q4_1, q4_0)",
    ),
    (
        ["{qwen2}", "--merged", "{out}", "--gguf", "{out2}"],
        "cannot export to GGUF: 'qwen2' models are not supported (Llama-architecture models only)",
    ),
]


@pytest.mark.parametrize("args, message", BAD, ids=[m.split("(")[0][:40] for _, m in BAD])
def test_bad_input_one_line_exit_2_nothing_written(args, message, tiny_run, qwen2_run, tmp_path, capsys):
    (tmp_path / "not_a_run").mkdir()
    no_adapter = tmp_path / "no_adapter"
    no_adapter.mkdir()
    (no_adapter / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
    existing_dir, existing_file = tmp_path / "existing_dir", tmp_path / "existing.gguf"
    existing_dir.mkdir()
    (existing_dir / "keep.txt").write_text("keep")
    existing_file.write_bytes(b"keep")
    names = {
        "missing": tmp_path / "missing",
        "not_a_run": tmp_path / "not_a_run",
        "no_adapter": no_adapter,
        "run": tiny_run,
        "qwen2": qwen2_run,
        "out": tmp_path / "out",
        "out2": tmp_path / "out2.gguf",
        "existing_dir": existing_dir,
        "existing_file": existing_file,
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["export", *[a.format(**names) for a in args]]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"oloraplus: error: {message.format(**names)}"
    assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (existing_dir / "keep.txt").read_text() == "keep" and existing_file.read_bytes() == b"keep"


def test_a_model_gguf_cannot_hold_still_exports_merged(qwen2_run, tmp_path):
    assert main(["export", str(qwen2_run), "--merged", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()

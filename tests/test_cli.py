"""The CLI end to end on a tiny model: train, evaluate, and one-line errors (exit 2) for bad input."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from conftest import cli_args

from oloraplus.cli import main


def _train_args(model_dir, data, out, *extra):
    return cli_args(
        "train",
        *extra,
        model=model_dir,
        data=data,
        n_train=24,
        n_test=6,
        batch_size=4,
        max_new_tokens=8,
        output_dir=out,
        logging_steps=1,
        dynamics_every=2,
    )


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    import json as _json

    from conftest import _records

    data = tmp_path_factory.mktemp("data") / "small.json"
    data.write_text(_json.dumps(_records()[:60]))
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(_train_args(tiny_model_dir, data, out, "--method", "olora+", "--lr_ratio", "0.25", "--lr", "1e-3")) == 0
    return out, data


def test_train_writes_a_complete_run_folder(finished_run):
    out, _ = finished_run
    for name in (
        "config.yaml",
        "metrics.json",
        "predictions.jsonl",
        "history.json",
        "dynamics.jsonl",
        "train_loss.png",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "finished" and m["method"] == "olora+" and m["lr_ratio"] == 0.25
    if torch.cuda.is_available():
        assert m["device"] == torch.cuda.get_device_name()
    else:  # the CPU's kind, with the vector units that tell this project's two EPYC kinds apart
        assert m["device"].startswith("cpu: ") and torch.backends.cpu.get_cpu_capability() in m["device"]
    assert m["n_train"] == 24 and m["n_test"] == 6 and m["train_steps"] == 6 and m["train_tokens"] > 0
    for key in ("eval_loss", "bleu", "rouge1", "rouge2", "rougeL"):
        assert isinstance(m[key], float), key
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all("prediction" in r and "bleu_stats" in r for r in rows)
    dyn = [json.loads(line) for line in (out / "dynamics.jsonl").read_text().splitlines()]
    assert dyn[0] == {"step": 0, "dA": 0.0, "dB": 0.0, "drift": pytest.approx(0.0, abs=1e-5)}
    assert dyn[-1]["dA"] > 0 and dyn[-1]["dB"] > 0 and dyn[-1]["drift"] > 0
    adapter_cfg = json.loads((out / "adapter/adapter_config.json").read_text())
    assert adapter_cfg["r"] == 32  # OLoRA converted to a rank-2r LoRA for the original base


def test_evaluate_saved_adapter_on_the_original_base(finished_run):
    out, _ = finished_run
    assert main(["evaluate", str(out), "--generate", "false"]) == 0
    again = json.loads((out / "evaluation" / "metrics.json").read_text())
    trained = json.loads((out / "metrics.json").read_text())
    assert again["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-4)


def test_refuses_to_overwrite_a_finished_run(finished_run, tiny_model_dir, capsys):
    out, data = finished_run
    before = (out / "metrics.json").read_bytes()
    assert main(_train_args(tiny_model_dir, data, out)) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == before


BAD = [
    (["--data", "{missing}"], "data file not found"),
    (["--data", "{malformed}"], "malformed JSON at line 1"),
    (["--data", "{nokey}"], "record 1 has no field 'output'"),
    (["--data", "{nonstring}"], "record 0 field 'input' must be a string, got list"),
    (["--data", "{empty}"], "the dataset is empty"),
    (["--n_train", "50", "--n_test", "20"], "exceeds the 60 records"),
    (["--lr_ratio", "0"], "lr_ratio (lambda) must be a finite number > 0, got 0.0"),
    (["--lr_ratio", "-2"], "lr_ratio (lambda) must be a finite number > 0"),
    (["--lr_ratio", "nan"], "lr_ratio (lambda) must be a finite number > 0, got nan"),
    (["--lr_ratio", "inf"], "lr_ratio (lambda) must be a finite number > 0, got inf"),
    (["--method", "olora", "--lr_ratio", "4"], "use 'olora+' for lr_ratio 4"),
    (["--rank", "0"], "rank must be > 0, got 0"),
    (["--rank", "abc"], "option 'rank': 'abc' is not a valid int"),
    (["--rank", "100"], "rank 100 is too large for"),
    (["--method", "dora"], "unknown method 'dora'"),
    (["--model", "./no/such/model"], "model path does not exist: ./no/such/model"),
    (["--target_modules", "q_proj,qkv_fused"], "target module(s) not in the model: qkv_fused"),
    (["--config", "{missing}.yaml"], "config file not found"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[m for _, m in BAD])
def test_bad_input_one_line_exit_2_nothing_overwritten(extra, message, tiny_model_dir, small_data, tmp_path, capsys):
    files = {
        "missing": tmp_path / "missing.json",
        "malformed": tmp_path / "malformed.json",
        "nokey": tmp_path / "nokey.json",
        "nonstring": tmp_path / "nonstring.json",
        "empty": tmp_path / "empty.json",
    }
    files["malformed"].write_text('[{"instruction": ')
    files["nokey"].write_text(
        json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "input": ""}])
    )
    files["nonstring"].write_text(json.dumps([{"instruction": "a", "input": ["x"], "output": "b"}]))
    files["empty"].write_text("[]")
    extra = [e.format(**{k: str(v) for k, v in files.items()}) for e in extra]
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "predictions.jsonl").write_text("earlier results\n")
    assert main(_train_args(tiny_model_dir, small_data, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl"]
    assert (out / "predictions.jsonl").read_text() == "earlier results\n"


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "oloraplus.cli", "train", "--lr_ratio", "-1", "--output_dir", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "oloraplus: error: lr_ratio (lambda) must be a finite number > 0, got -1.0"
    assert not (tmp_path / "x").exists()


def test_help_explains_every_option():
    from oloraplus.cli import build_parser
    from oloraplus.config import flat_fields

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    helps = {a.dest: a.help or "" for a in train._actions}
    for flag, (_, f) in flat_fields().items():
        assert flag in helps, flag
        # each option states its own meaning and its own default, not just the word "default" somewhere
        assert f.metadata["help"] in helps[flag] and "[default: " in helps[flag], flag
        if f.default is not dataclasses.MISSING:
            assert f"[default: {f.default}]" in helps[flag], flag


def test_evaluate_uses_the_precision_the_run_evaluated_in(tiny_model_dir, small_data, tmp_path, capsys):
    from oloraplus.precision import bf16_supported

    out = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, small_data, out, "--max_steps", "1", "--generate", "false")) == 0
    recorded = json.loads((out / "metrics.json").read_text())
    assert recorded["eval_precision"] == "fp32" and recorded["eval_precision_choice"].startswith("auto:")  # a CPU
    # as if the run had evaluated in bf16: evaluate must follow it, not apply `auto` again; the same from a run
    # made before eval_precision was recorded, which evaluated in its training precision
    for metrics in ({**recorded, "eval_precision": "bf16"}, {**recorded, "eval_precision": None, "precision": "bf16"}):
        (out / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if v is not None}))
        rc = main(["evaluate", str(out), "--generate", "false"])
        if bf16_supported():
            assert rc == 0 and json.loads((out / "evaluation" / "metrics.json").read_text())["eval_precision"] == "bf16"
        else:
            assert rc == 2 and "eval_precision bf16 is not supported" in capsys.readouterr().err


def _compare_parser():
    from oloraplus.cli import build_parser

    return build_parser()._subparsers._group_actions[0].choices["compare"]


def test_compare_has_a_flag_with_help_and_default_for_every_grid_field():
    from oloraplus.grid import GridConfig

    helps = {a.dest: a.help or "" for a in _compare_parser()._actions}
    for f in dataclasses.fields(GridConfig):
        assert f.name in helps, f"GridConfig.{f.name} has no compare flag"
        assert f.metadata["help"] in helps[f.name] and "[default: " in helps[f.name], f.name
    for flag, default in [
        ("methods", "olora,olora+"),
        ("lr_ratios", "1/16,1/4,4,16"),
        ("seeds", "0,1,2"),
        ("baseline", "olora"),
        ("protocol", "fixed"),
        ("selection_seeds", "first"),
        ("probe_fraction", "1"),
    ]:
        assert f"[default: {default}" in helps[flag], (flag, helps[flag])


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], {}),
        (
            ["--lr_ratios", "1/16,4", "--seeds", "0,1", "--methods", "olora,olora+"],
            {"lr_ratios": [0.0625, 4.0], "seeds": [0, 1], "methods": ["olora", "olora+"]},
        ),
        (
            [
                "--methods",
                "lora,lora+,olora+",
                "--lr_ratios",
                "0.25,16",
                "--seeds",
                "3",
                "--lrs",
                "1e-4,2e-4,1e-4",
                "--baseline",
                "lora",
                "--protocol",
                "both",
                "--fixed_lr",
                "3e-4",
                "--selection_seeds",
                "all",
                "--probe_fraction",
                "0.5",
            ],
            {
                "methods": ["lora", "lora+", "olora+"],
                "lr_ratios": [0.25, 16.0],
                "seeds": [3],
                "lrs": [1e-4, 2e-4],
                "baseline": "lora",
                "protocol": "both",
                "fixed_lr": 3e-4,
                "selection_seeds": "all",
                "probe_fraction": 0.5,
            },
        ),
    ],
)
def test_compare_flags_parse_into_the_grid(flags, expected, monkeypatch, tmp_path):
    from oloraplus import study
    from oloraplus.grid import GridConfig

    seen = {}
    monkeypatch.setattr(study, "run_study", lambda d, base, grid, runner=None: seen.update(grid=grid) or [])
    assert main(["compare", "--study_dir", str(tmp_path / "s"), "--no_report", *flags]) == 0
    assert seen["grid"] == GridConfig(**expected)
    for name, value in expected.items():  # the same types as the field's, not just equal numbers
        assert (
            [type(v) for v in getattr(seen["grid"], name)] == [type(v) for v in value]
            if isinstance(value, list)
            else type(getattr(seen["grid"], name)) is type(value)
        ), name

"""--report_to: the tracker gets the training loss, the final test loss, BLEU and ROUGE, and method and lambda,
checked end to end with TensorBoard (already a dependency: no extra install), read back with its event reader."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURE, TINY, cli_args

from oloraplus.cli import main


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdirs = {p.parent for p in run_dir.glob("runs/*/events.out.tfevents.*")}
    assert len(logdirs) == 1, logdirs  # one tracker run, also after the final scores were logged
    events = EventAccumulator(str(logdirs.pop()), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_gets_training_loss_final_scores_method_and_lambda(tiny_model_dir, tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "run"
    args = cli_args(
        "train",
        model=tiny_model_dir,
        data=FIXTURE,
        **TINY,
        logging_steps=1,
        method="olora+",
        lr_ratio="0.25",
        lr="1e-3",
        report_to="tensorboard",
        output_dir=out,
    )
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    events = _events(out)

    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert len(scalars["train/loss"]) == 4  # every logged step
    final = {
        "test/loss": "eval_loss",
        "test/bleu": "bleu",
        "test/rouge1": "rouge1",
        "test/rouge2": "rouge2",
        "test/rougeL": "rougeL",
    }
    for tag, key in final.items():
        assert scalars[tag] == [pytest.approx(metrics[key], rel=1e-6)], tag
        assert [e.step for e in events.Scalars(tag)] == [metrics["train_steps"]], tag  # at the last step, not 0

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["method"].string_value == "olora+"
    assert hparams["lr_ratio"].number_value == 0.25
    args_text = events.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"method": "olora+"' in args_text and '"lr_ratio": 0.25' in args_text  # params, as every tracker logs them


@pytest.mark.parametrize(
    "report_to, message",
    [("tensorbored", "unknown tracker 'tensorbored'"), ("none,tensorboard", "'none', 'all' or tracker names")],
)
def test_a_bad_tracker_name_is_one_line_exit_2(report_to, message, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            cli_args(
                "train",
                model=tiny_model_dir,
                data=FIXTURE,
                report_to=report_to,
                output_dir=out,
            )
        )
        == 2
    )
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_tracker_that_is_not_installed_stops_before_any_file(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: ["tensorboard"])
    out = tmp_path / "run"
    assert (
        main(
            cli_args(
                "train",
                model=tiny_model_dir,
                data=FIXTURE,
                n_train=16,
                n_test=4,
                report_to="tensorboard,mlflow",
                output_dir=out,
            )
        )
        == 2
    )
    assert "tracker 'mlflow' is not installed" in capsys.readouterr().err
    assert not out.exists()

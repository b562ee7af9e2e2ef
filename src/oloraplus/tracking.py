"""Experiment trackers (`--report_to`): any logger transformers supports, with the end-of-run scores in the same run.

Trainer's tracker callbacks (TensorBoard, MLflow, W&B, trackio, ...) close their run in
on_train_end, which Trainer calls before train() returns, so anything logged after it (the
test loss, BLEU and ROUGE of the saved adapter) would be lost or, with MLflow, start a
second run. `hold_tracker_ends` keeps their on_train_end back; `TrackerRun.finish` sends the
final scores through the callbacks' own on_log, then lets them close. Method and λ reach
the trackers as params with the training arguments (see train.RunArguments).
"""

from __future__ import annotations

from typing import Any

from oloraplus.errors import OLoRAPlusError

# metrics.json key -> tracker key; Trainer's loggers file test_* under test/ and eval_* (validation) under eval/
FINAL_LOGS = {
    "eval_loss": "test_loss",  # metrics.json's eval_loss is the TEST loss
    "bleu": "test_bleu",
    "rouge1": "test_rouge1",
    "rouge2": "test_rouge2",
    "rougeL": "test_rougeL",
    "val_loss": "eval_loss",
}


def report_to_value(text: str) -> str | list[str]:
    """The config's report_to ("none", "all", or names joined by commas) as TrainingArguments takes it."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    return names[0] if names in (["none"], ["all"]) else names


def check_report_to(text: str, installed: bool = False) -> None:
    """Names transformers knows (and, with `installed`, whose package is here), else one line naming the bad one."""
    value = report_to_value(text)
    if value == "none":
        return
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    names = [value] if isinstance(value, str) else value
    if not names or "none" in names or ("all" in names and len(names) > 1):
        raise OLoRAPlusError(f"report_to: 'none', 'all' or tracker names joined by commas, got '{text}'")
    for name in names:
        if name != "all" and name not in INTEGRATION_TO_CALLBACK:
            raise OLoRAPlusError(
                f"report_to: unknown tracker '{name}' (known: none, all, {', '.join(INTEGRATION_TO_CALLBACK)})"
            )
        if installed and name != "all" and name not in get_available_reporting_integrations():
            raise OLoRAPlusError(f"report_to: tracker '{name}' is not installed (pip install the package of that name)")


class TrackerRun:
    """The trainer's tracker callbacks, their on_train_end held back until `finish`.

    Holds the callbacks, args, state and control, not the trainer: the trained model can be
    freed before the saved adapter is evaluated.
    """

    def __init__(self, trainer: Any):
        from transformers.integrations import INTEGRATION_TO_CALLBACK

        kinds = tuple(INTEGRATION_TO_CALLBACK.values())
        self.callbacks = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, kinds)]
        for cb in self.callbacks:
            cb.on_train_end = _held  # an instance attribute hides the method until finish() deletes it
        self.args, self.state, self.control = trainer.args, trainer.state, trainer.control

    def follow(self, trainer: Any) -> None:
        """Take the trainer's state after training: train() replaces the state object it started with, so the
        final scores would otherwise be logged at step 0."""
        self.state, self.control = trainer.state, trainer.control

    def finish(self, metrics: dict[str, Any] | None = None, hparams: dict[str, Any] | None = None) -> None:
        """Log the final scores found in `metrics` (and `hparams` where the tracker has a place for them), then close."""
        logs = {
            new: float(metrics[old])
            for old, new in FINAL_LOGS.items()
            if isinstance((metrics or {}).get(old), (int, float))
        }
        for cb in self.callbacks:
            del cb.on_train_end
            if logs:
                cb.on_log(self.args, self.state, self.control, logs=dict(logs))
                if hparams:
                    _tensorboard_hparams(cb, hparams, logs)
            cb.on_train_end(self.args, self.state, self.control)
        self.callbacks = []


def _held(*args: Any, **kwargs: Any) -> None:
    return None


def _tensorboard_hparams(cb: Any, hparams: dict[str, Any], logs: dict[str, float]) -> None:
    """TensorBoard's HPARAMS tab: this run's method/λ beside its final scores (Trainer 5.x writes no hparams)."""
    writer = getattr(cb, "tb_writer", None)
    file_writer = getattr(writer, "file_writer", None)
    if file_writer is None:
        return
    from torch.utils.tensorboard.summary import hparams as hparams_summary
    from transformers.integrations import rewrite_logs

    metric_names = {name: 0.0 for name in rewrite_logs(logs)}  # the tags on_log just wrote
    for summary in hparams_summary(hparams, metric_names):
        file_writer.add_summary(summary)
    writer.flush()

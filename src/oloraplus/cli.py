"""`oloraplus train | evaluate | compare | report | chat | export`.

Every run option is a flag built from the config dataclasses (so --help lists them
all with their meaning); a YAML file (--config) or a preset gives the starting
values, flags override them. User errors print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from oloraplus.config import SECTIONS, flat_fields
from oloraplus.errors import OLoRAPlusError
from oloraplus.grid import GRID_OPTIONS, grid_list_item_type

PRESETS = ("quick", "paper-cpu", "paper-cpu-tuned", "gemma3-cpu-tuned", "paper")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    for section in SECTIONS:
        group = parser.add_argument_group(f"{section} options")
        for name, (sec, f) in flat_fields().items():
            if sec != section:
                continue
            default = f.default if f.default is not dataclasses.MISSING else "see above"
            group.add_argument(
                f"--{name}",
                dest=name,
                default=argparse.SUPPRESS,
                metavar=name.split("_")[-1].upper(),
                help=f"{f.metadata['help']} [default: {default}]",
            )


def _shown(value: Any) -> str:
    """A default as one would type it: lists comma-separated, 0.0625 as 1/16."""
    if isinstance(value, list):
        return ",".join(_shown(v) for v in value)
    if isinstance(value, float) and 0 < value < 1 and (1 / value).is_integer():
        return f"1/{1 / value:g}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _add_grid_options(parser: argparse.ArgumentParser) -> None:
    """One flag per GridConfig field, with its help and default; build_grid parses the strings."""
    group = parser.add_argument_group("grid options (also the 'grid' section of --config)")
    for name, f in GRID_OPTIONS.items():
        if "default_text" in f.metadata:
            default = f.metadata["default_text"]
        else:
            default = _shown(f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
        listed = "; comma-separated" if grid_list_item_type(name) is not None else ""
        group.add_argument(f"--{name}", dest=name, help=f"{f.metadata['help']}{listed} [default: {default}]")


def _grid_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(ns, name) for name in GRID_OPTIONS}


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    flat = flat_fields()
    out = {k: v for k, v in vars(ns).items() if k in flat}
    if getattr(ns, "output_dir", None):
        out["output_dir"] = ns.output_dir
    return out


def load_preset(name: str) -> dict[str, Any]:
    from oloraplus.config import load_yaml

    if name not in PRESETS:
        raise OLoRAPlusError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")
    with importlib.resources.as_file(importlib.resources.files("oloraplus") / "presets" / f"{name}.yaml") as p:
        return load_yaml(p)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k].update(v)
        else:
            out[k] = v
    return out


def _study_file_data(ns: argparse.Namespace) -> dict[str, Any]:
    from oloraplus.config import load_yaml

    data: dict[str, Any] = {}
    if ns.preset:
        data = load_preset(ns.preset)
    if ns.config:
        data = _merge(data, load_yaml(ns.config))
    return data


# ---------------------------------------------------------------- commands


def cmd_train(ns: argparse.Namespace) -> int:
    from oloraplus.config import load_config
    from oloraplus.train import run_training

    cfg = load_config(ns.config, _overrides(ns))
    metrics = run_training(cfg, overwrite=ns.overwrite)
    _print_metrics(cfg.output_dir, metrics)
    return 0


def _print_metrics(where: str, metrics: dict[str, Any]) -> None:
    keys = (
        "status",
        "eval_loss",
        "val_loss",
        "bleu",
        "rouge1",
        "rouge2",
        "rougeL",
        "train_tokens_per_s",
        "train_seconds",
    )
    shown = {k: metrics[k] for k in keys if k in metrics}
    print(f"\n{where}:")
    for k, v in shown.items():
        print(f"  {k:<20} {v:.4f}" if isinstance(v, float) else f"  {k:<20} {v}")


def cmd_evaluate(ns: argparse.Namespace) -> int:
    from oloraplus.evaluate import evaluate_run

    metrics, out = evaluate_run(ns.run_dir, ns.config, _overrides(ns), ns.eval_dir)
    _print_metrics(str(out), metrics)
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    from oloraplus.config import build_config
    from oloraplus.grid import build_grid
    from oloraplus.study import check_study, format_table, run_study

    data = _study_file_data(ns)
    grid_data = data.pop("grid", {}) or {}
    study_dir = ns.study_dir or data.pop("study_dir", None) or f"studies/{ns.preset or 'study'}"
    data.pop("study_dir", None)
    grid = build_grid(grid_data, _grid_overrides(ns))
    base = build_config(data, _overrides(ns), source=ns.config or (f"preset {ns.preset}" if ns.preset else "config"))
    ray_opts = _ray_options(ns)
    failed: dict[str, str] = {}
    if ray_opts is None:
        rows = run_study(study_dir, base, grid)  # checks the protocol against the run config before any run
    else:
        from oloraplus.ray_study import ray_runner

        check_study(study_dir, base, grid)  # a bad grid fails before a cluster is joined or started
        with ray_runner(ray_opts) as runner:
            rows = run_study(study_dir, base, grid, runner)
        failed = runner.failed
    print("\n" + format_table(rows))
    if failed:
        print(f"\n{len(failed)} run(s) failed (rerun the same command to retry them):")
        print("\n".join(f"  {run_id}: {error}" for run_id, error in failed.items()))
    if not ns.no_report:
        from oloraplus.report import write_report

        paths = write_report(study_dir)
        print(f"\nreport: {paths[0]}")
    return 1 if failed else 0


RAY_FLAGS = ("ray_cpus_per_run", "ray_gpus_per_run", "ray_retries", "ray_sync", "ray_local_cpus")


def _ray_options(ns: argparse.Namespace) -> Any:
    """RayOptions from the --ray flags, None without --ray (the sequential path)."""
    given = {name: getattr(ns, name) for name in RAY_FLAGS if getattr(ns, name) is not None}
    if ns.ray is None:
        if given:
            raise OLoRAPlusError(f"--{next(iter(given))} needs --ray (local, auto or the cluster's address)")
        return None
    from oloraplus.ray_study import RayOptions

    return RayOptions.parse(
        ns.ray,
        **{name.removeprefix("ray_"): value for name, value in given.items()},
    )


def cmd_report(ns: argparse.Namespace) -> int:
    from oloraplus.report import write_report

    paths = write_report(ns.study_dir, data=ns.data, record_texts_from_data=not ns.no_record_texts)
    print("\n".join(str(p) for p in paths))
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    from oloraplus.chat import run_chat

    run_chat(ns.run_dir, ns.model, ns.prompt, ns.max_new_tokens, ns.temperature, ns.top_p)
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from oloraplus.export import export_run

    for path in export_run(ns.run_dir, ns.merged, ns.gguf, ns.gguf_type, ns.overwrite):
        print(path)
    return 0


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    """Where the study's runs train: how they are spread is not part of the study (study.yaml), so not grid options."""
    group = parser.add_argument_group("Ray options (several runs at once, on one machine or a cluster)")
    group.add_argument(
        "--ray",
        metavar="WHERE",
        help="train the runs as Ray tasks: local (start a Ray cluster on this machine), auto (the cluster `ray start` "
        "made here), or the head's HOST:PORT / ray://HOST:10001 [default: no Ray, one run after another]",
    )
    group.add_argument(
        "--ray_cpus_per_run", metavar="N", help="CPUs each run asks for, also its torch threads [default: 1]"
    )
    group.add_argument(
        "--ray_gpus_per_run",
        metavar="SHARE",
        help="share of a GPU each run asks for; 0.25 lets four small runs share one [default: 0.25 on a cluster "
        "with GPUs, else 0]",
    )
    group.add_argument(
        "--ray_retries", metavar="N", help="times a run is retried after its worker or node died [default: 2]"
    )
    group.add_argument(
        "--ray_sync",
        metavar="MODE",
        help="shared: every node sees the study folder at the same path; driver: the nodes share no filesystem, "
        "each run's files come back through Ray and this process writes them [default: shared]",
    )
    group.add_argument(
        "--ray_local_cpus", metavar="N", help="CPUs of the cluster --ray local starts [default: all cores]"
    )


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oloraplus",
        description="Fine-tune causal LMs with OLoRA+ (OLoRA init + LoRA+ learning rates) and compare it with its parents.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune one adapter, evaluate it, save the run folder")
    p.add_argument("--config", help="YAML config (sections: model, data, adapter, train, eval; output_dir)")
    p.add_argument(
        "--output_dir", help="run folder [default: runs/latest]; an unfinished run there resumes from its checkpoint"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="start over: replace a finished run, or a checkpoint, in output_dir"
    )
    _add_run_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a run's saved adapter on the ORIGINAL base model (or the base alone)")
    p.add_argument("run_dir", nargs="?", help="a run folder from `train` (omit to evaluate the base model itself)")
    p.add_argument("--config", help="YAML config (default: the run folder's config.yaml)")
    p.add_argument("--eval_dir", help="where to write metrics.json and predictions.jsonl [default: RUN_DIR/evaluation]")
    _add_run_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="a grid of methods x lambda x lr x seeds on one split; table and report")
    p.add_argument("--preset", choices=PRESETS, help=" | ".join(PRESETS) + " (see the README)")
    p.add_argument("--config", help=f"YAML config; a 'grid' section sets {', '.join(GRID_OPTIONS)}")
    p.add_argument("--study_dir", help="study folder (resumable) [default: studies/PRESET]")
    p.add_argument("--no_report", action="store_true", help="skip writing the report at the end")
    _add_ray_options(p)
    _add_grid_options(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="write report.md/html, results.csv/json and plots for a study folder")
    p.add_argument("study_dir", help="a folder made by `compare`")
    p.add_argument(
        "--data",
        help="the data file the runs were trained on, to quote the examples' instructions and references "
        "[default: the data.source of study.yaml, when that file is there]",
    )
    p.add_argument(
        "--no_record_texts",
        action="store_true",
        help="quote nothing from the data file (for a report to commit or share: Alpaca is CC BY-NC)",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("chat", help="talk to a run's model (base + adapter, the run's prompt format), tokens streamed")
    p.add_argument("run_dir", nargs="?", help="a run folder from `train` (or --model NAME for a base model)")
    p.add_argument("--model", help="chat with a base model instead: alias, hub id, folder or .gguf")
    p.add_argument("--prompt", help="answer this once and exit (a prompt piped on stdin does the same)")
    p.add_argument("--max_new_tokens", default="256", help="longest answer in tokens [default: 256]")
    p.add_argument("--temperature", default="0", help="0 = greedy; > 0 samples [default: 0]")
    p.add_argument("--top_p", default="1", help="nucleus sampling mass when sampling [default: 1]")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("export", help="a run's base + adapter as a plain transformers folder and/or a GGUF file")
    p.add_argument("run_dir", help="a run folder from `train`")
    p.add_argument("--merged", help="write a plain transformers folder here (no PEFT needed to load it)")
    p.add_argument("--gguf", help="write a GGUF file here (llama.cpp: llama-cli -m FILE -cnv)")
    p.add_argument("--gguf_type", default="f16", help="f32 | f16 | bf16 | q8_0 | q4_1 | q4_0 [default: f16]")
    p.add_argument("--overwrite", action="store_true", help="replace existing targets (written aside, then swapped in)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter, not ours to act on
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except OLoRAPlusError as e:
        print(f"oloraplus: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("oloraplus: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

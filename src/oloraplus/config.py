"""One frozen dataclass tree for a run: YAML load, flat CLI overrides, validation.

Every field carries its help text, so `--help` and the YAML schema cannot drift
apart: cli.py builds its flags from these fields.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from oloraplus.errors import OLoRAPlusError
from oloraplus.tracking import check_report_to

# method name -> (init, uses LoRA+ learning-rate ratio)
METHODS: dict[str, tuple[str, bool]] = {
    "lora": ("gaussian", False),
    "lora+": ("gaussian", True),
    "olora": ("olora", False),
    "olora+": ("olora", True),
    "pissa": ("pissa", False),
    "pissa+": ("pissa", True),
}
INITS = ("gaussian", "olora", "pissa")
DEFAULT_PLUS_LR_RATIO = 4.0


def _help(text: str, flag: str | None = None, **kw: Any) -> Any:
    """A field with its --help text; `flag` renames its command-line option."""
    return field(metadata={"help": text, "flag": flag}, **kw)


def default_data_source() -> str:
    """$OLORAPLUS_DATA (a local file, for offline machines) or the Stanford Alpaca hub id."""
    return os.environ.get("OLORAPLUS_DATA") or "tatsu-lab/alpaca"


@dataclass(frozen=True)
class ModelConfig:
    name: str = _help(
        "base model: an alias (smollm2-135m = the embedded SmolLM2-135M-Instruct GGUF, "
        "tinyllama = TinyLlama/TinyLlama-1.1B-Chat-v1.0), a hub id, a local folder or a .gguf file",
        flag="model",
        default="smollm2-135m",
    )
    precision: str = _help(
        "training precision: bf16 (bfloat16 autocast, fp32 adapter and optimizer), fp32, or auto (bf16 on a GPU "
        "with it and on a CPU with AVX512_BF16 but no AMX, fp32 on other CPUs: docs/benchmarks.md)",
        default="auto",
    )
    cache_dir: str | None = _help(
        "where dequantized GGUF models are cached (default: $OLORAPLUS_CACHE or ~/.cache/oloraplus)", default=None
    )


@dataclass(frozen=True)
class DataConfig:
    source: str = _help(
        "Alpaca-format records {instruction, input, output}: a hub dataset id or a .json/.jsonl/.csv/.parquet file "
        "(default: $OLORAPLUS_DATA if set, else tatsu-lab/alpaca)",
        flag="data",
        default_factory=default_data_source,
    )
    n_train: int = _help(
        "training records drawn from the data (validation, if any, is carved from these)", default=1000
    )
    n_test: int = _help("test records, disjoint from training", default=500)
    val_fraction: float = _help("fraction of the training records held out for validation (0 = none)", default=0.0)
    split_seed: int = _help("seed of the train/val/test split (fixed across training seeds)", default=42)
    max_length: int = _help("truncate prompt+response to this many tokens", default=512)


@dataclass(frozen=True)
class AdapterConfig:
    method: str = _help("lora | lora+ | olora | olora+ | pissa | pissa+", default="olora+")
    lr_ratio: float | None = _help(
        f"LoRA+ ratio lambda: B learns at lambda x lr (default {DEFAULT_PLUS_LR_RATIO:g} for '+' methods, 1 otherwise)",
        default=None,
    )
    rank: int = _help("LoRA rank r", default=16)
    alpha: float = _help("LoRA alpha (scale = alpha / r)", default=16.0)
    dropout: float = _help(
        "dropout on the adapter input (0, as PEFT's default: 0.05 was no better on 3 paired seeds, "
        "docs/results/ablation-order-dropout, and costs time and memory)",
        default=0.0,
    )
    target_modules: list[str] | None = _help(
        "module names to adapt (default: every linear projection in attention and MLP, never lm_head)", default=None
    )

    @property
    def init(self) -> str:
        return METHODS[self.method][0]

    @property
    def resolved_lr_ratio(self) -> float:
        """lr_ratio, or its default for the method when unset."""
        if self.lr_ratio is not None:
            return float(self.lr_ratio)
        return DEFAULT_PLUS_LR_RATIO if METHODS[self.method][1] else 1.0


@dataclass(frozen=True)
class TrainConfig:
    lr: float = _help("base learning rate (lora_A and non-adapter parameters)", default=2e-4)
    epochs: float = _help("training epochs", default=1.0)
    max_steps: int = _help("stop after this many optimizer steps (-1: run the epochs)", default=-1)
    batch_size: int = _help("per-device training batch size", default=8)
    grad_accum: int = _help("gradient accumulation steps", default=1)
    warmup_ratio: float = _help("fraction of steps with linear warmup", default=0.03)
    scheduler: str = _help("learning-rate schedule after warmup (a transformers scheduler name)", default="linear")
    weight_decay: float = _help("AdamW weight decay on matrices (never on biases or norms)", default=0.0)
    seed: int = _help("training seed: adapter init, data order, dropout", default=0)
    logging_steps: int = _help("log the training loss every N steps", default=5)
    dynamics_every: int = _help("record |A-A0|, |B-B0| and subspace drift every N steps", default=10)
    checkpoint_every: int = _help(
        "save a resumable checkpoint (adapter, optimizer, scheduler, RNG, data position) every N optimizer steps, "
        "rounded up to a multiple of logging_steps, and at the end of training; a killed run started again resumes "
        "from it (0 = never; 15: a killed paper-cpu run loses at most ~94 s on 2 Zen 3 cores, at the 6.25 s/step "
        "of docs/results/bench-lean-cpu)",
        default=15,
    )
    group_by_length: bool = _help(
        "draw batches of similar length (less padding, but a biased order); off: random order, as a stock Trainer",
        default=False,
    )
    packing: bool = _help(
        "lay each batch's examples end to end with attention kept inside each example: no padding, same gradient",
        default=True,
    )
    fused_lora: bool = _help(
        "train PEFT's plain LoRA layers (fp32 on a CPU, alpha = rank) without the adapter's extra passes over "
        "each layer's output: the same bits, faster; off: PEFT's own forward",
        default=True,
    )
    micro_batch_tokens: int = _help(
        "most tokens in one forward/backward: a longer packed batch is trained as several packs of whole "
        "examples (same gradient, bounded activation memory; 0 = the whole batch at once)",
        default=512,
    )
    max_memory_gb: float = _help(
        "peak memory budget in GB: packs, gradient checkpointing and the eval batch size are chosen to fit it, "
        "and a run that cannot fit stops before it starts (0 = no budget)",
        default=0.0,
    )
    report_to: str = _help(
        "experiment trackers, as transformers' TrainingArguments takes them: none, all, or names joined by commas "
        "(tensorboard, mlflow, wandb, trackio, ...; the tracker's package must be installed); they get the training "
        "loss, the final test loss, BLEU and ROUGE, and method and lr_ratio as params",
        default="none",
    )


@dataclass(frozen=True)
class EvalConfig:
    max_new_tokens: int = _help("longest generated answer, in tokens", default=128)
    eval_batch_size: int = _help(
        "generation / eval-loss batch size (more rows decode faster on a CPU, and their KV cache needs more "
        "memory: docs/benchmarks.md; where row groups decode, the cache holds 1.5 times as many rows)",
        default=64,
    )
    precision: str = _help(
        "test loss and answers in bf16 (autocast), fp32, or auto (fp32 on a CPU, where bf16 answers measured "
        "worse; the training precision on a GPU)",
        flag="eval_precision",
        default="auto",
    )
    generate: bool = _help("generate answers and score BLEU/ROUGE (off: eval loss only)", default=True)
    test: bool = _help(
        "evaluate on the test split (off for learning-rate selection runs, which must never read test data)",
        flag="eval_test",
        default=True,
    )


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/latest"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Settings that decide only how fast, in how much memory and with which trackers the same computation runs
# (float rounding aside): a study or an unfinished run resumed with other values goes on; each run's
# config.yaml records what it used.
SCHEDULE_ONLY = (
    ("eval", "eval_batch_size"),
    ("train", "micro_batch_tokens"),
    ("train", "fused_lora"),
    ("train", "max_memory_gb"),
    ("train", "checkpoint_every"),
    ("train", "report_to"),
)


def results_config(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict without its SCHEDULE_ONLY settings: what two runs must share to be the same run.

    Settings a saved config predates take their defaults (older runs' config.yaml lack eval.precision).
    """
    filled = build_config(data).to_dict()
    data = {k: v for k, v in filled.items() if k in data or k in SECTIONS}  # no output_dir where there was none
    return {
        section: {k: v for k, v in values.items() if (section, k) not in SCHEDULE_ONLY}
        if isinstance(values, dict)
        else values
        for section, values in data.items()
    }


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "adapter": AdapterConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


def flat_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Map each flat option name (field names are unique across sections) to (section, field)."""
    out: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            flag = f.metadata.get("flag") or f.name
            assert flag not in out, f"duplicate option {flag}"
            out[flag] = (section, f)
    return out


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Each field's annotation as a type (annotations are strings under `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for annotations like `float | None` or `list[str] | None`."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def list_item_type(annotation: Any) -> Any | None:
    """The item type of a list annotation (`list[float]`, `list[int] | None`), None for any other annotation."""
    tp, _ = _base_type(annotation)
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


def coerce(name: str, value: Any, annotation: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or say which option is wrong."""
    tp, optional = _base_type(annotation)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise OLoRAPlusError(f"option '{name}' needs a value")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            return str(value)
        if typing.get_origin(tp) is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [str(x).strip() for x in items if str(x).strip()]
    except (TypeError, ValueError):
        pass
    raise OLoRAPlusError(f"option '{name}': {value!r} is not a valid {getattr(tp, '__name__', tp)}")


def build_config(
    data: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None, source: str = "config"
) -> RunConfig:
    """Nested dict (from YAML) + flat overrides -> validated RunConfig."""
    data = dict(data or {})
    flat = flat_fields()
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    output_dir = data.pop("output_dir", RunConfig.output_dir)
    for section, values in data.items():
        if section not in SECTIONS:
            raise OLoRAPlusError(f"{source}: unknown section '{section}' (known: {', '.join(SECTIONS)}, output_dir)")
        if not isinstance(values, dict):
            raise OLoRAPlusError(f"{source}: section '{section}' must be a mapping")
        known = {f.name: f for f in fields(SECTIONS[section])}
        for key, value in values.items():
            if key not in known:
                raise OLoRAPlusError(f"{source}: unknown option '{section}.{key}'")
            sections[section][key] = coerce(f"{section}.{key}", value, field_types(SECTIONS[section])[key])
    for key, value in (overrides or {}).items():
        if key == "output_dir":
            output_dir = str(value)
            continue
        if key not in flat:
            raise OLoRAPlusError(f"unknown option '{key}'")
        section, f = flat[key]
        sections[section][f.name] = coerce(key, value, field_types(SECTIONS[section])[f.name])
    cfg = RunConfig(**{s: SECTIONS[s](**v) for s, v in sections.items()}, output_dir=str(output_dir))
    validate(cfg)
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise OLoRAPlusError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise OLoRAPlusError(f"{path}:{where} is not valid YAML") from None
    if not isinstance(data, dict):
        raise OLoRAPlusError(f"{path}: the top level must be a mapping")
    return data


def _finite_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise OLoRAPlusError(f"{name} must be a finite number > 0, got {value!r}")


def validate(cfg: RunConfig) -> None:
    a, t, d, e, m = cfg.adapter, cfg.train, cfg.data, cfg.eval, cfg.model
    if a.method not in METHODS:
        raise OLoRAPlusError(f"unknown method '{a.method}' (known: {', '.join(METHODS)})")
    if a.lr_ratio is not None:
        _finite_positive("lr_ratio (lambda)", a.lr_ratio)
        if not METHODS[a.method][1] and a.lr_ratio != 1:
            raise OLoRAPlusError(
                f"method '{a.method}' trains A and B at one learning rate; use '{a.method}+' for lr_ratio {a.lr_ratio:g}"
            )
    if a.rank <= 0:
        raise OLoRAPlusError(f"rank must be > 0, got {a.rank}")
    _finite_positive("alpha", a.alpha)
    if not 0 <= a.dropout < 1:
        raise OLoRAPlusError(f"dropout must be in [0, 1), got {a.dropout}")
    if a.target_modules is not None and not a.target_modules:
        raise OLoRAPlusError("target_modules is empty")
    _finite_positive("lr", t.lr)
    if t.epochs <= 0 and t.max_steps <= 0:
        raise OLoRAPlusError("set epochs > 0 or max_steps > 0")
    if t.micro_batch_tokens < 0:
        raise OLoRAPlusError(f"micro_batch_tokens must be >= 0, got {t.micro_batch_tokens}")
    if not (math.isfinite(t.max_memory_gb) and t.max_memory_gb >= 0):
        raise OLoRAPlusError(f"max_memory_gb must be a finite number >= 0, got {t.max_memory_gb}")
    for name in ("batch_size", "grad_accum", "logging_steps", "dynamics_every"):
        if getattr(t, name) <= 0:
            raise OLoRAPlusError(f"{name} must be > 0, got {getattr(t, name)}")
    if t.checkpoint_every < 0:
        raise OLoRAPlusError(f"checkpoint_every must be >= 0, got {t.checkpoint_every}")
    if not 0 <= t.warmup_ratio < 1:
        raise OLoRAPlusError(f"warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.weight_decay < 0:
        raise OLoRAPlusError(f"weight_decay must be >= 0, got {t.weight_decay}")
    check_report_to(t.report_to)  # known names; whether each is installed is checked when a run trains
    if d.n_train <= 0 or d.n_test <= 0:
        raise OLoRAPlusError(f"n_train and n_test must be > 0, got {d.n_train} and {d.n_test}")
    if not 0 <= d.val_fraction < 1:
        raise OLoRAPlusError(f"val_fraction must be in [0, 1), got {d.val_fraction}")
    if d.max_length < 8:
        raise OLoRAPlusError(f"max_length must be >= 8, got {d.max_length}")
    if e.max_new_tokens <= 0 or e.eval_batch_size <= 0:
        raise OLoRAPlusError("max_new_tokens and eval batch_size must be > 0")
    for name, value in (("precision", m.precision), ("eval_precision", e.precision)):
        if value not in ("auto", "bf16", "fp32"):
            raise OLoRAPlusError(f"{name} must be auto, bf16 or fp32, got '{value}'")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    data = load_yaml(path) if path else {}
    return build_config(data, overrides, source=str(path) if path else "config")

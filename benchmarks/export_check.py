"""What `oloraplus export` wrote, loaded back, against base + adapter: logits on one chat-formatted text.

    python benchmarks/export_check.py RUN [--merged DIR] [FILE.gguf ...] [--llama_python PY]
    # llama.cpp too: python -m venv /tmp/llama && /tmp/llama/bin/pip install --no-deps llama-cpp-cffi==0.4.42 cffi numpy

The reference is the run's original base + adapter in fp32 (what `oloraplus chat RUN` runs). Each line gives the
largest and mean |logit difference| and at how many positions the top token agrees, for: the merged folder
loaded by plain transformers in a fresh process (which must not import peft); each GGUF file read back by
transformers (`gguf_file=`); and with --llama_python, each GGUF file run by llama.cpp, which also reports
whether it tokenizes the text as the run's tokenizer does and its greedy answer to one message through the chat
template stored in the file.

Why this way: no llama.cpp is installed here and Debian bookworm packages none; llama-cpp-python builds llama.cpp
from source (many minutes of both cores). llama-cpp-cffi ships a prebuilt CPU library (llama.cpp of early 2025),
but its Python package pins transformers<5, so it lives in its own venv, installed with --no-deps, and the
check loads only its compiled library, by path. The wheel was built with GCC 14's C++ runtime and wants
`__cxa_call_terminate`, which bookworm's GCC 12 runtime lacks: when loading fails on that symbol, a two-line
shim is compiled with g++ and preloaded. Not part of the test suite (CI has no llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from oloraplus.prepare import load_tuned

MESSAGES = [
    {"role": "user", "content": "Give three tips for staying healthy."},
    {"role": "assistant", "content": "Eat vegetables, sleep well and walk every day."},
]
QUESTION = "Name three primary colours."

SHIM = """#include <exception>
extern "C" void *__cxa_begin_catch(void *) noexcept;
extern "C" [[noreturn]] void __cxa_call_terminate(void *e) noexcept { if (e) __cxa_begin_catch(e); std::terminate(); }
"""

LOAD_PLAIN = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits[0], sys.argv[3])
assert "peft" not in sys.modules, "loading the merged folder imported peft"
"""

# Runs under --llama_python: llama.cpp's C API through the wheel's cffi module, nothing of oloraplus.
CHILD = r"""
import ctypes, importlib.util, json, subprocess, sys
from pathlib import Path
import numpy as np

gguf_path, work, shim_src, n_new = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
spec = importlib.util.find_spec("llama")  # finds the package without running its __init__ (which needs transformers<5)
lib_file = next(Path(spec.submodule_search_locations[0]).glob("_llama_cpp_cpu*.so"))

def load():
    s = importlib.util.spec_from_file_location("_llama_cpp_cpu", lib_file)
    module = importlib.util.module_from_spec(s)
    s.loader.exec_module(module)
    return module

try:
    m = load()
except ImportError as e:
    if "__cxa_call_terminate" not in str(e):
        raise
    (work / "shim.cc").write_text(shim_src)
    subprocess.run(["g++", "-shared", "-fPIC", "-o", str(work / "shim.so"), str(work / "shim.cc")], check=True)
    ctypes.CDLL(str(work / "shim.so"), mode=ctypes.RTLD_GLOBAL)
    m = load()
lib, ffi = m.lib, m.ffi
lib.llama_backend_init()
model = lib.llama_model_load_from_file(gguf_path.encode(), lib.llama_model_default_params())
if model == ffi.NULL:
    sys.exit(f"llama.cpp could not load {gguf_path}")
vocab = lib.llama_model_get_vocab(model)
n_vocab = lib.llama_vocab_n_tokens(vocab)
params = lib.llama_context_default_params()
params.n_ctx = params.n_batch = 1024
params.n_threads = params.n_threads_batch = 1
ctx = lib.llama_init_from_model(model, params)

def tokenize(text):
    raw = text.encode()
    buf = ffi.new("llama_token[]", len(raw) + 8)
    n = lib.llama_tokenize(vocab, raw, len(raw), buf, len(raw) + 8, False, True)
    return [buf[i] for i in range(n)]

job = json.loads((work / "job.json").read_text())
ids = job["ids"]
batch = lib.llama_batch_init(len(ids), 0, 1)
batch.n_tokens = len(ids)
for i, t in enumerate(ids):
    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
    batch.seq_id[i][0] = 0
assert lib.llama_decode(ctx, batch) == 0
rows = [np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, i), 4 * n_vocab), np.float32) for i in range(len(ids))]
np.save(work / "logits.npy", np.stack(rows))
lib.llama_batch_free(batch)

template = lib.llama_model_chat_template(model, ffi.NULL)
message = ffi.new("struct llama_chat_message[]", 1)
role, content = ffi.new("char[]", b"user"), ffi.new("char[]", job["question"].encode())
message[0].role, message[0].content = role, content
out = ffi.new("char[]", 8192)
n = lib.llama_chat_apply_template(template, message, 1, True, out, 8192)
prompt = ffi.buffer(out, n)[:].decode()
lib.llama_kv_cache_clear(ctx)
sampler = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
lib.llama_sampler_chain_add(sampler, lib.llama_sampler_init_greedy())
pending = tokenize(prompt)
answer = []
for _ in range(n_new):
    tokens = ffi.new("llama_token[]", pending)
    assert lib.llama_decode(ctx, lib.llama_batch_get_one(tokens, len(pending))) == 0
    t = lib.llama_sampler_sample(sampler, ctx, -1)
    if lib.llama_vocab_is_eog(vocab, t):
        break
    piece = ffi.new("char[]", 256)
    answer.append(ffi.buffer(piece, lib.llama_token_to_piece(vocab, t, piece, 256, 0, False))[:])
    pending = [t]
print(json.dumps({"text_ids": tokenize(job["text"]), "prompt": prompt,
                  "answer": b"".join(answer).decode(errors="replace")}))
"""


def compare(name: str, logits: torch.Tensor, reference: torch.Tensor) -> None:
    diff = (logits - reference).abs()
    agree = int((logits.argmax(-1) == reference.argmax(-1)).sum())
    print(f"{name}: max |logit diff| {float(diff.max()):.3g}, mean {float(diff.mean()):.3g}; top-1 {agree}/{len(diff)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("gguf", nargs="*")
    p.add_argument("--merged", help="a folder from `oloraplus export RUN --merged DIR`")
    p.add_argument(
        "--llama_python", help="a python with llama-cpp-cffi, cffi and numpy: also run each GGUF in llama.cpp"
    )
    p.add_argument("--max_new_tokens", type=int, default=32)
    a = p.parse_intermixed_args()  # the GGUF files may come after --merged DIR
    warnings.filterwarnings("ignore", category=FutureWarning)

    model, tok, _ = load_tuned(a.run)
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0]
    del model
    print(f"{a.run}: {len(ids)} tokens, |logit| up to {float(reference.abs().max()):.1f}")
    if a.merged:
        with tempfile.TemporaryDirectory() as work:
            torch.save(torch.tensor([ids]), Path(work) / "ids.pt")
            cmd = [sys.executable, "-c", LOAD_PLAIN, a.merged, str(Path(work) / "ids.pt"), str(Path(work) / "out.pt")]
            subprocess.run(cmd, check=True)
            compare(f"{a.merged} (plain transformers, no peft)", torch.load(Path(work) / "out.pt"), reference)
    for gguf in a.gguf:
        path = Path(gguf)
        read = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        with torch.no_grad():
            compare(f"{path.name} read by transformers", read(torch.tensor([ids])).logits[0], reference)
        del read
        if not a.llama_python:
            continue
        with tempfile.TemporaryDirectory() as work:
            (Path(work) / "job.json").write_text(json.dumps({"ids": ids, "text": text, "question": QUESTION}))
            cmd = [a.llama_python, "-c", CHILD, str(Path(gguf).absolute()), work, SHIM, str(a.max_new_tokens)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{gguf}: llama.cpp failed:\n{proc.stderr[-3000:]}")
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            logits = torch.from_numpy(np.load(Path(work) / "logits.npy"))
        compare(f"{path.name} run by llama.cpp", logits, reference)
        print(f"  llama.cpp tokenizes the text as the run's tokenizer does: {got['text_ids'] == ids}")
        print(f"  llama.cpp greedy, {QUESTION!r} through the file's chat template: {got['answer']!r}")


if __name__ == "__main__":
    main()

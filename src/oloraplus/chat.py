"""`oloraplus chat`: talk to a run's fine-tuned model, or to a base model, with tokens streamed as they come.

The model is the run's ORIGINAL base with the run's adapter merged, read from its config.yaml
(`prepare.load_tuned`: what `oloraplus evaluate RUN` loads); `--model NAME` instead takes any model `train`
accepts (alias, hub id, folder, .gguf) as it is. Prompts are built the way training and evaluation build
them (`data.conversation_ids`): the tokenizer's chat template over the whole conversation when it has one;
otherwise the Alpaca prompt, grown turn by turn: the preamble once, then per exchange
"### Instruction:\\n{message}\\n\\n### Response:\\n{answer}", exchanges a blank line apart, ending on an open
"### Response:\\n". A first message is exactly the prompt of an Alpaca record with that instruction and no
input, so greedy `chat RUN --prompt TEXT` prints what evaluation's `generate_answers` gives for it.

Three modes: `--prompt TEXT` answers once; a prompt piped on stdin (not a terminal) answers once, for
scripts; otherwise a conversation whose history is kept until /quit, /exit or end of input (/reset clears
it). When the conversation outgrows the model's context, the oldest exchanges are left out of the prompt.
Greedy by default; `--temperature T` > 0 samples (with `--top_p`), `--max_new_tokens` bounds an answer (one
cut there is followed by a note on stderr, so it does not pass for a finished answer).
"""

from __future__ import annotations

import math
import sys

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, TextStreamer
from transformers.utils import logging as hf_logging

from oloraplus.config import coerce
from oloraplus.data import conversation_ids
from oloraplus.errors import OLoRAPlusError
from oloraplus.models import compute_device, load_base
from oloraplus.prepare import load_tuned

QUIT = ("/quit", "/exit")
RESET = "/reset"


def sampling_options(
    max_new_tokens: str | int, temperature: str | float, top_p: str | float
) -> tuple[int, float, float]:
    """The three generation flags, checked: max_new_tokens >= 1, temperature >= 0 (0 = greedy), 0 < top_p <= 1."""
    n = coerce("max_new_tokens", max_new_tokens, int)
    t = coerce("temperature", temperature, float)
    p = coerce("top_p", top_p, float)
    if n < 1:
        raise OLoRAPlusError(f"--max_new_tokens must be >= 1, got {n}")
    if not (math.isfinite(t) and t >= 0):
        raise OLoRAPlusError(f"--temperature must be a finite number >= 0 (0 = greedy), got {t}")
    if not 0 < p <= 1:
        raise OLoRAPlusError(f"--top_p must be in (0, 1], got {p}")
    return n, t, p


def load_chat_model(run_dir: str | None, model_name: str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A run's base + adapter, or a base model by name; on the GPU when there is one."""
    if run_dir and model_name:
        raise OLoRAPlusError("give a run folder or --model NAME, not both (a run names its own base model)")
    if run_dir:
        model, tokenizer, _ = load_tuned(run_dir)
    elif model_name:
        model, tokenizer = load_base(model_name)
    else:
        raise OLoRAPlusError("chat needs a run folder (oloraplus chat RUN) or a base model (--model NAME)")
    return model.to(compute_device()).eval(), tokenizer


class Chat:
    """A conversation with one model: `reply` streams an answer to stdout and keeps the exchange."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.messages: list[dict[str, str]] = []
        sample = temperature > 0
        self.generation = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=0 if sample else None,  # only the flags shape sampling
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        context = getattr(model.config, "max_position_embeddings", None)
        self.prompt_budget = max(1, context - max_new_tokens) if context else None

    def prompt_ids(self, message: str) -> list[int]:
        """The conversation so far plus `message`, oldest exchanges left out while it does not fit the context."""
        turns = self.messages + [{"role": "user", "content": message}]
        ids = conversation_ids(self.tokenizer, turns)
        while self.prompt_budget and len(ids) > self.prompt_budget and len(turns) > 1:
            turns = turns[2:]
            ids = conversation_ids(self.tokenizer, turns)
        return ids[-self.prompt_budget :] if self.prompt_budget else ids

    @torch.no_grad()
    def reply(self, message: str) -> str:
        """Generate an answer to `message`, printing its text to stdout as tokens arrive; returns it stripped."""
        ids = torch.tensor([self.prompt_ids(message)], device=next(self.model.parameters()).device)
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=self.generation,
            streamer=streamer,
        )
        new = out[0, ids.shape[1] :]
        if self.was_cut(new):
            sys.stdout.flush()  # the note comes after the streamed text, also when stdout is a pipe
            print(f"(answer cut at --max_new_tokens {self.generation.max_new_tokens})", file=sys.stderr)
        answer = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        self.messages += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        return answer

    def was_cut(self, new_tokens: torch.Tensor) -> bool:
        """Whether generation stopped at the token limit rather than on EOS: the answer may end mid-sentence."""
        eos = self.generation.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        return len(new_tokens) >= self.generation.max_new_tokens and int(new_tokens[-1]) not in eos

    def reset(self) -> None:
        self.messages = []


def converse(chat: Chat) -> None:
    """The interactive loop: one line per message; /reset clears the history; /quit, /exit or EOF ends it."""
    try:
        import readline  # noqa: F401  line editing and history for input(), where the platform has it
    except ImportError:
        pass
    print(f"chatting; {RESET} clears the history, {' or '.join(QUIT)} (or Ctrl-D) ends", file=sys.stderr)
    while True:
        try:
            message = input(">>> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if message in QUIT:
            return
        if message == RESET:
            chat.reset()
            print("(history cleared)", file=sys.stderr)
        elif message:
            chat.reply(message)


def run_chat(
    run_dir: str | None,
    model_name: str | None,
    prompt: str | None,
    max_new_tokens: str | int = 256,
    temperature: str | float = 0.0,
    top_p: str | float = 1.0,
) -> None:
    """`oloraplus chat`: once for --prompt or a piped prompt, else a conversation on the terminal."""
    options = sampling_options(max_new_tokens, temperature, top_p)
    if prompt is not None and not prompt.strip():
        raise OLoRAPlusError("--prompt is empty")
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise OLoRAPlusError("no prompt on stdin (pipe one in, pass --prompt TEXT, or run in a terminal to chat)")
    hf_logging.set_verbosity_error()  # generation-config chatter is not for a chat window
    model, tokenizer = load_chat_model(run_dir, model_name)
    chat = Chat(model, tokenizer, *options)
    if prompt is not None:
        chat.reply(prompt.strip())
    else:
        converse(chat)

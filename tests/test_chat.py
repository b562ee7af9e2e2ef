"""`oloraplus chat` on a tiny run: the answer evaluation would give, a conversation that keeps (and resets) its
history, a piped prompt, a base model by --model, and one-line errors for bad input."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import build_tokenizer

import oloraplus.chat as chat_module
from oloraplus.cli import main
from oloraplus.data import conversation_ids, conversation_text, prompt_text
from oloraplus.generation import generate_answers, greedy_decode
from oloraplus.models import load_base
from oloraplus.prepare import load_tuned

PROMPT = "Give three tips for staying healthy."
N = "16"


def _evaluation_answer(model, tokenizer, instruction: str) -> str:
    rec = {"instruction": instruction, "input": "", "output": ""}
    return generate_answers(model, tokenizer, [rec], max_new_tokens=int(N), batch_size=1)[0][0]


@pytest.fixture(scope="module")
def expected(tiny_run, tiny_model_dir):
    """Evaluation's greedy answer to PROMPT with the run's adapter, and the base model's (which must differ)."""
    tuned, tok, _ = load_tuned(tiny_run)
    base, _ = load_base(str(tiny_model_dir))
    return _evaluation_answer(tuned, tok, PROMPT), _evaluation_answer(base, tok, PROMPT)


def test_prompt_once_gives_the_evaluation_answer(tiny_run, expected, capsys):
    tuned_answer, base_answer = expected
    assert tuned_answer and tuned_answer != base_answer  # so a chat without the adapter would fail here
    assert main(["chat", str(tiny_run), "--prompt", PROMPT, "--max_new_tokens", N]) == 0
    assert capsys.readouterr().out.strip() == tuned_answer


def test_prompt_on_stdin_answers_once(tiny_run, expected, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT + "\n"))
    assert main(["chat", str(tiny_run), "--max_new_tokens", N]) == 0
    assert capsys.readouterr().out.strip() == expected[0]


def test_model_flag_chats_with_the_base_model(tiny_model_dir, expected, capsys):
    assert main(["chat", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--max_new_tokens", N]) == 0
    assert capsys.readouterr().out.strip() == expected[1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_conversation_keeps_history_until_reset_and_quit(tiny_run, capsys, monkeypatch):
    prompts: list[list[int]] = []
    answers: list[str] = []
    reply = chat_module.Chat.reply

    def spy(self, message):
        prompts.append(self.prompt_ids(message))
        answers.append(reply(self, message))
        return answers[-1]

    monkeypatch.setattr(chat_module.Chat, "reply", spy)
    lines = [PROMPT, "Name a colour.", "/reset", "Why is the sky blue?", "/quit", "never read"]
    monkeypatch.setattr("sys.stdin", _Terminal("\n".join(lines) + "\n"))
    assert main(["chat", str(tiny_run), "--max_new_tokens", N]) == 0
    assert len(prompts) == 3  # nothing after /quit

    _, tok, _ = load_tuned(tiny_run)
    second = tok.decode(prompts[1])
    assert PROMPT in second and answers[0] in second and "Name a colour." in second
    first_exchange = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": answers[0]}]
    assert prompts[1] == conversation_ids(tok, first_exchange + [{"role": "user", "content": "Name a colour."}])
    third = tok.decode(prompts[2])
    assert PROMPT not in third and "Name a colour." not in third  # /reset cleared the history
    assert prompts[2] == conversation_ids(tok, [{"role": "user", "content": "Why is the sky blue?"}])
    out = capsys.readouterr().out
    assert all(a in out for a in answers)


def test_second_turn_answer_is_greedy_on_the_whole_conversation(tiny_run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", _Terminal(f"{PROMPT}\nName a colour.\n"))  # ends on EOF, no /quit
    assert main(["chat", str(tiny_run), "--max_new_tokens", N]) == 0
    model, tok, _ = load_tuned(tiny_run)
    first = _evaluation_answer(model, tok, PROMPT)
    turns = [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Name a colour."},
    ]
    (row,) = greedy_decode(model, [conversation_ids(tok, turns)], int(N), tok.eos_token_id, tok.pad_token_id)
    second = tok.decode(row, skip_special_tokens=True).strip()
    out = capsys.readouterr().out
    assert out.index(first) < out.rindex(second) and second != first


def test_conversation_format_without_a_chat_template():
    """Alpaca turn by turn: one message is exactly the trained prompt; later ones follow the earlier exchange."""
    tok = build_tokenizer(chat_template=False)
    rec = {"instruction": "Say hi.", "input": "", "output": ""}
    one = conversation_text(tok, [{"role": "user", "content": "Say hi."}])
    assert one == prompt_text(tok, rec)
    two = conversation_text(
        tok,
        [
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "Again."},
        ],
    )
    assert two == one + "hi\n\n### Instruction:\nAgain.\n\n### Response:\n"
    templated = build_tokenizer()
    assert conversation_text(templated, [{"role": "user", "content": "Say hi."}]) == prompt_text(templated, rec)


def test_an_answer_cut_by_max_new_tokens_says_so_on_stderr(tiny_run, capsys):
    """A greedy answer that stops mid-sentence at the limit must not look finished; one that ends on EOS says nothing."""
    assert main(["chat", str(tiny_run), "--prompt", PROMPT, "--max_new_tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == "(answer cut at --max_new_tokens 2)"
    assert "cut" not in captured.out

    chat = chat_module.Chat(*load_tuned(tiny_run)[:2], max_new_tokens=3)
    eos = chat.tokenizer.eos_token_id
    assert chat.was_cut(torch.tensor([5, 6, 7])) and not chat.was_cut(torch.tensor([5, 6, eos]))
    assert not chat.was_cut(torch.tensor([5, eos]))  # ended before the limit


def test_sampling_flags_sample(tiny_run, capsys):
    torch.manual_seed(0)
    args = ["chat", str(tiny_run), "--prompt", PROMPT, "--max_new_tokens", N, "--temperature", "5", "--top_p", "0.9"]
    assert main(args) == 0
    hot = capsys.readouterr().out.strip()
    assert main(["chat", str(tiny_run), "--prompt", PROMPT, "--max_new_tokens", N]) == 0
    assert hot != capsys.readouterr().out.strip()


BAD = [
    (["{missing}"], "run folder not found: {missing}"),
    (["{not_a_run}"], "{not_a_run} is not a run folder (no config.yaml)"),
    (["{no_adapter}"], "{no_adapter} has no saved adapter (adapter/adapter_config.json)"),
    (["{run}", "--model", "x"], "give a run folder or --model NAME, not both"),
    ([], "chat needs a run folder (oloraplus chat RUN) or a base model (--model NAME)"),
    (["{run}", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["{run}", "--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
    (["{run}", "--max_new_tokens", "0"], "--max_new_tokens must be >= 1, got 0"),
    (["{run}", "--max_new_tokens", "many"], "option 'max_new_tokens': 'many' is not a valid int"),
    (["{run}", "--prompt", " "], "--prompt is empty"),
    (["{run}", "<empty stdin>"], "no prompt on stdin"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[m.split(":")[0][:40] for _, m in BAD])
def test_bad_input_one_line_exit_2(args, message, tiny_run, tmp_path, capsys, monkeypatch):
    (tmp_path / "not_a_run").mkdir()
    no_adapter = tmp_path / "no_adapter"
    no_adapter.mkdir()
    (no_adapter / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
    names = {
        "missing": tmp_path / "missing",
        "not_a_run": tmp_path / "not_a_run",
        "no_adapter": no_adapter,
        "run": tiny_run,
    }
    if "<empty stdin>" in args:
        args = [a for a in args if a != "<empty stdin>"]
        monkeypatch.setattr("sys.stdin", io.StringIO("  \n"))
    elif "--prompt" not in args:
        args = [*args, "--prompt", PROMPT]
    args = [a.format(**names) for a in args]
    assert main(["chat", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"oloraplus: error: {message.format(**names)}" or (
        message.format(**names) in captured.err and len(captured.err.strip().splitlines()) == 1
    ), captured.err
    assert captured.out == ""


def test_a_long_conversation_leaves_out_its_oldest_exchanges(tiny_model_dir):
    model, tok = load_base(str(tiny_model_dir))
    chat = chat_module.Chat(model, tok, max_new_tokens=8)
    chat.messages = [
        {"role": role, "content": f"{role} message {i}"} for i in range(6) for role in ("user", "assistant")
    ]
    full = chat.prompt_ids("last question")
    chat.prompt_budget = len(full) - 1  # one token too long: the oldest exchange goes, the rest stays
    shorter = tok.decode(chat.prompt_ids("last question"))
    assert "message 0" not in shorter and "user message 1" in shorter and "last question" in shorter
    chat.prompt_budget = 5  # not even the question fits: its last tokens
    assert (
        chat.prompt_ids("last question") == conversation_ids(tok, [{"role": "user", "content": "last question"}])[-5:]
    )

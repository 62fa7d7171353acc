"""The evaluation tasks: program generator and its ground truth, the sandbox, HumanEval harness, bits per byte,
line completion, code reasoning, and `parloop eval`."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from parloop import PLTConfig, PLTForCausalLM
from parloop.cli import main
from parloop.eval.bpb import _windows, bits_per_byte
from parloop.eval.decoding import generate_texts
from parloop.eval.held_out import held_out_texts
from parloop.eval.humaneval import check_humaneval, humaneval_problems, pass_at_k, truncate_completion
from parloop.eval.lines import _line_targets, line_completion
from parloop.eval.programs import (
    Program,
    held_out_set,
    is_correct,
    is_held_out,
    read_prediction,
    run_python,
    training_programs,
)
from parloop.eval.reasoning import code_reasoning
from parloop.eval.tokens import encode
from parloop.padding import left_pad
from parloop.train.corpus import Corpus, build_corpus, train_tokenizer

# -- programs ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def held_out() -> list[Program]:
    return held_out_set(40)


def test_ground_truth_is_what_each_program_prints(held_out: list[Program]) -> None:
    # an independent run, outside the sandbox, must print exactly what was recorded
    for program in held_out[:25]:
        plain = subprocess.run([sys.executable, "-c", program.source], capture_output=True, text=True, timeout=30)
        assert plain.returncode == 0, program.source
        assert plain.stdout == program.output, program.source


def test_programs_use_every_construct(held_out: list[Program]) -> None:
    text = "".join(p.source for p in held_out + training_programs(60, seed=5))
    for construct in ("if ", "else:", "for ", "while ", "def ", "return ", ".append(", "range(", "len(", " * ",
                      "'", ".upper()", ".replace(", "[::-1]", "print("):
        assert construct in text, construct
    assert re.search(r"^\w+ = (f|g|h|step|combine)\(", text, re.MULTILINE)  # a call of a generated function


def test_held_out_set_is_fixed_and_disjoint_from_training(held_out: list[Program]) -> None:
    assert held_out_set(15) == held_out[:15]  # a fixed set: a prefix of a larger one
    assert all(is_held_out(p.source) for p in held_out)
    training = training_programs(100, seed=0) + training_programs(40, seed=7)
    assert not any(is_held_out(p.source) for p in training)
    assert not {p.source for p in held_out} & {p.source for p in training}
    assert len({p.source for p in training}) > 100  # different seeds give different programs


def test_prediction_is_read_up_to_the_end_marker() -> None:
    program = Program("print(3)\nprint('ab')\n", "3\nab\n")
    assert read_prediction("3\nab\n# end\nx = 1\n") == "3\nab"
    assert is_correct(program, "3\nab  \n# end\n")
    assert is_correct(program, "3\nab\n\nprint(4)")
    assert not is_correct(program, "3\nab\n4\n# end\n")
    assert not is_correct(program, "3\n# end\n")
    assert not is_correct(program, "")


# -- the sandbox ------------------------------------------------------------------------------------------------

def test_sandbox_runs_code_and_reports_failures() -> None:
    assert run_python("print(6 * 7)").stdout == "42\n"
    failed = run_python("raise ValueError('no')")
    assert not failed.ok and "ValueError: no" in failed.stderr


def test_sandbox_stops_runaway_code_within_the_time_limit() -> None:
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", timeout=1.0)
    assert result.timed_out and not result.ok
    assert time.monotonic() - start < 8


@pytest.mark.parametrize("code", [
    "import socket\nsocket.create_connection(('127.0.0.1', 9))",
    "import _socket\n_socket.socket()",
    "import subprocess\nsubprocess.run(['true'])",
    "import os\nos.system('true')",
])
def test_sandbox_has_no_network_and_no_processes(code: str) -> None:
    result = run_python(code)
    assert not result.ok
    assert "not allowed in parloop's sandbox" in result.stderr


# -- HumanEval --------------------------------------------------------------------------------------------------

def test_humaneval_harness_passes_canonical_and_fails_broken_solutions() -> None:
    problems = humaneval_problems()
    assert len(problems) == 164
    assert all(check_humaneval(problems, [p["canonical_solution"] for p in problems]))
    assert not any(check_humaneval(problems, ["    pass\n"] * len(problems)))
    some = problems[::20]
    # a right answer after a network call, or after a hang, must not count
    networked = ["    import socket\n    socket.socket()\n" + p["canonical_solution"] for p in some]
    assert not any(check_humaneval(some, networked))
    hanging = ["    while True:\n        pass\n" + p["canonical_solution"] for p in some[:2]]
    assert not any(check_humaneval(some[:2], hanging, timeout=1.0))


def test_pass_at_k_is_the_unbiased_estimator() -> None:
    assert pass_at_k(5, [2], 1) == pytest.approx(0.4)
    assert pass_at_k(5, [2], 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))
    assert pass_at_k(5, [0, 5], 3) == pytest.approx(0.5)


def test_completion_is_cut_at_the_next_top_level_statement() -> None:
    body = "    x = 1\n    # keep this comment\n    return x\n"
    assert truncate_completion(body + "\n\ndef other():\n    pass\n") == body + "\n"
    assert truncate_completion(body + "\nprint(f(1))") == body
    assert truncate_completion(body) == body


# -- with a model -----------------------------------------------------------------------------------------------

def make_tokenizer(texts: list[str], vocab: int = 320) -> PreTrainedTokenizerFast:
    """The corpus tokenizer of `parloop data build` (BOS = EOS = <|endoftext|>), trained on `texts`."""
    return train_tokenizer(texts, vocab)


def make_model(vocab: int, loops: int = 2, seed: int = 0) -> PLTForCausalLM:
    torch.manual_seed(seed)
    config = PLTConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       plt_num_loops=loops, plt_window_size=[8, 0], bos_token_id=None, eos_token_id=0,
                       pad_token_id=0)
    return PLTForCausalLM(config).eval()


def fit(model: PLTForCausalLM, tokenizer: PreTrainedTokenizerFast, texts: list[str], steps: int) -> None:
    """Train on `texts` (a few steps: enough to learn some of them by heart)."""
    seqs = [encode(tokenizer, t) + [tokenizer.eos_token_id] for t in texts]
    ids, mask = left_pad(seqs, tokenizer.pad_token_id, torch.device("cpu"))
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains faster on one thread, much faster on a busy machine
    model.train()
    try:
        for _ in range(steps):
            loss = model(ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


@pytest.fixture(scope="module")
def learned() -> tuple[PLTForCausalLM, PreTrainedTokenizerFast, list[Program]]:
    """A tiny model that has seen four programs with their outputs, trained until it knows most of them."""
    programs = training_programs(4, seed=3)
    tokenizer = make_tokenizer([p.example() for p in programs] * 3)
    model = make_model(len(tokenizer))
    fit(model, tokenizer, [p.example() for p in programs], steps=80)
    return model, tokenizer, programs


@pytest.mark.parametrize("bos", [True, False])
def test_bits_per_byte_of_a_short_text_is_the_model_loss_in_bits(bos: bool) -> None:
    text = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"
    tokenizer = make_tokenizer([text] * 4, vocab=280)
    if not bos:
        tokenizer.bos_token = None
    model = make_model(len(tokenizer))
    ids = encode(tokenizer, text)
    assert (ids[0] == tokenizer.bos_token_id) == bos
    with torch.no_grad():
        loss = float(model(torch.tensor([ids]), labels=torch.tensor([ids])).loss)
    # without a BOS the first token is not predicted, so its bytes are not counted
    first_token_bytes = 0 if bos else len(tokenizer.decode(ids[:1]).encode())
    expected = loss * (len(ids) - 1) / math.log(2) / (len(text.encode()) - first_token_bytes)
    result = bits_per_byte(model, tokenizer, [text, text + "x = 1\n"])
    assert result.text_bits[0] / result.text_bytes[0] == pytest.approx(expected, rel=1e-5)
    assert result.bits_per_byte == pytest.approx(sum(result.text_bits) / sum(result.text_bytes))
    # a context shorter than the text changes what each token sees, but not which tokens are scored
    assert bits_per_byte(model, tokenizer, [text], context=8).tokens == len(ids) - 1


@pytest.mark.parametrize(("n", "context"), [(1, 4), (2, 4), (10, 4), (11, 5), (100, 16), (7, 64)])
def test_windows_score_every_token_once_with_context(n: int, context: int) -> None:
    scored = []
    for i, (begin, end, first) in enumerate(_windows(n, context)):
        assert end - begin <= context and begin < first <= end
        assert i == 0 or first - begin >= context // 2
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_line_targets_are_the_tokens_of_each_line() -> None:
    text = "import os\n\ndef f(x):\n    # comment\n    return x + 1\n"
    tokenizer = make_tokenizer([text] * 4, vocab=270)
    ids, spans = encode(tokenizer, text, offsets=True)
    lines = [tokenizer.decode(ids[i:j]) for i, j in _line_targets(text, spans, 6)]
    # the first line is predicted from the BOS; blank, comment and short lines are skipped; indentation that the
    # tokenizer merged into the line break before it is context, the rest of the line is the target
    assert [line.strip() for line in lines] == ["import os", "def f(x):", "return x + 1"]
    assert lines[2].endswith("return x + 1") and "    return x + 1".endswith(lines[2])
    tokenizer.bos_token = None
    ids, spans = encode(tokenizer, text, offsets=True)
    lines = [tokenizer.decode(ids[i:j]).strip() for i, j in _line_targets(text, spans, 6)]
    assert lines == ["def f(x):", "return x + 1"]  # without a BOS, the first line has no context


def test_line_completion_agrees_with_greedy_generation(learned) -> None:
    model, tokenizer, programs = learned
    texts = [p.example() for p in programs]
    result = line_completion(model, tokenizer, texts, max_lines=1000)
    # the same lines, completed by actually generating from the context before each
    agree = 0
    lines = 0
    for text in texts:
        ids, spans = encode(tokenizer, text, offsets=True)
        targets = _line_targets(text, spans, 6)
        lines += len(targets)
        with torch.no_grad():
            for i, j in targets:
                out = model.generate(torch.tensor([ids[:i]]), max_new_tokens=j - i, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
                agree += out[0, i:].tolist() == ids[i:j]
    assert result["lines"] == lines
    assert result["correct"] == agree
    assert agree > 0  # the model has learned some lines, so the comparison is not 0 == 0


def test_code_reasoning_scores_learned_programs_and_not_an_untrained_model(learned) -> None:
    model, tokenizer, programs = learned
    learned_result = code_reasoning(model, tokenizer, programs)
    untrained = code_reasoning(make_model(len(tokenizer), seed=1), tokenizer, programs)
    assert learned_result["programs"] == 4
    assert learned_result["correct"] >= 2
    assert untrained["correct"] == 0
    # the score is the exact match of what greedy decoding writes after the prompt
    texts = generate_texts(model, tokenizer, [p.prompt() for p in programs], 40)
    assert learned_result["correct"] == sum(is_correct(p, t[0]) for p, t in zip(programs, texts, strict=True))


def test_parloop_eval_runs_tasks_on_a_checkpoint(tmp_path: Path, learned) -> None:
    model, tokenizer, _ = learned
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", str(tmp_path / "ckpt"), "--task", "humaneval", "--task", "code-reasoning",
                 "--limit", "3", "--max-new-tokens", "8", "--json", str(out)])
    assert code == 0
    results = json.loads(out.read_text())["results"]
    assert results["humaneval"]["problems"] == 3 and 0 <= results["humaneval"]["pass@1"] <= 1
    assert results["code-reasoning"]["programs"] == 3


def test_parloop_eval_asks_for_data_when_a_task_needs_it(tmp_path: Path, learned, capsys) -> None:
    model, tokenizer, _ = learned
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--task", "bpb"]) == 2
    assert "pass --data" in capsys.readouterr().err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small corpus built by `parloop data build` from 40 generated source files."""
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    src.mkdir()
    for i, program in enumerate(training_programs(40, seed=11)):
        (src / f"mod{i:02d}.py").write_text(f"# module {i}\n" + program.source)
    build_corpus(str(src), root / "corpus", vocab_size=300, val_fraction=0.2, test_fraction=0.2)
    return src, root / "corpus"


def test_held_out_texts_are_the_test_files_exactly(corpus: tuple[Path, Path]) -> None:
    src, data = corpus
    names = (data / "test_files.txt").read_text().split()
    assert names
    assert held_out_texts(data, "test") == [(src / name).read_text() for name in names]
    assert held_out_texts(data, "test", max_bytes=1) == [(src / names[0]).read_text()]  # whole files only


def test_parloop_eval_reads_held_out_files_of_a_corpus(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    _, data = corpus
    tokenizer = Corpus(data).tokenizer()
    make_model(len(tokenizer), loops=3).save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--data", str(data), "--task", "bpb", "--task",
                 "line-completion", "--task", "loop-diagnostics", "--context", "64", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    texts = held_out_texts(data, "test")
    assert results["bpb"]["bytes"] == sum(len(t.encode()) for t in texts)  # every byte, after the BOS
    assert 4 < results["bpb"]["bits_per_byte"] < 20  # an untrained model: about log2(vocab) bits per token
    assert results["line-completion"]["lines"] > 0
    assert len(results["loop-diagnostics"]["relative_update"]) == 2

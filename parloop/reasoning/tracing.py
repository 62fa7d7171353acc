"""Program tracing: a short Python program of k dependent assignments (each reads the previous one) hidden among
distractor assignments, ending in `print(x)`; the answer is what it prints. Every value stays a single digit (the
generator picks each constant so that it does), so the answer is one token. The programs are real Python: `run`
executes one and returns its output, the evaluator the tests and the study check answers against."""

from __future__ import annotations

import contextlib
import io

import numpy as np

from parloop.reasoning.batch import IGNORE, Batch, insert_filler

VARIABLES = tuple("abcdefghijkl")
TOKENS = ("<pad>", *VARIABLES, *"0123456789", "=", "+", "-", "\n", "print(", ")", "#", "<fill>")
ID = {tok: i for i, tok in enumerate(TOKENS)}
STATEMENT = 6  # tokens per statement, padded: "x = y + 3 \n" (a constant assignment is padded at the front)


def render(ids: np.ndarray | list[int]) -> str:
    """The Python source of a token row (padding and filler dropped, the `#` output marker ends it)."""
    text = []
    for i in ids:
        tok = TOKENS[int(i)]
        if tok == "#":
            break
        if tok not in ("<pad>", "<fill>"):
            text.append(tok if tok in ("\n", "print(", ")") else tok + " ")
    return "".join(text)


def run(source: str) -> str:
    """What the program prints (its stdout without the final newline): the independent evaluator."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, "<trace>", "exec"), {"__builtins__": {"print": print}})
    return out.getvalue().rstrip("\n")


def _statement(rng: np.random.Generator, target: str, source: tuple[str, int] | None) -> tuple[list[str], int]:
    """Tokens of `target = value` (a constant) or `target = source +/- c` that keeps the value a digit."""
    if source is None:
        value = int(rng.integers(0, 10))
        return ["<pad>", "<pad>", target, "=", str(value), "\n"], value
    name, value = source
    delta = int(rng.integers(-value, 10 - value))
    op = "+" if delta >= 0 else "-"
    return [target, "=", name, op, str(abs(delta)), "\n"], value + delta


def _program(rng: np.random.Generator, k: int, distractors: int) -> tuple[list[str], int]:
    """One program's tokens up to the output marker, and the printed value."""
    names = [VARIABLES[i] for i in rng.permutation(len(VARIABLES))[: k + distractors]]
    chain, others = names[:k], names[k:]
    is_chain = rng.permutation(np.r_[np.ones(k, bool), np.zeros(distractors, bool)])
    values: dict[str, int] = {}
    tokens: list[str] = []
    c = d = 0
    for on_chain in is_chain:
        if on_chain:
            target, source = chain[c], (chain[c - 1], values[chain[c - 1]]) if c else None
            c += 1
        else:
            target, d = others[d], d + 1
            # a distractor reads an earlier variable (chain or not) half of the time, so it looks like a chain link
            src = rng.choice(sorted(values)) if values and rng.random() < 0.5 else None
            source = (src, values[src]) if src is not None else None
        statement, values[target] = _statement(rng, target, source)
        tokens += statement
    return tokens + ["print(", chain[-1], ")", "#"], values[chain[-1]]


class Tracing:
    """Difficulty = k, the dependent assignments the printed variable goes through (k = 1: a lookup)."""

    name = "tracing"
    knob = "k"
    vocab_size = len(TOKENS)
    chance = 0.1

    def __init__(self, distractors: int = 4) -> None:
        if distractors < 0 or distractors + 8 > len(VARIABLES):
            raise ValueError(f"tracing needs 0 <= distractors <= {len(VARIABLES) - 8} (got {distractors})")
        self.distractors = distractors

    def seq_len(self, difficulty: int, filler: int) -> int:
        return STATEMENT * (difficulty + self.distractors) + 5 + filler

    def sample(self, rng: np.random.Generator, n: int, difficulty: int) -> Batch:
        if not 1 <= difficulty <= 8:
            raise ValueError(f"tracing difficulty k must be between 1 and 8 (got {difficulty})")
        length = self.seq_len(difficulty, 0)
        inputs = np.zeros((n, length), dtype=np.int64)
        labels = np.full((n, length), IGNORE, dtype=np.int64)
        for i in range(n):
            tokens, value = _program(rng, difficulty, self.distractors)
            inputs[i] = [ID[t] for t in tokens] + [ID[str(value)]]
            labels[i, -2] = ID[str(value)]
        return Batch(inputs, labels)

    def with_filler(self, batch: Batch, filler: int) -> Batch:
        return insert_filler(batch, batch.inputs.shape[1] - 1, filler, ID["<fill>"])

    @staticmethod
    def check_answer(row: np.ndarray, answer: int) -> bool:
        """Whether token `answer` is what the row's program prints (by running it)."""
        return TOKENS[answer] == run(render(row))

"""Multi-digit addition, most significant digit first: `a + b = s`. The first digit of the sum depends on the carry
chain through every lower digit, so it needs depth that grows with the number of digits; every digit of the sum is
an answer token (exact match needs all of them)."""

from __future__ import annotations

import numpy as np

from parloop.reasoning.batch import IGNORE, Batch, insert_filler

PLUS, EQUALS, FILL = 10, 11, 12


def digits(values: np.ndarray, width: int) -> np.ndarray:
    """[n, width] the decimal digits of each value, most significant first, zero-padded."""
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return (values[:, None] // powers) % 10


def number(row_digits: np.ndarray | list[int]) -> int:
    return int("".join(str(int(d)) for d in row_digits))


class Addition:
    """Difficulty = the digits of each operand; the sum has one more (a leading 0 or 1)."""

    name = "addition"
    knob = "digits"
    vocab_size = 13
    chance = 0.1

    def seq_len(self, difficulty: int, filler: int) -> int:
        return 3 * difficulty + 3 + filler

    def sample(self, rng: np.random.Generator, n: int, difficulty: int) -> Batch:
        if not 1 <= difficulty <= 15:
            raise ValueError(f"addition difficulty (digits) must be between 1 and 15 (got {difficulty})")
        a, b = (rng.integers(0, 10**difficulty, size=n, dtype=np.int64) for _ in range(2))
        sym = lambda s: np.full((n, 1), s, dtype=np.int64)  # noqa: E731
        inputs = np.concatenate([digits(a, difficulty), sym(PLUS), digits(b, difficulty), sym(EQUALS),
                                 digits(a + b, difficulty + 1)], axis=1)
        labels = np.full_like(inputs, IGNORE)
        first = 2 * difficulty + 2  # the column of the sum's first digit
        labels[:, first - 1:-1] = inputs[:, first:]
        return Batch(inputs, labels)

    def with_filler(self, batch: Batch, filler: int) -> Batch:
        digits_in = (batch.inputs.shape[1] - 3) // 3
        return insert_filler(batch, 2 * digits_in + 2, filler, FILL)

    @staticmethod
    def check_answer(row: np.ndarray, answer: list[int]) -> bool:
        """Whether `answer` (the sum's digit tokens) is a + b, computed with Python integers."""
        width = (len(row) - 3) // 3
        a, b = number(row[:width]), number(row[width + 1:2 * width + 1])
        return number(answer) == a + b and len(answer) == width + 1

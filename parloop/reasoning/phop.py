"""p-hop induction (Sanford et al. 2024; Saunshi et al. 2025): a random sequence over a small alphabet; from position
t, one hop goes to the position after the previous occurrence of the symbol at t; the answer at t is the symbol
reached after p hops. Every position whose p hops all exist is labelled, so one sequence carries many answers.
With filler f the answer for position t is due at position t + f."""

from __future__ import annotations

import numpy as np

from parloop.reasoning.batch import IGNORE, Batch


def hop_targets(seq: np.ndarray) -> np.ndarray:
    """[n, T]: the position one hop from each position (-1 where the symbol has no previous occurrence)."""
    n, length = seq.shape
    last = np.full((n, int(seq.max()) + 1), -1, dtype=np.int64)
    target = np.full((n, length), -1, dtype=np.int64)
    rows = np.arange(n)
    for t in range(length):
        prev = last[rows, seq[:, t]]
        target[:, t] = np.where(prev >= 0, prev + 1, -1)
        last[rows, seq[:, t]] = t
    return target


def phop_answers(seq: np.ndarray, hops: int) -> np.ndarray:
    """[n, T]: the symbol reached after `hops` hops from each position (-1 where a hop is missing)."""
    step = hop_targets(seq)
    pos = np.tile(np.arange(seq.shape[1]), (len(seq), 1))
    for _ in range(hops):
        pos = np.where(pos >= 0, np.take_along_axis(step, np.maximum(pos, 0), axis=1), -1)
    return np.where(pos >= 0, np.take_along_axis(seq, np.maximum(pos, 0), axis=1), -1)


def reference_answer(seq: list[int], t: int, hops: int) -> int | None:
    """The answer at position t, by walking the sequence (the independent evaluator of `phop_answers`)."""
    pos = t
    for _ in range(hops):
        prev = [j for j in range(pos) if seq[j] == seq[pos]]
        if not prev:
            return None
        pos = prev[-1] + 1
    return seq[pos]


class PHop:
    """Difficulty = p, the number of hops. Tokens are the alphabet's symbols 0..alphabet-1."""

    name = "phop"
    knob = "p"

    def __init__(self, alphabet: int = 4, length: int = 64) -> None:
        if alphabet < 2 or length < 2:
            raise ValueError(f"phop needs alphabet >= 2 and length >= 2 (got {alphabet}, {length})")
        self.alphabet, self.length = alphabet, length
        self.vocab_size = alphabet
        self.chance = 1 / alphabet

    def seq_len(self, difficulty: int, filler: int) -> int:
        return self.length

    def sample(self, rng: np.random.Generator, n: int, difficulty: int) -> Batch:
        seq = rng.integers(0, self.alphabet, size=(n, self.length))
        answers = phop_answers(seq, difficulty)
        return Batch(seq, np.where(answers >= 0, answers, IGNORE), per_position=True)

    def with_filler(self, batch: Batch, filler: int) -> Batch:
        if filler == 0:
            return batch
        labels = np.full_like(batch.labels, IGNORE)
        labels[:, filler:] = batch.labels[:, :-filler]
        return Batch(batch.inputs, labels, per_position=True)

"""What a task generator produces: token rows and their answer labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = -100  # the label of a position that is not an answer (transformers' convention, F.cross_entropy's default)


@dataclass(frozen=True)
class Batch:
    """`inputs` [n, T] token ids; `labels` [n, T]: at position t the answer token the model must output there (its
    next-token prediction), IGNORE where position t answers nothing. An instance is one row (`per_position` False:
    exact match needs every answer token of the row) or one labelled position (`per_position` True)."""

    inputs: np.ndarray
    labels: np.ndarray
    per_position: bool = False

    def __len__(self) -> int:
        return len(self.inputs)

    def rows(self, keep: np.ndarray) -> Batch:
        return Batch(self.inputs[keep], self.labels[keep], self.per_position)

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        return Batch(np.concatenate([b.inputs for b in batches]), np.concatenate([b.labels for b in batches]),
                     batches[0].per_position)

    def instances(self) -> int:
        return int((self.labels != IGNORE).sum()) if self.per_position else len(self)


def insert_filler(batch: Batch, column: int, filler: int, token: int) -> Batch:
    """`filler` copies of `token` inserted before `column` (the first answer column) of every row, labels moved with
    their answers: the model gets `filler` more positions between the question and the answer."""
    if filler == 0:
        return batch
    n = len(batch)
    pad_in = np.full((n, filler), token, dtype=batch.inputs.dtype)
    pad_lab = np.full((n, filler), IGNORE, dtype=batch.labels.dtype)
    # the label of the question's last position (column - 1) is the first answer: it moves to the last filler
    labels = np.concatenate([batch.labels[:, :column - 1], pad_lab, batch.labels[:, column - 1:]], axis=1)
    inputs = np.concatenate([batch.inputs[:, :column], pad_in, batch.inputs[:, column:]], axis=1)
    return Batch(inputs, labels, batch.per_position)

"""A bigram baseline for a training recipe: which token follows which, counted from exactly the tokens the
recipe's model is trained on, scored in bits per byte on the trainer's own evaluation windows.

It is the yardstick that says what a small model's bits per byte mean: a model that scores about what this count
table scores has learned little beyond adjacent-token statistics.

Smoothing is Witten-Bell (no parameter to tune on held-out data): p(b | a) = (c(a, b) + T(a) p1(b)) / (c(a) + T(a)),
T(a) the number of distinct tokens seen after a, p1 the add-one unigram distribution.
"""

from __future__ import annotations

import numpy as np

from parloop.train.corpus import Corpus, TokenWindows
from parloop.train.recipe import Recipe


class BigramCounts:
    """Bigram and unigram counts of the pairs (a, b) in `windows` (rows of consecutive token ids)."""

    def __init__(self, windows: np.ndarray, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        pairs = (windows[:, :-1] * vocab_size + windows[:, 1:]).ravel()
        self.keys, self.counts = np.unique(pairs, return_counts=True)
        self.context = np.bincount(pairs // vocab_size, minlength=vocab_size)
        self.distinct = np.bincount(self.keys // vocab_size, minlength=vocab_size)
        unigram = np.bincount(windows[:, 1:].ravel(), minlength=vocab_size)
        self.p1 = (unigram + 1) / (unigram.sum() + vocab_size)

    def log2_prob(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """log2 p(nxt | prev), elementwise."""
        keys = prev * self.vocab_size + nxt
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        pair = np.where(self.keys[at] == keys, self.counts[at], 0)
        seen, distinct = self.context[prev], self.distinct[prev]
        p1 = self.p1[nxt]
        with np.errstate(invalid="ignore", divide="ignore"):
            p = np.where(seen > 0, (pair + distinct * p1) / (seen + distinct), p1)
        return np.log2(p)


def bigram_bpb(recipe: Recipe) -> dict[str, float]:
    """`{"val_bpb", "test_bpb"}` of the bigram table counted from the `max_steps * batch_size` training windows
    that `recipe` trains on (its seed's data order), scored on the windows its trainer evaluates."""
    corpus = Corpus(recipe.data.dir)
    t = recipe.train
    train = TokenWindows(corpus.tokens("train"), t.seq_len)
    seen = train.get(train.shuffled(t.seed, 0, t.max_steps * t.batch_size))
    counts = BigramCounts(seen, corpus.vocab_size)
    token_bytes = corpus.token_bytes()
    scores = {}
    for split in ("val", "test"):
        windows = TokenWindows(corpus.tokens(split), t.seq_len)
        rows = windows.get(windows.spread(t.eval_sequences))
        bits = -counts.log2_prob(rows[:, :-1], rows[:, 1:]).sum()
        scores[f"{split}_bpb"] = float(bits / token_bytes[rows[:, 1:]].sum())
    return scores

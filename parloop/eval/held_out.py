"""The held-out texts the evaluations read: documents of the validation or test split of a corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from parloop.train.corpus import Corpus


def held_out_texts(data_dir: str | Path, split: str, max_bytes: int | None = None) -> list[str]:
    """The documents of a held-out split (`val` or `test`) of a `parloop data build` corpus, in the corpus's
    order, up to `max_bytes` in all. They are decoded from the split's token file, whose documents each end
    with the EOS token (the byte-level tokenizer is lossless, so this is the files' exact text)."""
    corpus = Corpus(data_dir)
    tokens = corpus.tokens(split)
    tokenizer = corpus.tokenizer()
    ends = np.flatnonzero(tokens == corpus.meta["eos_token_id"])
    texts, total, start = [], 0, 0
    for end in ends:
        if max_bytes is not None and total >= max_bytes:
            break
        text = tokenizer.decode(tokens[start:end].tolist(), clean_up_tokenization_spaces=False)
        start = end + 1
        texts.append(text)
        total += len(text.encode("utf-8"))
    if not texts:
        raise ValueError(f"the {split} split of {data_dir} has no documents; rebuild the corpus with more files "
                         "(`parloop data build`)")
    return texts

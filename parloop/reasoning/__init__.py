"""Depth-hungry reasoning tasks for the loop-count study's reasoning track (issue 21; docs/study.md, "The reasoning
track").

- `split`: the held-out partition of every task's instance space (a keyed hash of the instance's tokens), so that
  held-out instances are disjoint from training ones by construction;
- `phop`, `tracing`, `addition`: the generators (procedural, deterministic by seed, unlimited), each with a
  difficulty knob (p hops, k dependent assignments, digits) and an independent evaluator of its answers;
- `tasks`: the generators by name, and `Batch`, what they produce (inputs and answer labels, -100 elsewhere);
- `train`: one model trained on one task by the trainer's optimizer and schedule, with the loss on answers only;
- `evaluate`: exact-match accuracy on held-out instances, and per-loop answer accuracy, gate and update size.
"""

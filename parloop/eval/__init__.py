"""Evaluations of a causal LM checkpoint on held-out data (`parloop eval`), and the per-loop diagnostics.

Each task lives in its own module (`bpb`, `lines`, `reasoning`, `humaneval`); `tasks.evaluate` runs one by name,
`command` is the CLI. See `tasks` for what each task measures.
"""

"""The GPU check (`scripts/gpu-check.sh OUTDIR`, docs/gpu.md): everything a GPU must show, in one prepared command
that fits a 15-minute device loan with room for a second call.

Parts, in order, each a child process stopped when it overruns its share of the 6 minutes: `tests`
(tests/test_cuda.py), `bench` (the decode bench's acceptance figures: `bench`, `acceptance`), `study` (the
re-sized `parloop study --preset gpu` and its FLOP count against what trained: `study`) and `reasoning` (the
reasoning track's GPU preset, where this build has one). `parts` defines them and runs one; `summary` writes the
markdown summary; `command` is the driver. `--dry-run` runs the same code paths on the CPU with tiny shapes.
"""

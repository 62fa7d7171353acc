"""The loop-count study (`parloop study`): how many loops should a PLT model have, and why (issue 5).

For each loop count R (default 1..5) and loop mode (default `parallel` and `sequential_shared`) the study trains
one model with `parloop.train.trainer.train`, from one recipe in which only `plt_num_loops` and `plt_loop_mode`
differ: same layers, width, data order, token budget and seed. With R = 1 every mode is the same plain
transformer, so that model is trained once and stands in every mode's row. Every model is then evaluated on
held-out data only (`parloop.eval`: validation and test bits per byte, code reasoning, line completion,
HumanEval) and, for R >= 2, measured per loop (`parloop.eval.diagnostics`).

The training corpus is the `parloop data build` corpus (default: the Python standard library) with generated
programs and their outputs (`parloop.eval.programs`, never from the held-out universe) appended to its train
split, so that the models learn the format of the code-reasoning task; its validation and test splits stay pure
held-out source files.

Study directory:
- `corpus/base/` the corpus as built; `corpus/mix/` the same with programs in the train split (what models train on);
- `programs/test.jsonl`, `programs/train.jsonl`: the held-out code-reasoning set and the programs in the mix;
- `models/<name>/`: a `parloop train` run directory per model (`r1`, `parallel-r2`, `sequential_shared-r2`, ...)
  with `evaluation.json`, the model's evaluations;
- `results.json`, `report.md`, `evaluations.png`, `diagnostics.png`, `offset_cost.png`.

Resumable: a finished model is not retrained, an interrupted one continues from its latest checkpoint, and an
evaluation made with the same settings is not repeated. Run the same command again to continue.

Modules: `grid` (presets and the models to train), `corpus` (the training mix), `run` (train and evaluate one
model), `analysis` (offset costs, the recommendation), `report` (tables, figures, report.md), `command` (the CLI).
"""


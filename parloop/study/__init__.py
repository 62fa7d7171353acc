"""The loop-count study (`parloop study`): how many loops should a PLT model have, and why (issues 5 and 13;
docs/study.md).

At every scale (a model size and a token budget) and every seed, the study trains with
`parloop.train.trainer.train` one model per loop count R >= 2 and loop mode (`parallel`, `sequential_shared`,
`sequential`), the R = 1 model (the same in every mode) and, for each R, the compute-matched R = 1 model with R x
the layers. A seed sets both the initial weights and the data order. Each model's learning rate comes from a
small sweep at the smallest scale with a seed of its own. Every model is evaluated on held-out data only
(`parloop.eval`: validation and test bits per byte, code reasoning, line completion, HumanEval) and, for R >= 2,
measured per loop (`parloop.eval.diagnostics`). Every comparison is paired by seed: a mean of per-seed differences
with its 95 % t-interval; the recommendation follows a rule fixed in advance (`recommend`).

The training corpus is the preset's `parloop data build` corpus (the standard library; site-packages for the GPU
preset) with generated programs and their outputs (`parloop.eval.programs`, never from the held-out universe)
appended to its train split; its validation and test splits stay pure held-out source files.

Study directory:
- `corpus/base/` the corpus as built; `corpus/mix/` the same with programs in the train split (what models train on);
- `programs/test.jsonl`, `programs/train.jsonl`: the held-out code-reasoning set and the programs in the mix;
- `sweep/<scale>/<model>/lr-x<multiplier>/`: the learning-rate sweep's runs;
- `models/<scale>/<model>/seed<k>/`: a `parloop train` run directory per compared model (`r1`, `r1-x2layers`,
  `parallel-r2`, ...) with `evaluation.json`, the model's evaluations;
- `results.json`, `report.md`, `evaluations.png`, `gap_vs_scale.png`, `offset_cost.png`, `diagnostics.png`.

Resumable: a finished model is not retrained, an interrupted one continues from its latest checkpoint, and an
evaluation made with the same settings is not repeated. Run the same command again to continue.

The reasoning track (`parloop study --track reasoning`, docs/study.md "The reasoning track") trains the same kinds of
models on the synthetic tasks of `parloop.reasoning` (p-hop induction, program tracing, addition) and checks that a
task needs depth before it says anything about loops: `reasoning_grid` (presets, points, models),
`reasoning_track` (the stages), `reasoning_run` (one job: train, evaluate, save; worker processes),
`reasoning_analysis` (depth check, paired differences, offset cost, filler, recommendation), `reasoning_report`
(report.md, results.json, accuracy_vs_difficulty.png), `reasoning_command` (the CLI).

Modules of the bits-per-byte track: `grid` (presets, scales and the models to train), `plan` (the runs, what is
done, the time estimate), `estimate` (timing and progress), `corpus` (the training mix), `sweep` (the learning-rate
sweep), `run` (train and evaluate one model), `stats` (t-intervals), `analysis` (paired comparisons, offset cost,
gap against scale), `recommend` (the rule), `plots` and `report` (figures, tables, report.md), `command` (the CLI).
"""

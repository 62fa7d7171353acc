"""Training: corpora, recipes, the trainer and its run directory (`parloop data`, `parloop train`, `parloop
quickstart`; docs/training.md).

- `corpus`: `parloop data build` and the `Corpus` / `TokenWindows` a run reads;
- `recipe`: the recipe schema, its coercion and checks (`load_recipe`, `recipe_from_dict`);
- `distributed`: the process `World`, `parallelize(model, world, strategy)` (DDP / FSDP2), Ctrl-C handling;
- `checkpointer`: checkpoints with integrity manifests, exact resume, the run directory's files;
- `trainer`: `Trainer` (step, evaluation) and `train(recipe, run_dir)`, the loop;
- `metrics`: console lines, metrics.jsonl, TensorBoard and the curve plots (one run, or several overlaid);
- `errors`: the user-facing errors and the one place that turns them into an exit code;
- `command`, `quickstart`: the `parloop train` and `parloop quickstart` commands;
- `quickreport`, `baseline`: what the quickstart says about its models, and its bigram baseline.
"""

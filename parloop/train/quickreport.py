"""What `parloop quickstart` says about its models: the results table, the R = 2 against R = 1 comparison with
what it can and cannot show, and what the numbers mean at this scale. Every number printed comes from the run
(or, for the seed spread, from the project's own measurement with the shipped recipe, named as such)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from parloop.study.stats import mean_interval

# Measured by the project with recipes/quickstart.yaml on the standard-library corpus (the quickstart's own data):
# R = 1 trained with seeds 0 and 1 (seeds change the initial weights and the data order together). Printed as that
# measurement, named as such, next to a one-seed run of that same recipe only (another recipe's spread is unknown);
# `--seeds 2` measures the spread on the user's own run.
PROJECT_SEED_SPREAD = {"recipe": "recipes/quickstart.yaml", "loops": 1, "seeds": (0, 1), "val_bpb": (2.2045, 2.0496)}
COMPUTE_OPTIMAL_TOKENS_PER_PARAMETER = 20  # the Chinchilla rule of thumb (Hoffmann et al. 2022)


def model_label(loops: int, seed: int) -> str:
    return f"R = {loops}, seed {seed}"


def results_table(models: Sequence[dict[str, Any]], bigram: dict[str, float]) -> str:
    """One row per model and one for the bigram baseline; the last two columns are wall-clock figures."""
    rows = [f"{'model':<16} {'parameters':>10} {'val bpb':>8} {'test bpb':>8} {'wall tok/s':>10} {'wall min':>8}"]
    for m in models:
        rows.append(f"{m['label']:<16} {m['parameters']:>10,} {m['val_bpb']:>8.4f} {m['test_bpb']:>8.4f} "
                    f"{m['tokens_per_s']:>10,.0f} {m['train_seconds'] / 60:>8.1f}")
    rows.append(f"{'bigram counts':<16} {'':>10} {bigram['val_bpb']:>8.4f} {bigram['test_bpb']:>8.4f}")
    return "\n".join(rows)


def paired_differences(models: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """Per seed: validation bpb of R = 2 minus R = 1 (trained with the same seed, so the same data order)."""
    by = {(m["plt_num_loops"], m["seed"]): m for m in models}
    seeds = sorted({m["seed"] for m in models})
    return [{"seed": s, "val_bpb": by[2, s]["val_bpb"] - by[1, s]["val_bpb"]} for s in seeds]


def _direction(diff: float) -> str:
    return "worse" if diff > 0 else "better"


def _single_seed_lines(diff: float, shipped_recipe: bool) -> list[str]:
    head = f"R = 2 scored {abs(diff):.4f} bits per byte {_direction(diff)} than R = 1 in this run (one seed each)."
    if not shipped_recipe:
        return [head, "One seed cannot tell whether that is the loop count or chance, and this run's recipe is not "
                f"the shipped {PROJECT_SEED_SPREAD['recipe']}, whose seed-to-seed spread the project measured.",
                "`--seeds 2` trains a second pair (twice the training time) and measures the spread on your run."]
    a, b = PROJECT_SEED_SPREAD["val_bpb"]
    spread = abs(a - b)
    size = ("smaller than that spread" if abs(diff) < spread else
            f"{abs(diff) / spread:.1f} times that spread, but one pair of runs and one measured spread are too few "
            "to call it settled")
    return [head,
            f"One seed cannot tell whether that is the loop count or chance: with {PROJECT_SEED_SPREAD['recipe']} "
            f"the project trained R = 1 with seeds 0 and 1 and got {a:.4f} and {b:.4f} val bpb, a spread of "
            f"{spread:.4f} from the seed alone; this difference is {size}.",
            "`--seeds 2` trains a second pair (twice the training time) and measures the spread on your run."]


def _multi_seed_lines(diffs: Sequence[dict[str, float]], models: Sequence[dict[str, Any]]) -> list[str]:
    values = [d["val_bpb"] for d in diffs]
    interval = mean_interval(values)
    lines = ["R = 2 minus R = 1, val bpb, per seed: " + ", ".join(f"seed {d['seed']}: {d['val_bpb']:+.4f}"
                                                                   for d in diffs)
             + f"; mean {interval} (95 % t-interval over {interval.n} seeds; positive: R = 2 worse)."]
    for loops in (1, 2):
        bpbs = [m["val_bpb"] for m in models if m["plt_num_loops"] == loops]
        lines.append(f"Seed-to-seed spread of R = {loops} in this run: {max(bpbs) - min(bpbs):.4f} val bpb "
                     f"(max - min over {len(bpbs)} seeds).")
    if interval.excludes_zero:
        verdict = (f"R = 2 did {_direction(interval.mean)} than R = 1 at this scale: the 95 % interval excludes "
                   "zero")
    elif all(v > 0 for v in values) or all(v < 0 for v in values):
        verdict = (f"R = 2 did {_direction(values[0])} than R = 1 with every seed here, but the 95 % interval "
                   f"includes zero: {interval.n} seeds cannot tell R = 2 from R = 1 at that confidence")
    else:
        verdict = "the sign of the difference changes with the seed: these runs cannot tell R = 2 from R = 1"
    lines.append(f"So {verdict}. This is one model size and token budget; `parloop study` compares more (and "
                 "compute-matched baselines).")
    return lines


def comparison_lines(models: Sequence[dict[str, Any]], shipped_recipe: bool = True) -> list[str]:
    """What the R = 2 against R = 1 comparison of this run shows, and what it cannot. `shipped_recipe`: the run used
    the shipped recipe unchanged, so the project's own seed-to-seed spread of it applies."""
    diffs = paired_differences(models)
    if len(diffs) == 1:
        return _single_seed_lines(diffs[0]["val_bpb"], shipped_recipe)
    return _multi_seed_lines(diffs, models)


def scale_lines(models: Sequence[dict[str, Any]], bigram: dict[str, float]) -> list[str]:
    """What bits per byte mean at this size and token budget, and where a real answer comes from."""
    m = models[0]
    ratio = m["tokens"] / m["parameters"]
    bpbs = [x["val_bpb"] for x in models]
    return [f"At this scale: {m['parameters']:,} parameters trained on {m['tokens']:,} tokens, "
            f"{ratio:.2f} tokens per parameter (compute-optimal training uses about "
            f"{COMPUTE_OPTIMAL_TOKENS_PER_PARAMETER}).",
            f"A table of which token follows which, counted from the same {m['tokens']:,} training tokens "
            f"('bigram counts'), scores {bigram['val_bpb']:.4f} val bpb; the models score {min(bpbs):.4f} to "
            f"{max(bpbs):.4f}. Models this small and this briefly trained say little about large ones.",
            "For matched models with several seeds, 95 % intervals, compute-matched baselines and more than one "
            "scale: `parloop study` (README: 'How many loops?')."]


def timing_lines(models: Sequence[dict[str, Any]], load: float, cores: int) -> list[str]:
    """Speed, labelled as what it is: wall-clock time on this machine, with how busy the machine was (`load`: the
    1-minute load average when training ended)."""
    speed = {m["plt_num_loops"]: m["tokens_per_s"] for m in models if m["seed"] == models[0]["seed"]}
    return [f"'wall tok/s' and 'wall min' are wall-clock training figures on this machine (per token, R = 2 took "
            f"{speed[1] / speed[2]:.2f} times as long as R = 1); other programs running at the same time stretch "
            f"them: the load average was {load:.1f} on {cores} cores when training ended."]

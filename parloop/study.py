"""`parloop study`: how many loops should a PLT model have, and why (issue 5).

For each loop count R (default 1..5) and loop mode (default `parallel` and `sequential_shared`) the study trains
one model with `parloop.training.train`, from one recipe in which only `plt_num_loops` and `plt_loop_mode`
differ: same layers, width, data order, token budget and seed. With R = 1 every mode is the same plain
transformer, so that model is trained once and stands in every mode's row. Every model is then evaluated on
held-out data only (`parloop.evaluation`: validation and test bits per byte, code reasoning, line completion,
HumanEval) and, for R >= 2, measured per loop (`parloop.diagnostics`).

The training corpus is the `parloop data build` corpus (default: the Python standard library) with generated
programs and their outputs (`parloop.programs`, never from the held-out universe) appended to its train split, so
that the models learn the format of the code-reasoning task; its validation and test splits stay pure held-out
source files.

Study directory:
- `corpus/base/` the corpus as built; `corpus/mix/` the same with programs in the train split (what models train on);
- `programs/test.jsonl`, `programs/train.jsonl`: the held-out code-reasoning set and the programs in the mix;
- `models/<name>/`: a `parloop train` run directory per model (`r1`, `parallel-r2`, `sequential_shared-r2`, ...)
  with `evaluation.json`, the model's evaluations;
- `results.json`, `report.md`, `evaluations.png`, `diagnostics.png`, `offset_cost.png`.

Resumable: a finished model is not retrained, an interrupted one continues from its latest checkpoint, and an
evaluation made with the same settings is not repeated. Run the same command again to continue.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from parloop.config import LOOP_MODES
from parloop.programs import Program, held_out_set, load_programs, save_programs, training_programs

STUDY_MODES = ("parallel", "sequential_shared")

# (key in a model's evaluation, column title, higher is better)
METRICS = (
    ("val_bpb", "val bits/byte", False),
    ("test_bpb", "test bits/byte", False),
    ("code_reasoning", "code reasoning", True),
    ("line_completion", "line completion", True),
    ("humaneval", "HumanEval pass@1", True),
)


@dataclass
class Preset:
    """Everything a study run is made of, apart from the grid. `--quick` and the default are two presets."""

    source: str = "stdlib"
    vocab_size: int = 8192
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    program_fraction: float = 0.05  # share of the training split's tokens that are generated programs
    model: dict[str, Any] = field(default_factory=lambda: dict(
        hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, plt_window_size=[32, 0]))
    train: dict[str, Any] = field(default_factory=lambda: dict(
        seq_len=128, batch_size=16, micro_batch_size=16, lr=3e-3, min_lr=3e-4, weight_decay=0.1, dtype="auto",
        device="auto", seed=0, log_interval=10, eval_sequences=32, keep_checkpoints=1))
    budget: int = 500_000  # training tokens per model
    checkpoints: int = 10  # checkpoints per training run (where an interrupted run resumes from)
    validations: int = 4  # validation passes per training run (the training curves)
    eval_batch: int = 32  # sequences per forward pass in the evaluations
    eval_bytes: int = 300_000  # held-out bytes per split for bits per byte and line completion
    programs: int = 300  # held-out code-reasoning programs
    lines: int = 500  # held-out lines for line completion
    humaneval: int | None = None  # HumanEval problems (None: all 164)
    humaneval_tokens: int = 128  # new tokens per HumanEval completion
    diagnostic_sequences: int = 32  # held-out windows for the per-loop diagnostics
    threads: int | None = None  # torch CPU threads (None: torch's default)


PRESETS = {
    "default": Preset(),
    # the whole grid in a few minutes on 2 CPU cores: a 30-file corpus, a one-layer model, a few steps
    "quick": Preset(
        source="{stdlib}/[a-c]*.py", vocab_size=512, val_fraction=0.15, test_fraction=0.15,
        model=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=64, plt_window_size=[8, 0]),
        train=dict(seq_len=32, batch_size=8, micro_batch_size=8, lr=3e-3, min_lr=3e-4, dtype="float32",
                   device="cpu", seed=0, log_interval=5, eval_sequences=8, keep_checkpoints=1),
        budget=8 * 32 * 12, checkpoints=1, validations=1, eval_bytes=8_000, programs=12, lines=40, humaneval=3,
        humaneval_tokens=16, diagnostic_sequences=4,
        # for a model this small one thread is faster, and on a busy machine much faster, than two
        threads=1),
}


@dataclass(frozen=True)
class Cell:
    """One trained model of the grid; `modes` are the loop modes whose rows it fills (all of them for R = 1)."""

    name: str
    loops: int
    mode: str
    modes: tuple[str, ...]


def grid(loops: Sequence[int], modes: Sequence[str]) -> list[Cell]:
    """The models to train: one per (R, mode), except a single model for R = 1, which is the same in every mode."""
    cells = []
    for r in sorted(set(loops)):
        if r == 1:
            cells.append(Cell("r1", 1, "parallel", tuple(modes)))
        else:
            cells += [Cell(f"{mode}-r{r}", r, mode, (mode,)) for mode in modes]
    return cells


# -- corpus and programs ----------------------------------------------------------------------------------------

def prepare_data(study: Path, preset: Preset, corpus: str | None) -> tuple[Path, list[Program]]:
    """The training corpus (base corpus + programs in the train split) and the held-out program set."""
    from parloop.data import Corpus, build_corpus, stdlib_root

    base = Path(corpus) if corpus else study / "corpus" / "base"
    if corpus is None:
        build_corpus(preset.source.format(stdlib=stdlib_root()), base, preset.vocab_size, preset.val_fraction,
                     preset.test_fraction)
    base_corpus = Corpus(base)
    programs_dir = study / "programs"
    programs_dir.mkdir(parents=True, exist_ok=True)
    test_path = programs_dir / "test.jsonl"
    if not test_path.is_file() or len(load_programs(test_path)) != preset.programs:
        save_programs(held_out_set(preset.programs, desc="held-out programs"), test_path)
    held_out = load_programs(test_path)

    train_tokens = base_corpus.meta["splits"]["train"]["tokens"]
    wanted = int(train_tokens * preset.program_fraction / (1 - preset.program_fraction))
    mix = study / "corpus" / "mix"
    settings = {"base": str(base.resolve()), "base_settings": base_corpus.meta["settings"],
                "program_tokens": wanted}
    meta_path = mix / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("mix") == settings:
        return mix, held_out
    tokenizer = base_corpus.tokenizer()
    per_program = np.mean([len(tokenizer(p.example())["input_ids"]) + 1 for p in held_out[:50]])
    programs = training_programs(max(1, int(wanted / per_program)), seed=0, desc="training programs")
    save_programs(programs, programs_dir / "train.jsonl")
    write_mix_corpus(base_corpus, mix, programs, settings)
    return mix, held_out


def write_mix_corpus(base: Any, out: Path, programs: Sequence[Program], settings: dict[str, Any]) -> None:
    """A copy of corpus `base` whose train split also holds `programs` (each text followed by EOS, as the
    corpus stores documents); validation and test splits, tokenizer and test file list are unchanged."""
    meta = json.loads(json.dumps(base.meta))
    tokenizer = base.tokenizer()
    eos = meta["eos_token_id"]
    encoded = tokenizer([p.example() for p in programs], add_special_tokens=False)["input_ids"]
    extra = np.fromiter((t for ids in encoded for t in [*ids, eos]), dtype=meta["dtype"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base.path, tmp, ignore=shutil.ignore_patterns("train.bin", "meta.json"))
    np.concatenate([np.asarray(base.tokens("train")), extra]).tofile(tmp / "train.bin")
    train = meta["splits"]["train"]
    train["documents"] += len(programs)
    train["bytes"] += sum(len(p.example().encode("utf-8")) for p in programs)
    train["tokens"] += int(extra.size)
    meta["mix"] = settings
    meta["programs"] = {"count": len(programs), "tokens": int(extra.size)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


# -- training and evaluation ------------------------------------------------------------------------------------

def recipe_for(cell: Cell, preset: Preset, corpus: Path, overrides: Sequence[str]) -> Any:
    """The training recipe of one grid cell: the preset's, with this cell's loop count and mode."""
    from parloop.training import recipe_from_dict

    train = dict(preset.train)
    steps = max(1, preset.budget // (train["batch_size"] * train["seq_len"]))
    train.update(max_steps=steps, warmup_steps=max(1, steps // 20),
                 eval_interval=max(1, steps // preset.validations),
                 checkpoint_interval=max(1, steps // preset.checkpoints))
    values = {"name": cell.name, "data": {"dir": str(corpus)},
              "model": {**preset.model, "plt_num_loops": cell.loops, "plt_loop_mode": cell.mode}, "train": train}
    recipe = recipe_from_dict(values, overrides)
    if (recipe.model.get("plt_num_loops"), recipe.model.get("plt_loop_mode")) != (cell.loops, cell.mode):
        from parloop.training import RecipeError

        raise RecipeError("--set may not change model.plt_num_loops or model.plt_loop_mode: the study sets them "
                          "per model (use --loops and --modes)")
    return recipe


def eval_settings(preset: Preset, seq_len: int) -> dict[str, Any]:
    return {"eval_bytes": preset.eval_bytes, "programs": preset.programs, "lines": preset.lines,
            "humaneval": preset.humaneval, "humaneval_tokens": preset.humaneval_tokens,
            "diagnostic_sequences": preset.diagnostic_sequences, "context": seq_len, "batch": preset.eval_batch}


def evaluate_model(model_dir: Path, corpus: Path, held_out: Sequence[Program], settings: dict[str, Any],
                   device: str) -> dict[str, Any]:
    """Every evaluation of one model (and its per-loop diagnostics when R >= 2), on held-out data only."""
    from parloop.diagnostics import diagnose
    from parloop.evaluation import bits_per_byte, code_reasoning, held_out_texts, humaneval, line_completion
    from parloop.inference.loading import load_model

    model, tokenizer = load_model(model_dir, device, "float32")
    context, batch = settings["context"], settings["batch"]
    out: dict[str, Any] = {}
    test_texts = held_out_texts(corpus, "test", settings["eval_bytes"])
    for split, texts in (("val", held_out_texts(corpus, "val", settings["eval_bytes"])), ("test", test_texts)):
        bpb = bits_per_byte(model, tokenizer, texts, context, batch, desc=f"{split} bits/byte")
        out[f"{split}_bpb"] = bpb.bits_per_byte
        out[f"{split}_files"] = {"bits": bpb.text_bits, "bytes": bpb.text_bytes}
    lines = line_completion(model, tokenizer, test_texts, settings["lines"], context, batch_size=batch,
                            desc="line completion")
    out["line_completion"] = lines["exact_match"]
    reasoning = code_reasoning(model, tokenizer, held_out, batch_size=batch, desc="code reasoning")
    out["code_reasoning"] = reasoning["accuracy"]
    he = humaneval(model, tokenizer, limit=settings["humaneval"], max_new_tokens=settings["humaneval_tokens"],
                   batch_size=batch, desc="HumanEval")
    out["humaneval"] = he["pass@1"]
    out["counts"] = {"lines": lines["lines"], "programs": reasoning["programs"], "humaneval": he["problems"],
                     "val_files": len(out["val_files"]["bytes"]), "test_files": len(test_texts)}
    if model.config.plt_num_loops >= 2:
        out["diagnostics"] = diagnose(model, tokenizer, test_texts, context=context, batch_size=batch,
                                      max_sequences=settings["diagnostic_sequences"])
    return out


def run_cell(cell: Cell, study: Path, preset: Preset, corpus: Path, held_out: Sequence[Program],
             overrides: Sequence[str], device: str) -> dict[str, Any]:
    """Train (or resume, or reuse) and evaluate (or reuse) one model; returns its record for results.json."""
    from parloop.training import train

    recipe = recipe_for(cell, preset, corpus, overrides)
    run_dir = study / "models" / cell.name
    started = time.perf_counter()
    metrics = train(recipe, run_dir, resume=True)
    settings = eval_settings(preset, recipe.train.seq_len)
    eval_path = run_dir / "evaluation.json"
    saved = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
    evaluation = saved.get("evaluation") if saved.get("settings") == settings else None
    if evaluation is None:
        evaluation = evaluate_model(Path(metrics["model_dir"]), corpus, held_out, settings, device)
        # written whole or not at all, so an interrupted study never reads half an evaluation
        tmp = eval_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"settings": settings, "evaluation": evaluation}) + "\n")
        os.replace(tmp, eval_path)
    print(f"{cell.name}: test bits/byte {evaluation['test_bpb']:.4f}, code reasoning "
          f"{evaluation['code_reasoning']:.3f}, line completion {evaluation['line_completion']:.3f}, HumanEval "
          f"{evaluation['humaneval']:.3f}  ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return {"name": cell.name, "loops": cell.loops, "mode": cell.mode, "modes": list(cell.modes),
            "training": {k: metrics.get(k) for k in ("val_bpb", "test_bpb", "train_loss", "tokens", "parameters",
                                                    "train_seconds", "tokens_per_s")},
            "evaluation": evaluation}


# -- analysis ---------------------------------------------------------------------------------------------------

def rows_by_mode(models: Sequence[dict[str, Any]], modes: Sequence[str]) -> dict[str, dict[int, dict[str, Any]]]:
    """{mode: {R: model record}}, the R = 1 model in every mode."""
    return {mode: {m["loops"]: m for m in models if mode in m["modes"]} for mode in modes}


def paired_difference(a: dict[str, list], b: dict[str, list]) -> tuple[float, float]:
    """Bits per byte of model a minus model b over the same held-out files, and its standard error with the
    files as the sampling unit (ratio estimator: the difference is sum(bits_a - bits_b) / sum(bytes))."""
    delta = np.asarray(a["bits"]) - np.asarray(b["bits"])
    size = np.asarray(a["bytes"], dtype=np.float64)
    diff = delta.sum() / size.sum()
    n = len(size)
    if n < 2:
        return float(diff), float("nan")
    resid = delta - diff * size
    se = math.sqrt(n / (n - 1) * float((resid ** 2).sum())) / size.sum()
    return float(diff), se


def offset_costs(by_mode: dict[str, dict[int, dict[str, Any]]]) -> dict[int, dict[str, float]]:
    """Per R: for each metric, how much worse `parallel` is than `sequential_shared` (positive = the offset costs)."""
    from parloop.diagnostics import offset_cost

    par, seq = by_mode.get("parallel", {}), by_mode.get("sequential_shared", {})
    return {r: {key: offset_cost(par[r]["evaluation"][key], seq[r]["evaluation"][key], higher)
                for key, _, higher in METRICS}
            for r in sorted(set(par) & set(seq))}


def recommend(by_mode: dict[str, dict[int, dict[str, Any]]], offset: dict[int, dict[str, float]]) -> dict[str, Any]:
    """The loop count to use, by a rule fixed before any result was seen: among the `parallel` models (the
    architecture one would deploy), the lowest test bits per byte — the most precise of the evaluations for
    small models — but the smallest R whose test bits per byte is within two standard errors of that best one
    (paired over held-out files), since more loops cost compute for no measurable gain. The reason gives the
    numbers it was read from."""
    mode = "parallel" if "parallel" in by_mode else next(iter(by_mode))
    rows = by_mode[mode]
    best = min(rows, key=lambda r: rows[r]["evaluation"]["test_bpb"])
    if len(rows) == 1:
        return {"loops": best, "best_test_bpb_loops": best, "mode": mode, "paired_differences": {},
                "reason": f"Only R = {best} was trained: there is nothing to compare it with."}
    best_files = rows[best]["evaluation"]["test_files"]
    compared = {r: paired_difference(rows[r]["evaluation"]["test_files"], best_files) for r in rows if r != best}
    within = [r for r in sorted(rows) if r < best and compared[r][0] < 2 * compared[r][1]]
    chosen = within[0] if within else best
    lines = [f"Among the {mode} models, R = {best} has the lowest test bits per byte "
             f"({rows[best]['evaluation']['test_bpb']:.4f})."]
    for r, (diff, se) in sorted(compared.items()):
        verdict = "within" if diff < 2 * se else "more than"
        lines.append(f"R = {r}: {rows[r]['evaluation']['test_bpb']:.4f}, {diff:+.4f} ± {se:.4f} (one standard error "
                     f"over {len(best_files['bytes'])} held-out files) against R = {best}: {verdict} two standard "
                     "errors.")
    if chosen != best:
        lines.append(f"R = {chosen} is the smallest loop count within two standard errors of R = {best}, so the "
                     f"extra loops buy no measurable gain: R = {chosen} is recommended.")
    elif best == min(rows):
        lines.append(f"R = {best} is also the smallest loop count trained, so it is recommended.")
    else:
        lines.append(f"Every smaller loop count is measurably worse, so R = {best} is recommended.")
    # the per-loop measures of the recommended model, or of the smallest looped one when no loop was recommended
    looped = [r for r in sorted(rows) if rows[r]["evaluation"].get("diagnostics")]
    shown = chosen if chosen in looped else (looped[0] if looped else None)
    if shown is not None:
        diag = rows[shown]["evaluation"]["diagnostics"]
        lens = ", ".join(f"loop {i}: {v:.3f}" for i, v in enumerate(diag["logit_lens_loss"]))
        updates = ", ".join(f"loop {i + 1}: {u:.3f}" for i, u in enumerate(diag["relative_update"]))
        lines.append(f"In the R = {shown} model, the loss read out after each loop is {lens} (nats per token), "
                     f"and the relative update size is {updates}.")
        if diag["update_cosine"]:
            cosines = ", ".join(f"loop {i + 2}: {c:+.3f}" for i, c in enumerate(diag["update_cosine"]))
            lines.append(f"Cosine between successive updates: {cosines} (negative means a loop undoes the one "
                         "before).")
    costs = {r: c["test_bpb"] for r, c in sorted(offset.items()) if r >= 2}
    if costs:
        listed = ", ".join(f"R = {r}: {c:+.4f}" for r, c in costs.items())
        lines.append(f"Offset cost (test bits per byte by which parallel is worse than sequential_shared): {listed}.")
    return {"loops": chosen, "best_test_bpb_loops": best, "mode": mode, "reason": " ".join(lines),
            "paired_differences": {str(r): {"diff": d, "se": s} for r, (d, s) in compared.items()}}


# -- report -----------------------------------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 4) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_tables(by_mode: dict[str, dict[int, dict[str, Any]]], offset: dict[int, dict[str, float]]) -> str:
    head = "| R | " + " | ".join(title for _, title, _ in METRICS) + " | parameters |"
    rule = "|---" * (len(METRICS) + 2) + "|"
    out = []
    for mode, rows in by_mode.items():
        out += [f"### {mode}", "", head, rule]
        for r in sorted(rows):
            ev = rows[r]["evaluation"]
            out.append(f"| {r} | " + " | ".join(_fmt(ev[key]) for key, _, _ in METRICS)
                       + f" | {rows[r]['training']['parameters']:,} |")
        out.append("")
    if offset:
        out += ["### Offset cost (how much worse `parallel` is than `sequential_shared`; positive = the cross-loop "
                "offset costs)", "", "| R | " + " | ".join(title for _, title, _ in METRICS) + " |",
                "|---" * (len(METRICS) + 1) + "|"]
        out += [f"| {r} | " + " | ".join(f"{cost[key]:+.4f}" for key, _, _ in METRICS) + " |"
                for r, cost in sorted(offset.items())]
        out.append("")
    return "\n".join(out)


def diagnostics_tables(by_mode: dict[str, dict[int, dict[str, Any]]]) -> str:
    out = []
    for mode, rows in by_mode.items():
        looped = {r: rows[r]["evaluation"]["diagnostics"] for r in sorted(rows) if r >= 2}
        if not looped:
            continue
        out += [f"### {mode}", "", "| R | loop | logit-lens loss | relative update | update cosine | attention JS "
                "(mean over layers) | effective rank | mean pairwise cosine | gate (mean over layers) |",
                "|---" * 9 + "|"]
        for r, d in looped.items():
            for loop in range(r):
                js = np.mean([layer[loop - 1] for layer in d["attention_js"]]) if loop else None
                gate = np.mean([layer[loop - 1] for layer in d["gate_mean"]]) if loop and d["gate_mean"] else None
                out.append(f"| {r} | {loop} | {_fmt(d['logit_lens_loss'][loop])} | "
                           f"{_fmt(d['relative_update'][loop - 1] if loop else None)} | "
                           f"{_fmt(d['update_cosine'][loop - 2] if loop >= 2 else None, 3)} | {_fmt(js)} | "
                           f"{_fmt(d['effective_rank'][loop], 2)} | {_fmt(d['mean_pairwise_cosine'][loop], 3)} | "
                           f"{_fmt(gate, 3)} |")
        out.append("")
    return "\n".join(out)


def plot(study: Path, by_mode: dict[str, dict[int, dict[str, Any]]], offset: dict[int, dict[str, float]]) -> list[str]:
    """The report's PNG figures; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = []
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for ax, (key, title, higher) in zip(axes, METRICS, strict=True):
        for mode, rows in by_mode.items():
            rs = sorted(rows)
            ax.plot(rs, [rows[r]["evaluation"][key] for r in rs], marker="o", label=mode)
        ax.set(title=f"{title} ({'higher' if higher else 'lower'} is better)", xlabel="loops R")
        ax.set_xticks(sorted({r for rows in by_mode.values() for r in rows}))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(study / "evaluations.png", dpi=110)
    plt.close(fig)
    names.append("evaluations.png")

    panels = [("logit_lens_loss", "logit-lens loss (nats/token)", 0), ("relative_update", "relative update", 1),
              ("update_cosine", "cosine of successive updates", 2), ("attention_js", "attention JS (bits)", 1),
              ("effective_rank", "effective rank", 0), ("gate_mean", "gate: weight on global branch", 1)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title, first) in zip(axes.flat, panels, strict=True):
        for mode, style in zip(by_mode, ("-", "--", ":"), strict=False):
            for r, row in sorted(by_mode[mode].items()):
                d = row["evaluation"].get("diagnostics")
                if not d or not d[key]:
                    continue
                values = d[key]
                if key in ("attention_js", "gate_mean"):  # per layer: the mean over layers
                    values = np.mean(np.asarray(values), axis=0)
                # one colour per R and one line style per mode, the same in every panel
                ax.plot(range(first, first + len(values)), values, style, color=f"C{r % 10}", marker="o",
                        label=f"{mode} R={r}")
        ax.set(title=title, xlabel="loop")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study / "diagnostics.png", dpi=110)
    plt.close(fig)
    names.append("diagnostics.png")

    if offset:
        fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2))
        rs = sorted(offset)
        for ax, (key, title, _) in zip(axes, METRICS, strict=True):
            ax.axhline(0.0, color="grey", lw=0.8)
            ax.plot(rs, [offset[r][key] for r in rs], marker="o", color="C3")
            ax.set(title=f"offset cost: {title}", xlabel="loops R")
            ax.set_xticks(rs)
        fig.tight_layout()
        fig.savefig(study / "offset_cost.png", dpi=110)
        plt.close(fig)
        names.append("offset_cost.png")
    return names


def write_report(study: Path, models: Sequence[dict[str, Any]], modes: Sequence[str], settings: dict[str, Any]) -> dict:
    """results.json, report.md and the figures, from the records of all models."""
    by_mode = rows_by_mode(models, modes)
    offset = offset_costs(by_mode)
    recommendation = recommend(by_mode, offset)
    figures = plot(study, by_mode, offset)
    results = {"settings": settings, "models": list(models), "offset_cost": {str(r): c for r, c in offset.items()},
               "recommendation": recommendation}
    (study / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    counts = models[0]["evaluation"]["counts"]
    preset = settings["preset"]
    report = [
        "# Loop-count study", "",
        f"Models: {len(models)} ({', '.join(m['name'] for m in models)}), each trained on "
        f"{models[0]['training']['tokens']:,} tokens of the same data in the same order with the same seed; only "
        "the loop count R and the loop mode differ. R = 1 is one model, the same in every mode.", "",
        f"Held-out evaluation: bits per byte on {counts['val_files']} validation and {counts['test_files']} test "
        f"files (at most {preset['eval_bytes']:,} bytes each split); code reasoning on {counts['programs']} "
        f"generated programs (exact match of the printed output); line completion on {counts['lines']} test-file "
        f"lines (greedy exact match); HumanEval pass@1 (greedy) on {counts['humaneval']} problems.", "",
        "## Results (rows = loop count, columns = evaluations)", "", markdown_tables(by_mode, offset),
        "## Recommendation", "", f"**R = {recommendation['loops']}.** {recommendation['reason']}", "",
        "## Per-loop diagnostics (test files)", "",
        "Loop 0 is the first pass. Relative update: ||h_r - h_(r-1)|| / ||h_(r-1)||; update cosine: between "
        "h_r - h_(r-1) and h_(r-1) - h_(r-2) (negative = oscillation); attention JS: Jensen-Shannon divergence "
        "of the global attention from the previous loop's; gate: weight of the shared-KV (global) branch.", "",
        diagnostics_tables(by_mode), "## Figures", "",
        *[f"![{name}]({name})" for name in figures], "",
        "## Settings", "", "```json", json.dumps(settings, indent=2), "```", ""]
    (study / "report.md").write_text("\n".join(report))
    return results


# -- command line -----------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    default, quick = PRESETS["default"], PRESETS["quick"]
    unset = argparse.SUPPRESS  # options whose default comes from the preset (--quick or not)
    parser.description = (
        "Train matched PLT models for each loop count and loop mode (same layers, width, data order, token "
        "budget and seed), evaluate them on held-out data, measure each loop, and write report.md, results.json "
        "and PNG plots to --out. Resumable: run the same command again to continue.")
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="study directory")
    parser.add_argument("--loops", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="loop counts R to train")
    parser.add_argument("--modes", nargs="+", default=list(STUDY_MODES), choices=LOOP_MODES,
                        help="loop modes to train (sequential_shared is parallel without the cross-loop offset)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny preset (30 stdlib files, one-layer model, a few steps): the whole grid in under "
                        "a minute on 2 CPU cores; for tests and smoke checks, not for conclusions")
    parser.add_argument("--budget", type=int, default=unset,
                        help=f"training tokens per model (default {default.budget:,}; --quick {quick.budget:,})")
    parser.add_argument("--data", default=unset,
                        help="train on this existing `parloop data build` corpus instead of building one from the "
                        "standard library (the study adds its generated programs to the train split of a copy)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a field of the training recipe for every model, e.g. --set "
                        "model.num_hidden_layers=4 --set train.lr=1e-3 (repeatable)")
    parser.add_argument("--eval-bytes", type=int, default=unset,
                        help=f"held-out bytes per split for bits per byte and line completion (default "
                        f"{default.eval_bytes:,}; --quick {quick.eval_bytes:,})")
    parser.add_argument("--programs", type=int, default=unset,
                        help=f"held-out code-reasoning programs (default {default.programs}; --quick "
                        f"{quick.programs})")
    parser.add_argument("--lines", type=int, default=unset,
                        help=f"held-out lines for line completion (default {default.lines}; --quick {quick.lines})")
    parser.add_argument("--humaneval", type=int, default=unset,
                        help=f"HumanEval problems, in task order (default all 164; --quick {quick.humaneval})")
    parser.add_argument("--threads", type=int, default=unset,
                        help="torch CPU threads for training and evaluation (default torch's choice; --quick 1, "
                        "which is faster for tiny models and on a busy machine)")
    parser.add_argument("--device", default="auto", help="device for evaluation: auto, cpu or cuda (training uses "
                        "the recipe's train.device)")


def run(args: argparse.Namespace) -> int:
    from parloop.data import DataError
    from parloop.training import RecipeError, TrainingInterrupted

    preset = PRESETS["quick" if args.quick else "default"]
    chosen = {k: getattr(args, k) for k in ("budget", "eval_bytes", "programs", "lines", "humaneval", "threads")
              if hasattr(args, k)}
    preset = replace(preset, **chosen)
    if any(r < 1 for r in args.loops):
        print("parloop study: error: --loops must be >= 1", file=sys.stderr)
        return 2
    import torch

    if preset.threads:
        torch.set_num_threads(preset.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    study: Path = args.out
    study.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cells = grid(args.loops, args.modes)
    try:
        corpus, held_out = prepare_data(study, preset, getattr(args, "data", None))
        models = []
        for i, cell in enumerate(cells, 1):
            print(f"[{i}/{len(cells)}] {cell.name}", file=sys.stderr)
            models.append(run_cell(cell, study, preset, corpus, held_out, args.overrides, device))
    except (RecipeError, DataError) as e:
        print(f"parloop study: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"{e}\ncontinue with the same command: finished models are kept", file=sys.stderr)
        return 130
    settings = {"quick": args.quick, "loops": sorted(set(args.loops)), "modes": list(args.modes),
                "overrides": list(args.overrides), "corpus": str(corpus), "preset": asdict(preset)}
    results = write_report(study, models, args.modes, settings)
    print(markdown_tables(rows_by_mode(models, args.modes), offset_costs(rows_by_mode(models, args.modes))))
    rec = results["recommendation"]
    print(f"recommended loop count: R = {rec['loops']}. {rec['reason']}")
    print(f"report: {study / 'report.md'}  ({time.perf_counter() - started:.0f} s)")
    return 0


"""The study's data: the training corpus (a built corpus with generated programs added to its train split) and
the held-out code-reasoning programs."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parloop.eval.programs import Program, held_out_set, load_programs, save_programs, training_programs
from parloop.study.grid import Preset
from parloop.train.corpus import Corpus, build_corpus, stdlib_root


def held_out_programs(programs_dir: Path, count: int) -> list[Program]:
    """The held-out code-reasoning set, `programs_dir/test.jsonl`: drawn again only when its size changed."""
    programs_dir.mkdir(parents=True, exist_ok=True)
    test_path = programs_dir / "test.jsonl"
    if not test_path.is_file() or len(load_programs(test_path)) != count:
        save_programs(held_out_set(count, desc="held-out programs"), test_path)
    return load_programs(test_path)


def prepare_data(study: Path, preset: Preset, corpus: str | None) -> tuple[Path, list[Program]]:
    """The training corpus (base corpus + programs in the train split) and the held-out program set."""
    base = Path(corpus) if corpus else study / "corpus" / "base"
    if corpus is None:
        build_corpus(preset.source.format(stdlib=stdlib_root()), base, preset.vocab_size, preset.val_fraction,
                     preset.test_fraction)
    base_corpus = Corpus(base)
    programs_dir = study / "programs"
    held_out = held_out_programs(programs_dir, preset.programs)

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


def write_mix_corpus(base: Corpus, out: Path, programs: Sequence[Program], settings: dict[str, Any]) -> None:
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

"""The trainer: recipes, exact resume, Ctrl-C, corrupt checkpoints, run outputs, bits per byte, bad input."""

from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import build_tiny_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

from parloop import PLTConfig, cli
from parloop.train.checkpointer import checkpoint_problem
from parloop.train.corpus import Corpus, TokenWindows
from parloop.train.distributed import StopRequest
from parloop.train.errors import DataError, RecipeError, TrainingInterrupted
from parloop.train.recipe import Recipe, load_recipe, recipe_from_dict
from parloop.train.trainer import train

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
INTERRUPT_AT = 5  # Ctrl-C arrives while step 5 is computed


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_corpus(tmp_path_factory.mktemp("data"))


def tiny(corpus_dir: Path, *overrides: str) -> Recipe:
    return load_recipe(RECIPE, [f"data.dir={corpus_dir}", *overrides])


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.fixture(scope="module")
def reference(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    return run_dir, train(tiny(corpus_dir), run_dir)


@pytest.fixture(scope="module")
def interrupted(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped by a real SIGINT delivered during step INTERRUPT_AT (checkpoints at 2, 4 and 5)."""
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    batch = tiny(corpus_dir).train.batch_size
    original = TokenWindows.shuffled

    def shuffled(self: TokenWindows, seed: int, first_sample: int, count: int) -> np.ndarray:
        if first_sample == (INTERRUPT_AT - 1) * batch:
            signal.raise_signal(signal.SIGINT)
        return original(self, seed, first_sample, count)

    # as in a terminal, whatever started pytest (a background job starts with SIGINT ignored, and stays so)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.MonkeyPatch.context() as mp, pytest.raises(TrainingInterrupted) as stopped:
            mp.setattr(TokenWindows, "shuffled", shuffled)
            train(tiny(corpus_dir), run_dir)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    finally:
        signal.signal(signal.SIGINT, outer)
    assert stopped.value.step == INTERRUPT_AT
    return run_dir


def test_a_signal_the_process_ignores_stays_ignored() -> None:
    outer = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under `nohup` or `cmd &` in a script
    try:
        stop = StopRequest()
        with stop.installed():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is stop
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is not stop  # restored
    finally:
        signal.signal(signal.SIGINT, outer)


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def test_interrupt_saves_a_checkpoint_of_the_step_it_stopped_at(interrupted: Path) -> None:
    names = [p.name for p in sorted((interrupted / "checkpoints").iterdir())]
    assert names == ["step_00000002", "step_00000004", f"step_{INTERRUPT_AT:08d}"]
    assert max(train_losses(interrupted)) == INTERRUPT_AT
    assert not (interrupted / "final_metrics.json").exists()


def test_resume_reproduces_the_uninterrupted_losses(interrupted: Path, reference: tuple[Path, dict],
                                                    corpus_dir: Path, tmp_path: Path) -> None:
    run_dir = _copy(interrupted, tmp_path)
    metrics = train(tiny(corpus_dir), run_dir, resume=True)
    expected, got = train_losses(reference[0]), train_losses(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    assert metrics["val_bpb"] == pytest.approx(reference[1]["val_bpb"], abs=1e-6)
    assert metrics["step"] == 8


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest"])
def test_a_corrupt_checkpoint_is_skipped_for_the_previous_one(interrupted: Path, reference: tuple[Path, dict],
                                                              corpus_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              damage: str) -> None:
    run_dir = _copy(interrupted, tmp_path)
    latest = run_dir / "checkpoints" / f"step_{INTERRUPT_AT:08d}"
    if damage == "truncate":
        weights = latest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip":
        state = latest / "trainer_state.pt"
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
    else:
        (latest / "manifest.json").unlink()
    assert checkpoint_problem(latest) is not None
    train(tiny(corpus_dir), run_dir, resume=True)
    err = capsys.readouterr().err
    assert f"skipping checkpoint {latest}" in err
    assert {"truncate": "truncated", "flip": "sha256", "no_manifest": "not completely written"}[damage] in err
    assert "resuming from" in err and "step_00000004" in err
    expected, got = train_losses(reference[0]), train_losses(run_dir)
    for step in range(5, 9):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


def test_checkpoints_without_resume_are_an_error(interrupted: Path, corpus_dir: Path, tmp_path: Path) -> None:
    run_dir = _copy(interrupted, tmp_path)
    with pytest.raises(RecipeError, match="already holds checkpoints: pass --resume"):
        train(tiny(corpus_dir), run_dir)


def test_a_finished_run_is_returned_not_retrained(reference: tuple[Path, dict], corpus_dir: Path) -> None:
    run_dir, metrics = reference
    before = (run_dir / "metrics.jsonl").read_text()
    assert train(tiny(corpus_dir), run_dir, resume=True) == json.loads(json.dumps(metrics))
    assert (run_dir / "metrics.jsonl").read_text() == before
    with pytest.raises(RecipeError, match=r"different recipe \(it differs in train.lr\)"):
        train(tiny(corpus_dir, "train.lr=1e-2"), run_dir)


def test_run_directory_holds_a_loadable_model_checkpoints_curves_and_logs(reference: tuple[Path, dict]) -> None:
    run_dir, metrics = reference
    model = AutoModelForCausalLM.from_pretrained(metrics["model_dir"])
    tok = AutoTokenizer.from_pretrained(metrics["model_dir"])
    assert model.config.plt_num_loops == 2 and model.config.vocab_size == len(tok)
    out = model.generate(torch.tensor([[tok.bos_token_id]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 5)
    # keep_checkpoints = 3 of the checkpoints at 2, 4, 6 (none at the final step: model/ is the final weights)
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step_00000002", "step_00000004", "step_00000006"]
    state = torch.load(checkpoints[-1] / "trainer_state.pt", weights_only=False)
    assert state["step"] == 6 and state["data"]["next_sample"] == 6 * 4
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"} and state["optimizer"]["state"]
    assert checkpoint_problem(checkpoints[-1]) is None
    assert AutoModelForCausalLM.from_pretrained(checkpoints[-1]).config.plt_num_loops == 2
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    kinds = [json.loads(line)["kind"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("train") == 8 and kinds.count("eval") == 2
    assert json.loads((run_dir / "final_metrics.json").read_text()) == json.loads(json.dumps(metrics))


def test_bits_per_byte_match_an_independent_computation(reference: tuple[Path, dict], corpus_dir: Path) -> None:
    """Nats from transformers' own causal-LM loss over the same validation windows, bytes from the tokens."""
    recipe = tiny(corpus_dir)
    model = AutoModelForCausalLM.from_pretrained(reference[1]["model_dir"]).eval()
    corpus = Corpus(corpus_dir)
    windows = TokenWindows(corpus.tokens("val"), recipe.train.seq_len)
    batch = torch.from_numpy(windows.get(windows.spread(recipe.train.eval_sequences)))
    with torch.no_grad():
        nats = model(input_ids=batch, labels=batch).loss.item() * batch[:, 1:].numel()
    nbytes = corpus.token_bytes()[batch[:, 1:].numpy()].sum()
    assert reference[1]["val_bpb"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    assert reference[1]["val_loss"] == pytest.approx(nats / batch[:, 1:].numel(), rel=1e-5)


def test_overrides_and_toml_recipes(corpus_dir: Path, tmp_path: Path) -> None:
    recipe = tiny(corpus_dir, "train.lr=3e-4", "model.plt_window_size=[4, 0]", "model.plt_loop_mode=sequential",
                  "name=other")
    assert recipe.train.lr == 3e-4 and recipe.model["plt_window_size"] == [4, 0]
    assert recipe.model["plt_loop_mode"] == "sequential" and recipe.name == "other"
    assert recipe_from_dict(tiny(corpus_dir).to_dict(), {"train.max_steps": 3}).train.max_steps == 3
    toml = tmp_path / "tiny.toml"
    toml.write_text(f'name = "tiny"\n[data]\ndir = "{corpus_dir}"\n[model]\nhidden_size = 32\n'
                    f'intermediate_size = 64\nnum_hidden_layers = 1\nnum_attention_heads = 2\n'
                    f'num_key_value_heads = 1\nmax_position_embeddings = 128\ntie_word_embeddings = true\n'
                    f'plt_num_loops = 2\n'
                    f'plt_window_size = [8, 0]\nplt_loop_mode = "parallel"\nplt_normalize_per_loop = true\n'
                    f'plt_gate_use_hidden_states = false\n[train]\n' + "".join(
                        f"{k} = {json.dumps(v)}\n" for k, v in tiny(corpus_dir).to_dict()["train"].items())
                    + '[distributed]\nstrategy = "ddp"\n')
    assert load_recipe(toml) == tiny(corpus_dir)


@pytest.mark.parametrize(("override", "message"), [
    ("train.lrr=0.1", r"unknown recipe field 'train.lrr' \(did you mean 'lr'\?\)"),
    ("trian.lr=0.1", r"unknown recipe field 'trian' \(did you mean 'train'\?\)"),
    ("model.hidden_sise=64", r"unknown recipe field 'model.hidden_sise' \(did you mean 'hidden_size'\?\)"),
    ("train.batch_size=four", r"train.batch_size = 'four' has the wrong type: expected int"),
    ("model.hidden_size=1.5", r"model.hidden_size = 1.5 has the wrong type: expected int"),
    ("train.dtype=float16", r"train.dtype = 'float16' has the wrong type: expected one of 'auto', 'float32'"),
    ("distributed.strategy=zero3", r"distributed.strategy = 'zero3' has the wrong type: expected one of 'ddp'"),
    ("model.vocab_size=100", r"model.vocab_size comes from the corpus's tokenizer"),
    ("model.plt_window_size=[4, 2]", r"PLTConfig.plt_window_size = \[4, 2\] is invalid: right must be 0"),
    ("train.micro_batch_size=3", r"batch_size / processes = 4 is not a multiple of train.micro_batch_size = 3"),
])
def test_bad_recipes_name_the_field(corpus_dir: Path, tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        train(tiny(corpus_dir, override), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_sequence_longer_than_the_model_positions_is_refused(corpus_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"train.seq_len = 256 is longer than model.max_position_embeddings = 128"):
        train(tiny(corpus_dir, "train.seq_len=256"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_missing_corpus_is_refused_with_the_command_that_builds_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no corpus at .*nowhere.*parloop data build --out"):
        train(tiny(tmp_path / "nowhere"), tmp_path / "run")


def test_batch_that_cannot_be_split_over_the_processes_stops_before_any_work(
        corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As torchrun would set them for 3 processes; no peers exist, so getting past the check would fail differently.
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    code = cli.main(["train", str(RECIPE), "--set", f"data.dir={corpus_dir}", "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert ("parloop train: error: train.batch_size = 4 cannot be split evenly over 3 processes: use a multiple "
            "of 3") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", sorted(RECIPE.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path: Path) -> None:
    recipe = load_recipe(path)
    recipe.check(world_size=1)
    limit = recipe.model.get("max_position_embeddings", PLTConfig().max_position_embeddings)
    assert recipe.train.seq_len <= limit

"""The reasoning tasks (`parloop.reasoning`): deterministic generators, a held-out set disjoint from training,
answers that an independent evaluator confirms (tracing: running the program), and the loss on answers only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parloop.reasoning.addition import Addition, number
from parloop.reasoning.batch import IGNORE
from parloop.reasoning.evaluate import evaluate
from parloop.reasoning.phop import PHop, reference_answer
from parloop.reasoning.split import is_held_out
from parloop.reasoning.tasks import TASKS, held_out_set, make_task, training_batch
from parloop.reasoning.tracing import TOKENS, Tracing, render, run
from parloop.reasoning.train import ReasoningRun, answer_loss, build_model, step_difficulty, train_model

DIFFICULTY = {"phop": 2, "tracing": 3, "addition": 4}


@pytest.mark.parametrize("name", list(TASKS))
def test_generators_are_deterministic_by_seed_and_step(name: str) -> None:
    task, d = make_task(name), DIFFICULTY[name]
    a, b = training_batch(task, 3, 7, 16, d), training_batch(task, 3, 7, 16, d)
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.labels, b.labels)
    other = training_batch(task, 4, 7, 16, d)
    assert not np.array_equal(a.inputs, other.inputs)
    assert np.array_equal(held_out_set(task, 50, d).inputs, held_out_set(task, 50, d).inputs)


@pytest.mark.parametrize("name", list(TASKS))
def test_held_out_instances_never_appear_in_training(name: str) -> None:
    task, d = make_task(name), DIFFICULTY[name]
    held = held_out_set(task, 300, d)
    assert is_held_out(held.inputs).all()
    train = np.concatenate([training_batch(task, s, step, 64, d).inputs for s in range(3) for step in range(20)])
    assert not is_held_out(train).any()
    assert not {r.tobytes() for r in held.inputs} & {r.tobytes() for r in train}
    # without the split, a sample this size does draw held-out-side rows, so the filter above is doing the work
    raw = task.sample(np.random.default_rng(0), 500, d).inputs
    assert 0.1 < is_held_out(raw).mean() < 0.3


@pytest.mark.parametrize("k", [1, 2, 4])
def test_tracing_answers_are_what_python_prints(k: int) -> None:
    batch = training_batch(Tracing(), 0, k, 40, k)
    for row, labels in zip(batch.inputs, batch.labels, strict=True):
        source = render(row)
        assert source.rstrip().endswith(")") and "print(" in source
        answer = labels[labels != IGNORE]
        assert len(answer) == 1 and TOKENS[answer[0]] == run(source)
        assert Tracing.check_answer(row, int(answer[0]))
        assert not Tracing.check_answer(row, TOKENS.index(str((int(TOKENS[answer[0]]) + 1) % 10)))


def test_tracing_chain_has_k_dependent_assignments() -> None:
    row = training_batch(Tracing(distractors=0), 1, 0, 1, 3).inputs[0]
    lines = [line.split() for line in render(row).splitlines()]
    # no distractors: a = c; b = a +/- c; d = b +/- c; print(d)
    assert len(lines) == 4 and len(lines[0]) == 3 and lines[1][2] == lines[0][0] and lines[2][2] == lines[1][0]


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_phop_answers_match_a_walk_of_the_sequence(hops: int) -> None:
    batch = training_batch(PHop(alphabet=4, length=40), 0, 0, 8, hops)
    for seq, labels in zip(batch.inputs, batch.labels, strict=True):
        for t in range(len(seq)):
            expected = reference_answer(seq.tolist(), t, hops)
            assert labels[t] == (IGNORE if expected is None else expected)


def test_addition_answers_are_the_sums() -> None:
    batch = training_batch(Addition(), 0, 0, 50, 5)
    for row, labels in zip(batch.inputs, batch.labels, strict=True):
        answer = labels[labels != IGNORE]
        assert len(answer) == 6 and Addition.check_answer(row, answer.tolist())
        assert number(row[:5]) + number(row[6:11]) == number(answer)


@pytest.mark.parametrize("name", list(TASKS))
def test_filler_puts_the_answers_later(name: str) -> None:
    task, d = make_task(name), DIFFICULTY[name]
    plain, filled = training_batch(task, 0, 0, 8, d), training_batch(task, 0, 0, 8, d, filler=2)
    if name == "phop":  # the answer for position t is due at t + 2
        assert np.array_equal(filled.labels[:, 2:], plain.labels[:, :-2])
        assert (filled.labels[:, :2] == IGNORE).all()
    else:  # two filler tokens between the question and the answer, answers unchanged
        assert filled.inputs.shape[1] == plain.inputs.shape[1] + 2
        assert np.array_equal(filled.labels[filled.labels != IGNORE], plain.labels[plain.labels != IGNORE])
        first = np.argmax(plain.labels[0] != IGNORE)
        assert (filled.labels[:, first:first + 2] == IGNORE).all() and (filled.labels[:, first + 2] != IGNORE).all()


def test_loss_is_on_answer_tokens_only() -> None:
    batch = training_batch(Addition(), 0, 0, 4, 3)
    labels = torch.from_numpy(batch.labels)
    logits = torch.randn(*labels.shape, 13, requires_grad=True)
    loss = answer_loss(logits, labels)
    loss.backward()
    answer = labels != IGNORE
    assert (logits.grad[~answer] == 0).all() and (logits.grad[answer] != 0).any()
    # changing what the model predicts at a non-answer position (its next-token target there) changes nothing
    moved = logits.detach().clone()
    moved[~answer] += torch.randn_like(moved[~answer]) * 5
    assert answer_loss(moved, labels) == pytest.approx(float(loss.detach()))
    moved[answer] += 1.0 * torch.randn_like(moved[answer])
    assert answer_loss(moved, labels) != pytest.approx(float(loss.detach()))


def test_curriculum_ramps_to_the_difficulty() -> None:
    run = ReasoningRun("phop", 3, 1, 1, "parallel", 0, 1e-3, 100, 8, curriculum=0.5)
    assert [step_difficulty(run, s) for s in (0, 20, 40, 60, 99)] == [1, 2, 3, 3, 3]
    assert step_difficulty(ReasoningRun("phop", 3, 1, 1, "parallel", 0, 1e-3, 100, 8), 0) == 3


def test_a_loop_model_trains_and_is_measured_per_loop() -> None:
    model_fields = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                        plt_window_size=[8, 0], tie_word_embeddings=True)
    run = ReasoningRun("phop", 1, 1, 2, "parallel", 0, 3e-3, 4, 8, model=model_fields)
    task = make_task("phop")
    model, figures = train_model(run, task)
    result = evaluate(model, held_out_set(task, 100, 1))
    assert len(result["per_loop_accuracy"]) == 2 and result["accuracy"] == result["per_loop_accuracy"][-1]
    assert result["instances"] >= 100 and 0 <= result["accuracy"] <= 1
    assert len(result["gate_mean"]) == 1 and len(result["relative_update"]) == 1
    assert figures["parameters"] == build_model(run, task).num_used_parameters()


@pytest.mark.parametrize("name", list(TASKS))
def test_validation_and_test_sets_are_disjoint(name: str) -> None:
    task, d = make_task(name), DIFFICULTY[name]
    val, test = held_out_set(task, 200, d, part="val"), held_out_set(task, 200, d)
    assert is_held_out(val.inputs).all() and is_held_out(test.inputs).all()
    assert not {r.tobytes() for r in val.inputs} & {r.tobytes() for r in test.inputs}

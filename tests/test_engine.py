"""The continuous-batching engine decodes exactly what each request would decode alone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import tiny_model

from parloop import PLTCache
from parloop.inference import engine as engine_module
from parloop.inference.engine import Engine, LimitError, QueueFull, SamplingParams, Sequence
from parloop.inference.rows import RowCache
from parloop.inference.sampling import make_generator, sample


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # models this small run far faster on one thread; a thread pool only adds wake-up latency per op
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


GREEDY = SamplingParams(max_tokens=8, temperature=0)

# (scheduler step at which the request arrives, prompt length, max_tokens): requests join while others run,
# a long prompt arrives when the batch's slot span is shorter (the batch shifts right), rows finish at different
# steps (rows are freed, the slot axis compacts), and a later request reuses a freed row.
PLAN = [(0, 3, 10), (0, 7, 5), (2, 12, 9), (3, 1, 6), (5, 20, 8), (6, 4, 12), (9, 2, 3), (14, 9, 4)]


def ignore(token: int | None, reason: str | None) -> None:
    pass


def run_plan(engine: Engine, prompts: list[list[int]], plan: list[tuple[int, int, int]],
             params: SamplingParams = GREEDY) -> list[Sequence]:
    seqs: dict[int, Sequence] = {}
    step = 0
    while len(seqs) < len(plan) or engine.has_work():
        for i, (arrival, _, max_tokens) in enumerate(plan):
            if arrival == step:
                seqs[i] = engine.submit(prompts[i], SamplingParams(max_tokens, params.temperature, params.top_p,
                                                                   params.seed), ignore)
        engine.step()
        step += 1
        assert step < 200, "the engine did not finish"
    return [seqs[i] for i in range(len(plan))]


def tensor_bytes_held(obj: Any) -> int:
    """Bytes of every tensor reachable from `obj` through attributes and containers (each storage
    counted once): what keeping `obj` alive keeps in memory, whatever its fields are called."""
    seen_objects: set[int] = set()
    storages: dict[int, int] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen_objects:
            continue
        seen_objects.add(id(item))
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, (type, torch.nn.Module)):  # not a class nor a model
            stack.extend(vars(item).values())
    return sum(storages.values())


def random_prompts(plan: list[tuple[int, int, int]], vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for _, n, _ in plan]


def greedy_alone(model: torch.nn.Module, prompt: list[int], max_tokens: int, **kwargs: object) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, **kwargs)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize(("mode", "loops", "max_batch"), [
    ("parallel", 2, 4), ("parallel", 3, 8), ("parallel", 1, 4), ("sequential_shared", 2, 4), ("sequential", 3, 4),
    ("parallel", 2, 1),
])
def test_concurrent_greedy_equals_generate_alone(mode: str, loops: int, max_batch: int) -> None:
    # window 2 (rings of 3 entries) is much shorter than the sequences, so every shift must rotate the rings
    model = tiny_model(plt_loop_mode=mode, plt_num_loops=loops, plt_window_size=[2, 0])
    engine = Engine(model, max_batch_size=max_batch)
    prompts = random_prompts(PLAN, model.config.vocab_size)
    seqs = run_plan(engine, prompts, PLAN)
    for seq, prompt, (_, _, max_tokens) in zip(seqs, prompts, PLAN, strict=True):
        assert seq.output_ids == greedy_alone(model, prompt, max_tokens)
        assert seq.finish_reason == "length"
    assert engine.batch_size == 0 and tensor_bytes_held(engine.cache) == 0  # idle: the cache holds no buffer


@pytest.mark.parametrize(("mode", "loops"), [("parallel", 3), ("sequential", 2)])
def test_reset_releases_every_buffer(mode: str, loops: int) -> None:
    model = tiny_model(plt_loop_mode=mode, plt_num_loops=loops)
    cache = PLTCache(model.config)
    cache.activate_past_recording()  # the journal's records hold tensors too
    with torch.no_grad():
        model(torch.randint(1, 61, (2, 6)), past_key_values=cache, use_cache=True)
        model(torch.randint(1, 61, (2, 1)), past_key_values=cache, use_cache=True)
    assert tensor_bytes_held(cache) > 0
    cache.reset()
    assert tensor_bytes_held(cache) == 0 and cache.get_seq_length() == 0
    with torch.no_grad():  # and it works again from scratch
        ids = torch.randint(1, 61, (1, 4))
        torch.testing.assert_close(model(ids, past_key_values=cache, use_cache=True).logits, model(ids).logits)


def test_an_idle_server_engine_holds_no_kv_buffer() -> None:
    model = tiny_model(plt_num_loops=3)
    engine = Engine(model, max_batch_size=4)
    done = threading.Event()
    running_bytes: list[int] = []

    def listener(token: int | None, reason: str | None) -> None:  # on the engine thread, mid-generation
        running_bytes.append(tensor_bytes_held(engine.cache))
        if reason is not None:
            done.set()

    engine.start()
    try:
        engine.submit([1, 2, 3, 4, 5], SamplingParams(max_tokens=6, temperature=0), listener)
        assert done.wait(60)
        for _ in range(200):  # the step that finished the sequence releases the cache when it ends
            if not engine.has_work() and tensor_bytes_held(engine.cache) == 0:
                break
            threading.Event().wait(0.05)
    finally:
        engine.stop()
    assert max(running_bytes) > 0  # the measurement sees the cache while it is in use
    assert tensor_bytes_held(engine.cache) == 0


def test_batch_really_shares_decode_steps() -> None:
    model = tiny_model()
    engine = Engine(model, max_batch_size=4)
    for prompt in ([1, 2, 3], [4, 5, 6, 7, 8, 9], [10]):
        engine.submit(prompt, GREEDY, ignore)
    engine.step()
    assert engine.batch_size == 3 and engine.cache.batch_size == 3
    # rows end at the last slot, so the span is the longest sequence (6 prompt + 1 decoded token)
    assert engine.cache.get_seq_length() == 7
    assert engine.cache.row_tokens() == [4, 7, 2]


def test_shift_and_insert_change_no_logits() -> None:
    model = tiny_model(plt_num_loops=3, plt_window_size=[2, 0])
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 61, (2, 6), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    nxt = torch.randint(1, 61, (2, 1), generator=gen)
    with torch.no_grad():
        cache = RowCache(model.config)
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        moved = RowCache(model.config)
        model(ids, attention_mask=mask, past_key_values=moved, use_cache=True)
        moved.shift_slots(5)  # 5 is not a multiple of the ring size 3
        expected = model(nxt, past_key_values=cache, use_cache=True).logits
        shifted = model(nxt, past_key_values=moved, use_cache=True).logits
        assert (shifted - expected).abs().max() <= 1e-5
        assert moved.get_seq_length() == 12 and moved.row_tokens() == cache.row_tokens()

        # the same two rows moved one by one into a batch whose span is longer, in the other order
        batch = RowCache(model.config)
        model(torch.randint(1, 61, (2, 9), generator=gen), past_key_values=batch, use_cache=True)
        batch.insert_row(0, cache, 1)
        batch.insert_row(1, cache, 0)
        step2 = torch.randint(1, 61, (2, 1), generator=gen)
        again = model(step2, past_key_values=cache, use_cache=True).logits
        inserted = model(step2.flip(0), past_key_values=batch, use_cache=True).logits
        assert (inserted.flip(0) - again).abs().max() <= 1e-5


def test_stops_at_eos_like_generate() -> None:
    model = tiny_model()
    prompt = [5, 9, 2, 33]
    free_run = greedy_alone(model, prompt, 10)
    eos = free_run[3]
    engine = Engine(model, max_batch_size=2, eos_token_ids={eos})
    seq = engine.submit(prompt, SamplingParams(max_tokens=10, temperature=0), ignore)
    engine.run_until_done()
    assert seq.output_ids == greedy_alone(model, prompt, 10, eos_token_id=eos)
    assert seq.output_ids[-1] == eos and seq.finish_reason == "stop"
    assert len(seq.output_ids) == free_run.index(eos) + 1


def test_seeded_sampling_does_not_depend_on_the_batch() -> None:
    model = tiny_model()
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=42)
    alone = Engine(model, max_batch_size=1)
    a = alone.submit([3, 4, 5], params, ignore)
    alone.run_until_done()
    crowded = Engine(model, max_batch_size=4)
    crowded.submit([7, 8, 9, 10, 11], SamplingParams(max_tokens=20, temperature=1.0), ignore)
    crowded.step()
    b = crowded.submit([3, 4, 5], params, ignore)
    c = crowded.submit([3, 4, 5], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=43), ignore)
    crowded.run_until_done()
    assert a.output_ids == b.output_ids
    assert c.output_ids != a.output_ids


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]])
    seqs = [Sequence([1], SamplingParams(temperature=1.0, top_p=0.5), 1, ignore, generator=torch.Generator())]
    seqs[0].generator.manual_seed(0)
    # token 0 alone has probability 0.71 >= 0.5, so it is the whole nucleus
    assert {sample(logits, seqs)[0] for _ in range(50)} == {0}
    seqs[0] = Sequence([1], SamplingParams(temperature=1.0, top_p=0.9), 1, ignore, generator=torch.Generator())
    assert {sample(logits, seqs)[0] for _ in range(200)} == {0, 1}


def test_cancel_frees_the_row_at_the_next_step() -> None:
    model = tiny_model()
    engine = Engine(model, max_batch_size=4)
    long = engine.submit([1, 2, 3, 4, 5, 6, 7, 8], SamplingParams(max_tokens=50, temperature=0), ignore)
    short = engine.submit([9, 10], SamplingParams(max_tokens=6, temperature=0), ignore)
    engine.step()
    engine.step()
    assert engine.batch_size == 2
    engine.cancel(long)
    engine.step()
    assert long.finish_reason == "cancelled" and engine.batch_size == 1
    # the long row was row 0: its slots are gone, the batch is now just the short sequence's span
    assert engine.cache.get_seq_length() == len(short.prompt_ids) + len(short.output_ids) - 1
    assert engine.finished_total["cancelled"] == 1
    engine.run_until_done()
    assert short.output_ids == greedy_alone(model, [9, 10], 6)


def test_cancel_while_waiting() -> None:
    engine = Engine(tiny_model(), max_batch_size=1)
    first = engine.submit([1, 2], SamplingParams(max_tokens=3, temperature=0), ignore)
    queued = engine.submit([3, 4], SamplingParams(max_tokens=3, temperature=0), ignore)
    engine.step()
    assert engine.queue_length == 1
    engine.cancel(queued)
    engine.run_until_done()
    assert queued.finish_reason == "cancelled" and queued.output_ids == []
    assert first.finish_reason == "length"


def test_limits_name_themselves() -> None:
    engine = Engine(tiny_model(max_position_embeddings=64), max_batch_size=2, max_prompt_tokens=10,
                    max_cached_tokens=40)
    cases = [((11, 5, 1), "max_prompt_tokens"), ((10, 60, 1), "max_model_len"), ((10, 31, 1), "max_cached_tokens"),
             ((5, 5, 3), "max_batch_size"), ((0, 5, 1), "prompt")]
    for (prompt, max_tokens, n), limit in cases:
        with pytest.raises(LimitError) as err:
            engine.check(prompt, max_tokens, n)
        assert err.value.limit == limit
        assert limit == "prompt" or f"--{limit.replace('_', '-')}" in str(err.value)
    # without max_tokens a request gets what the tighter of the context and the budget leave
    assert engine.check(10, None) == 30


def test_admission_waits_for_the_token_budget() -> None:
    model = tiny_model()
    engine = Engine(model, max_batch_size=4, max_cached_tokens=20)
    a = engine.submit([1, 2, 3, 4], SamplingParams(max_tokens=8, temperature=0), ignore)  # reserves 12
    b = engine.submit([5, 6, 7], SamplingParams(max_tokens=6, temperature=0), ignore)  # 9 more: over 20
    engine.step()
    assert engine.batch_size == 1 and engine.queue_length == 1
    engine.run_until_done()
    assert b.first_token_at > a.finished_at
    assert b.output_ids == greedy_alone(model, [5, 6, 7], 6)


def test_a_failing_listener_cancels_only_its_sequence() -> None:
    def broken(token: int | None, reason: str | None) -> None:
        raise RuntimeError("consumer bug")

    engine = Engine(tiny_model())
    bad = engine.submit([1, 2, 3], SamplingParams(max_tokens=5, temperature=0), broken)
    good = engine.submit([4, 5], SamplingParams(max_tokens=5, temperature=0), ignore)
    engine.run_until_done()
    assert bad.finish_reason == "cancelled" and len(bad.output_ids) == 1
    assert good.finish_reason == "length" and len(good.output_ids) == 5


def test_engine_thread_serves_submissions() -> None:
    model = tiny_model()
    engine = Engine(model, max_batch_size=4)
    engine.start()
    try:
        done = threading.Event()
        tokens: list[int] = []

        def collect(token: int | None, reason: str | None) -> None:
            tokens.append(token)
            if reason is not None:
                done.set()

        engine.submit([1, 2, 3], SamplingParams(max_tokens=7, temperature=0), collect)
        assert done.wait(30)
        assert engine.is_running()
    finally:
        engine.stop()
    assert tokens == greedy_alone(model, [1, 2, 3], 7)
    assert not engine.is_running()


def test_a_failed_step_fails_its_sequences_and_the_engine_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    forward, calls = model.forward, []

    def flaky(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the device fell over")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    engine = Engine(model)
    events: dict[str, list] = {"a": [], "b": []}
    done = {name: threading.Event() for name in events}

    def listener(name: str) -> object:
        def on_event(token: int | None, reason: str | None) -> None:
            events[name].append((token, reason))
            if reason is not None:
                done[name].set()
        return on_event

    engine.start()
    try:
        failed = engine.submit([1, 2, 3], SamplingParams(max_tokens=10, temperature=0), listener("a"))
        assert done["a"].wait(30)
        after = engine.submit([4, 5], SamplingParams(max_tokens=4, temperature=0), listener("b"))
        assert done["b"].wait(30)
    finally:
        engine.stop()
    assert failed.finish_reason == "error" and events["a"][-1] == (None, "error")
    assert len(events["a"]) == 3  # prefill and one decode step gave tokens, the third call failed
    assert after.finish_reason == "length" and after.output_ids == greedy_alone(model, [4, 5], 4)
    assert engine.finished_total["error"] == 1


def test_a_failing_pick_fails_only_its_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    engine = Engine(model, max_batch_size=4)
    bad_params = SamplingParams(max_tokens=6, temperature=0.5, seed=1)
    real_pick = engine_module.pick

    def pick(logits: torch.Tensor, seq: Sequence, argmax: int | None = None) -> int:
        if seq.params is bad_params and len(seq.output_ids) == 2:
            raise RuntimeError("bad sampling")
        return real_pick(logits, seq, argmax)

    monkeypatch.setattr(engine_module, "pick", pick)
    events: list[tuple[int | None, str | None]] = []
    good = [engine.submit([1, 2, 3], GREEDY, ignore), engine.submit([4, 5], GREEDY, ignore)]
    bad = engine.submit([6, 7], bad_params, lambda token, reason: events.append((token, reason)))
    engine.run_until_done()
    assert bad.finish_reason == "error" and events[-1] == (None, "error") and len(bad.output_ids) == 2
    for seq in good:
        assert seq.finish_reason == "length" and seq.output_ids == greedy_alone(model, seq.prompt_ids, 8)


def test_a_failed_prefill_fails_only_the_sequences_in_it(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    engine = Engine(model, max_batch_size=4)
    running = engine.submit([1, 2, 3], GREEDY, ignore)
    engine.step()
    prefill = engine.runner.prefill
    monkeypatch.setattr(engine.runner, "prefill", lambda *args: (_ for _ in ()).throw(RuntimeError("prefill")))
    joined = [engine.submit([4, 5], GREEDY, ignore), engine.submit([6], GREEDY, ignore)]
    engine.step()
    monkeypatch.setattr(engine.runner, "prefill", prefill)
    engine.run_until_done()
    assert [seq.finish_reason for seq in joined] == ["error", "error"]  # finished, not left hanging
    assert running.output_ids == greedy_alone(model, [1, 2, 3], 8)


def test_sampling_is_safe_for_any_accepted_parameters() -> None:
    logits = torch.tensor([[1.0, float("nan"), 3.0, float("inf"), -float("inf")], [2.0, 1.0, 0.0, -1.0, 50.0]])
    for temperature in (1e-40, 1e-6, 1e-5, 0.3, 2.0):
        params = SamplingParams(temperature=temperature, top_p=0.5, top_k=2, seed=0, presence_penalty=-2,
                                frequency_penalty=2, logit_bias={0: 100.0})
        seqs = [Sequence([1], params, 4, ignore, output_ids=[0, 0], generator=make_generator(params, "cpu"))
                for _ in range(2)]
        tokens = sample(logits, seqs)
        assert all(0 <= t < 5 for t in tokens)
    greedy = [Sequence([1], SamplingParams(temperature=1e-40), 4, ignore) for _ in range(2)]
    assert sample(logits, greedy) == logits.nan_to_num(-1e30).argmax(-1).tolist()
    with pytest.raises(ValueError):
        SamplingParams(temperature=float("nan"))


def test_queue_bound_and_prompt_only_sequences() -> None:
    model = tiny_model()
    engine = Engine(model, max_batch_size=1, max_queued_sequences=3)
    engine.submit_all([([1, 2], GREEDY, ignore)] * 3)
    with pytest.raises(QueueFull):
        engine.submit([3], GREEDY, ignore)
    with pytest.raises(LimitError, match="max-queued-sequences"):
        engine.submit_all([([1], GREEDY, ignore)] * 4)
    assert engine.queue_length == 3  # all or none: nothing of the refused requests was queued
    engine.run_until_done()
    scored = engine.submit([5, 9, 2, 33], SamplingParams(max_tokens=0, prompt_logprobs=2), ignore)
    engine.run_until_done()
    assert scored.finish_reason == "length" and scored.output_ids == []
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([[5, 9, 2, 33]])).logits[0].float(), -1)
    assert scored.prompt_logprobs[0] is None
    for j, entry in enumerate(scored.prompt_logprobs[1:], start=1):
        assert entry.logprob == pytest.approx(float(logprobs[j - 1, scored.prompt_ids[j]]), abs=1e-5)
        assert len(entry.top) == 2 and entry.top[0][1] == pytest.approx(float(logprobs[j - 1].max()), abs=1e-5)

"""PLT inside vLLM (parloop.vllm, docs/vllm.md): the plugin gives parloop's greedy tokens and log-probabilities.

Every engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) on tiny checkpoints written here; engine
start-up costs seconds, so each engine is shared by the tests that use it. The plugin is found through its entry
point: nothing here registers it.
"""

from __future__ import annotations

import gc
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import tiny_model
from torch import nn

pytest.importorskip("vllm", reason="vLLM is not installed: `pip install -e '.[dev,vllm]'` (scripts/setup.sh) runs "
                                   "these tests")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm import envs as vllm_envs  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from parloop import PLTForCausalLM  # noqa: E402
from parloop.cli import main as cli_main  # noqa: E402
from parloop.vllm import bench as vllm_bench  # noqa: E402
from parloop.vllm.bench import products_report, report, weight_products_ms  # noqa: E402
from parloop.vllm.handoff import HandoffStore  # noqa: E402

TOLERANCE = 1e-4
BLOCK = 32  # the CPU attention kernels need blocks of a multiple of 32 tokens
# head_dim >= 32: vLLM's CPU attention supports no smaller head
SHAPE = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32, intermediate_size=96,
             vocab_size=97, max_position_embeddings=256)
ENGINE = dict(skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=160, seed=0,
              block_size=BLOCK, disable_log_stats=False)
# (loops, gate on hidden states, per-loop norm, emb/hidden scales); windows are shorter than the prompts
MATRIX = {
    "R1": dict(plt_num_loops=1),
    "R2_query_gate": dict(plt_num_loops=2, plt_window_size=[2, 0]),
    "R2_hidden_gate_loop_norm_scales": dict(plt_num_loops=2, plt_window_size=[3, 0], plt_gate_use_hidden_states=True,
                                            plt_normalize_per_loop=True, plt_emb_scale=0.8, plt_hidden_scale=0.6),
    "R3_query_gate_loop_norm": dict(plt_num_loops=3, plt_window_size=[4, 0], plt_normalize_per_loop=True),
    "R3_hidden_gate": dict(plt_num_loops=3, plt_window_size=[2, 0], plt_gate_use_hidden_states=True),
}


def make_checkpoint(directory: Path, **overrides: Any) -> PLTForCausalLM:
    model = tiny_model(**{**SHAPE, **overrides})
    model.save_pretrained(directory)
    return model


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, SHAPE["vocab_size"], (n,), generator=g).tolist() for n in lengths]


def run(llm: LLM, token_prompts: list[list[int]], params: SamplingParams) -> list[Any]:
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in token_prompts], params, use_tqdm=False)


def teacher_forced_logprobs(model: PLTForCausalLM, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """parloop's log-probability of each generated token, from one full forward over prompt + tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1)[torch.arange(len(tokens)), torch.tensor(tokens)]


def sampled_logprobs(sample: Any) -> torch.Tensor:
    return torch.tensor([step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids, strict=True)])


def assert_matches_parloop(model: PLTForCausalLM, prompt: list[int], sample: Any) -> None:
    tokens = list(sample.token_ids)
    expected = teacher_forced_logprobs(model, prompt, tokens)
    assert (sampled_logprobs(sample) - expected).abs().max() <= TOLERANCE


def metric(llm: LLM, name: str) -> float:
    return sum(getattr(m, "value", 0) or 0 for m in llm.get_metrics() if m.name == name)


def shut_down(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module", params=list(MATRIX))
def matrix_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[LLM, PLTForCausalLM]]:
    directory = tmp_path_factory.mktemp("plt")
    model = make_checkpoint(directory, **MATRIX[request.param])
    llm = LLM(str(directory), **ENGINE)
    yield llm, model
    shut_down(llm)


def test_greedy_tokens_and_logprobs_equal_parloop_generate(matrix_engine: tuple[LLM, PLTForCausalLM]) -> None:
    llm, model = matrix_engine
    token_prompts = prompts([3, 9, 17, 30], seed=1)  # concurrent requests of different lengths
    outputs = run(llm, token_prompts, SamplingParams(temperature=0, max_tokens=12, logprobs=0, detokenize=False))
    for prompt, out in zip(token_prompts, outputs, strict=True):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                                 output_scores=True, return_dict_in_generate=True)
        expected_tokens = ref.sequences[0, len(prompt):].tolist()
        expected_logprobs = torch.stack([torch.log_softmax(s[0].float(), -1)[t]
                                         for s, t in zip(ref.scores, expected_tokens, strict=True)])
        sample = out.outputs[0]
        assert list(sample.token_ids) == expected_tokens
        assert (sampled_logprobs(sample) - expected_logprobs).abs().max() <= TOLERANCE


@pytest.fixture(scope="module")
def stress_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LLM, PLTForCausalLM]]:
    """Small steps (chunked prefill, mixed prefill + decode batches), prefix caching, and a KV cache of a few
    blocks, so that requests are preempted and recomputed, and pages are reused."""
    directory = tmp_path_factory.mktemp("plt-stress")
    model = make_checkpoint(directory, plt_num_loops=3, plt_window_size=[3, 0], plt_gate_use_hidden_states=True,
                            plt_normalize_per_loop=True, plt_emb_scale=0.9, plt_hidden_scale=0.7)
    llm = LLM(str(directory), **ENGINE, enable_prefix_caching=True, max_num_batched_tokens=16, max_num_seqs=4,
              num_gpu_blocks_override=14)
    yield llm, model
    shut_down(llm)


def record_query_lengths(llm: LLM, steps: list[list[int]]) -> None:
    """Append to `steps` the per-request new-token counts of every step that runs the loops one after another
    (the engine runs in this process, so the model's method can be wrapped; `stop_recording` undoes it)."""
    def wrap(model: nn.Module) -> None:
        inner = model.model
        original = inner._loop_by_loop

        def recorded(positions: torch.Tensor, emb: torch.Tensor, metadata: Any) -> torch.Tensor:
            if metadata is not None:
                starts = metadata.query_start_loc.tolist()
                steps.append([b - a for a, b in zip(starts[:-1], starts[1:], strict=True) if b > a])
            return original(positions, emb, metadata)

        inner._loop_by_loop = recorded
    llm.apply_model(wrap)


def stop_recording(llm: LLM) -> None:
    llm.apply_model(lambda model: model.model.__dict__.pop("_loop_by_loop", None))


def test_chunked_prefill_mixed_batches(stress_engine: tuple[LLM, PLTForCausalLM]) -> None:
    llm, model = stress_engine
    token_prompts = prompts([45, 5, 23, 38], seed=2)  # longer than a step of 16 tokens: prefilled in chunks
    steps: list[list[int]] = []
    record_query_lengths(llm, steps)
    try:
        outputs = run(llm, token_prompts, SamplingParams(temperature=0, max_tokens=10, logprobs=0, detokenize=False))
    finally:
        stop_recording(llm)
    for prompt, out in zip(token_prompts, outputs, strict=True):
        assert_matches_parloop(model, prompt, out.outputs[0])
    # the schedule this test is about happened: a prompt split over steps, and a step mixing a prefill chunk with
    # decoding requests (one new token each)
    assert any(1 in lengths and max(lengths) > 1 for lengths in steps), steps


def test_prompt_logprobs_of_a_chunked_prefill(stress_engine: tuple[LLM, PLTForCausalLM]) -> None:
    """Every prompt position's log-probability, computed chunk by chunk, is parloop's full forward's."""
    llm, model = stress_engine
    token_prompts = prompts([40, 23], seed=3)
    outputs = run(llm, token_prompts, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0,
                                                     detokenize=False))
    for prompt, out in zip(token_prompts, outputs, strict=True):
        got = torch.tensor([step[t].logprob for step, t in zip(out.prompt_logprobs[1:], prompt[1:], strict=True)])
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, :-1].float()
        expected = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        assert (got - expected).abs().max() <= TOLERANCE


def test_prefix_cache_hits(stress_engine: tuple[LLM, PLTForCausalLM]) -> None:
    llm, model = stress_engine
    prefix = prompts([2 * BLOCK + 7], seed=3)[0]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=0, detokenize=False)
    run(llm, [prefix], params)
    hits = metric(llm, "vllm:prefix_cache_hits")
    # the carry into the first recomputed token comes from a cached page
    token_prompts = [prefix[:2 * BLOCK + 1 + i] + tail for i, tail in enumerate(prompts([4, 9], seed=4))]
    outputs = run(llm, token_prompts, params)
    assert metric(llm, "vllm:prefix_cache_hits") > hits
    for prompt, out in zip(token_prompts, outputs, strict=True):
        assert_matches_parloop(model, prompt, out.outputs[0])


def test_preemption_and_recomputation(stress_engine: tuple[LLM, PLTForCausalLM]) -> None:
    llm, model = stress_engine
    before = metric(llm, "vllm:num_preemptions")
    token_prompts = prompts([20, 31, 12, 26], seed=5)
    outputs = run(llm, token_prompts, SamplingParams(temperature=0, max_tokens=60, logprobs=0, detokenize=False))
    assert metric(llm, "vllm:num_preemptions") > before  # the test is void unless the cache ran out
    for prompt, out in zip(token_prompts, outputs, strict=True):
        assert_matches_parloop(model, prompt, out.outputs[0])


def test_several_samples_per_prompt(stress_engine: tuple[LLM, PLTForCausalLM]) -> None:
    llm, model = stress_engine
    prompt = prompts([11], seed=6)[0]
    # no per-request seed: vLLM-CPU's generators do not support one; any samples will do
    params = SamplingParams(n=3, temperature=1.0, max_tokens=10, logprobs=0, detokenize=False)
    samples = run(llm, [prompt], params)[0].outputs
    assert len({tuple(s.token_ids) for s in samples}) > 1
    for sample in samples:
        assert_matches_parloop(model, prompt, sample)


def test_loop_by_loop_decoding_is_exact_too(stress_engine: tuple[LLM, PLTForCausalLM]) -> None:
    """The benchmark's baseline (the fork's algorithm) decodes the same tokens: it compares speed, not results."""
    llm, model = stress_engine
    token_prompts = prompts([7, 12], seed=5)
    try:
        llm.apply_model(lambda m: setattr(m.model, "one_pass_decode", False))
        outputs = run(llm, token_prompts, SamplingParams(temperature=0, max_tokens=6, logprobs=0, detokenize=False))
    finally:
        llm.apply_model(lambda m: setattr(m.model, "one_pass_decode", True))
    for prompt, out in zip(token_prompts, outputs, strict=True):
        assert_matches_parloop(model, prompt, out.outputs[0])
    products = llm.apply_model(lambda m: weight_products_ms(m, 3, 1))[0]
    assert products.keys() == {"rows", "layers", "head"} and products["rows"] == 3
    assert all(isinstance(products[k], float) and math.isfinite(products[k]) for k in ("layers", "head"))
    assert f"| 3 | {products['layers']:.1f} | {products['head']:.1f} |" in products_report([products])


def test_a_padding_token_never_writes_a_state_into_a_request_s_page() -> None:
    store = HandoffStore.__new__(HandoffStore)
    nn.Module.__init__(store)
    store.hidden_size, store.row, store.per_state = 6, 4, 2  # a state of 6 numbers takes 2 holders of 4
    store.holders = [SimpleNamespace(kv_cache=torch.zeros(3, 1, 4, 4)) for _ in range(2)]  # 3 blocks of 4 slots
    states = torch.arange(12.0).reshape(2, 6) + 1
    store.write(0, states, torch.tensor([5, -1]))  # a real token at slot 5, a padding token (slot -1)
    assert torch.equal(store.read(0, torch.tensor([5])), states[:1])
    for holder in store.holders:  # the cache's last slot (block 2, offset 3) is untouched; slot 0 took the row
        assert not holder.kv_cache[2, :, 3].any() and holder.kv_cache[0, :, 0].any()


def test_bench_report_is_speed_up_and_cost_over_r1() -> None:
    rows = [dict(loops=r, batch=1, mode=mode, clock="cpu", ms_per_step=ms)
            for r, mode, ms in ((1, "one-pass", 10.0), (1, "loop-by-loop", 10.5), (2, "one-pass", 12.0),
                                (2, "loop-by-loop", 20.0))]
    table = report(rows, "cpu")
    assert "| 1 | 1 | 10.0 | 10.5 | 1.05x | 1.00x |" in table and "| 2 | 1 | 12.0 | 20.0 | 1.67x | 1.20x |" in table


def test_ngram_speculative_decoding_is_exact(tmp_path: Path) -> None:
    """Verification steps carry up to 3 draft tokens per request (run loop by loop); rejected drafts leave KV and
    carries at positions that are written again before they are read."""
    model = make_checkpoint(tmp_path, plt_num_loops=2, plt_window_size=[2, 0], plt_gate_use_hidden_states=True,
                            plt_normalize_per_loop=True)
    llm = LLM(str(tmp_path), **ENGINE, speculative_config=dict(method="ngram", num_speculative_tokens=3,
                                                               prompt_lookup_max=3, prompt_lookup_min=1))
    try:
        token_prompts = [[5, 6, 7, 8] * 6, [9, 10, 11] * 8]  # repetitive, so that the n-gram proposer drafts
        outputs = run(llm, token_prompts, SamplingParams(temperature=0, max_tokens=100, logprobs=0, detokenize=False))
        accepted = metric(llm, "vllm:spec_decode_num_accepted_tokens")
        assert 0 < accepted < metric(llm, "vllm:spec_decode_num_draft_tokens")  # drafts accepted and rejected
        for prompt, out in zip(token_prompts, outputs, strict=True):
            with torch.no_grad():
                expected = model.generate(torch.tensor([prompt]), max_new_tokens=100, do_sample=False,
                                          pad_token_id=0)[0, len(prompt):].tolist()
            assert list(out.outputs[0].token_ids) == expected
            assert_matches_parloop(model, prompt, out.outputs[0])
    finally:
        shut_down(llm)


def test_parloop_bench_engine_vllm_runs_the_plugin_benchmark(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    calls = []
    monkeypatch.setattr(vllm_bench, "main", calls.append)
    assert cli_main(["bench", "--engine", "vllm", "--loops", "1", "2", "--batch", "4", "--new-tokens", "8",
                     "--window", "32", "--json", str(tmp_path / "rows.jsonl")]) == 0
    assert calls == [["--preset", "100m", "--window", "32", "--loops", "1", "2", "--batch", "4", "--tokens", "8",
                      "--threads", "1", "--out", str(tmp_path / "rows.jsonl")]]
    assert cli_main(["bench", "--engine", "vllm", "--sweep", "--sweep-loops", "2", "3", "--sweep-batches", "1", "16",
                     "--threads", "2"]) == 0
    assert calls[1][calls[1].index("--loops") + 1:calls[1].index("--batch")] == ["2", "3"]
    assert calls[1][calls[1].index("--batch") + 1:calls[1].index("--tokens")] == ["1", "16"]
    assert calls[1][calls[1].index("--threads") + 1] == "2"
    for wrong, named in ((["--modes", "parallel"], "--modes"), (["--dtype", "bfloat16"], "--dtype"),
                         (["--hidden", "256"], "--hidden "), (["--preset", "tiny"], "at least 32")):
        assert cli_main(["bench", "--engine", "vllm", *wrong]) == 2
        assert named in capsys.readouterr().err
    assert len(calls) == 2
    monkeypatch.setitem(sys.modules, "parloop.vllm.bench", None)  # importing it now fails, as without vLLM
    assert cli_main(["bench", "--engine", "vllm"]) == 2 and "pip install -e '.[vllm]'" in capsys.readouterr().err


def test_tensor_parallel_gives_the_same_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # two ranks, each with one query head, one KV head and half of every gate; one core per rank
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    vllm_envs.disable_envs_cache()  # an engine started earlier in this process froze vLLM's view of the environment
    model = make_checkpoint(tmp_path, plt_num_loops=2, plt_window_size=[2, 0], plt_gate_use_hidden_states=True,
                            plt_normalize_per_loop=True, num_key_value_heads=2)
    llm = LLM(str(tmp_path), **ENGINE, tensor_parallel_size=2, distributed_executor_backend="mp")
    try:
        token_prompts = prompts([7, 19], seed=8)
        outputs = run(llm, token_prompts, SamplingParams(temperature=0, max_tokens=8, logprobs=0, detokenize=False))
    finally:
        shut_down(llm)
    for prompt, out in zip(token_prompts, outputs, strict=True):
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert list(out.outputs[0].token_ids) == expected[0, len(prompt):].tolist()
        assert_matches_parloop(model, prompt, out.outputs[0])


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, so that text decodes back exactly."""
    chars = [chr(c) for c in range(32, 127)][:SHAPE["vocab_size"] - 2]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_answers_openai_client(tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    model = make_checkpoint(tmp_path, plt_num_loops=2, plt_window_size=[2, 0], eos_token_id=1)
    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    port = free_port()
    log = tmp_path / "server.log"  # a file, not a pipe: a full pipe would stall the server's logging
    # the `vllm` command of the environment the tests run in (scripts/setup.sh makes it work with vllm-cpu)
    vllm_command = Path(sys.executable).with_name("vllm")
    assert vllm_command.is_file(), f"no `vllm` command next to {sys.executable}: install the vllm extra"
    server = subprocess.Popen([str(vllm_command), "serve", str(tmp_path), "--port", str(port), "--host", "127.0.0.1",
                               "--dtype", "float32", "--enforce-eager", "--max-model-len", "128",
                               "--served-model-name", "plt"],
                              stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "vllm serve did not start in time"
                time.sleep(1)
        answer = client.completions.create(model="plt", prompt="def add(a, b):", max_tokens=8, temperature=0)
    finally:
        server.terminate()
        server.wait(timeout=60)
    ids = tokenizer("def add(a, b):")["input_ids"]
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert answer.choices[0].text == tokenizer.decode(expected[0, len(ids):], skip_special_tokens=True)

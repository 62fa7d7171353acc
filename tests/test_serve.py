"""The OpenAI-compatible server, `parloop generate` and the text layer, against a tiny checkpoint and a tiny
byte-level BPE tokenizer built here; servers listen on loopback ports only."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import uvicorn
from conftest import tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import parloop  # noqa: F401  (registers the model type with the Auto classes)
from parloop.inference import generate, loading
from parloop.inference.engine import Engine
from parloop.inference.guard import AccessPolicy
from parloop.inference.server import create_app, uvicorn_config
from parloop.inference.text import TextStream

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Parallel loop transformers run every loop of a token in one pass.",
    "Café, naïve, façade; 東京 and 北京; emoji 🙂 too.",
    "for i in range(10):\n    print(i * i)\n",
    "A sliding window keeps the last few keys of each loop.",
]
MAX_PROMPT_TOKENS = 48


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # models this small run far faster on one thread; a thread pool only adds wake-up latency per op
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(SENTENCES * 20, trainer)  # a few KB of text
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two directories with the same weights: "tiny-chat" (tokenizer with a chat template) and "tiny" (without)."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, template in (("tiny-chat", CHAT_TEMPLATE), ("tiny", None)):
        tokenizer = build_tokenizer(template)
        # a long context, so that a request can run for seconds (disconnect tests)
        model = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=4096, plt_window_size=[2, 0])
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    return dirs


class Reference:
    """`model.generate` on a separate copy of the checkpoint (the server's copy lives on its engine thread)."""

    def __init__(self, model_dir: Path) -> None:
        self.model, self.tokenizer = loading.load_model(model_dir, "cpu")

    def greedy_ids(self, ids: list[int], max_tokens: int) -> list[int]:
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
        return out[0, len(ids):].tolist()

    def greedy(self, prompt: str, max_tokens: int) -> tuple[list[int], str]:
        new = self.greedy_ids(self.tokenizer(prompt)["input_ids"], max_tokens)
        return new, self.tokenizer.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def ref(model_dirs: dict[str, Path]) -> Reference:
    return Reference(model_dirs["tiny-chat"])


class ThreadServer:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self, model_dir: Path, name: str, policy: AccessPolicy | None = None,
                 tokenizer: Any = None, **limits: int) -> None:
        model, own_tokenizer = loading.load_model(model_dir, "cpu")
        self.engine = Engine(model, **limits)
        app = create_app(self.engine, tokenizer or own_tokenizer, name, policy)
        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", 0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        key = "unused" if policy is None or policy.api_key is None else policy.api_key
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(model_dirs: dict[str, Path]) -> Iterator[ThreadServer]:
    srv = ThreadServer(model_dirs["tiny-chat"], "tiny-chat", max_batch_size=8, max_prompt_tokens=MAX_PROMPT_TOKENS)
    yield srv
    srv.close()


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(m) for m in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


# -- completions --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["The quick brown", "Café, naïve, 東", "def add("])
def test_completion_plain_and_streamed_equal_generate(server: ThreadServer, ref: Reference, prompt: str) -> None:
    new, text = ref.greedy(prompt, 12)
    prompt_tokens = len(ref.tokenizer(prompt)["input_ids"])
    out = server.client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == text
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, len(new))

    chunks = list(server.client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=12, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == len(new) and chunks[-1].usage.prompt_tokens == prompt_tokens


def test_several_prompts_in_one_request(server: ThreadServer, ref: Reference) -> None:
    prompts = ["A sliding window", "for i in"]
    expected = [ref.greedy(p, 6)[1] for p in prompts]
    token_lists = [ref.tokenizer(p)["input_ids"] for p in prompts]
    for prompt in (prompts, token_lists):
        out = server.client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=6, temperature=0)
        assert [c.index for c in out.choices] == [0, 1]
        assert [c.text for c in out.choices] == expected
        assert out.usage.completion_tokens == 12
        assert out.usage.prompt_tokens == sum(len(ids) for ids in token_lists)


def test_seed_n_and_stop(server: ThreadServer, ref: Reference) -> None:
    kwargs = dict(model="tiny-chat", prompt="The lazy", max_tokens=10, temperature=1.0, top_p=0.95, n=3, seed=7)
    first = server.client.completions.create(**kwargs)
    again = server.client.completions.create(**kwargs)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices]
    assert len(set(texts)) > 1  # choice i samples with seed + i
    assert first.usage.completion_tokens == 30
    assert first.usage.prompt_tokens == len(ref.tokenizer("The lazy")["input_ids"])

    _, full = ref.greedy("The quick", 24)
    stop = full[8:11]
    expected = full[:full.index(stop)]
    out = server.client.completions.create(model="tiny-chat", prompt="The quick", max_tokens=24, temperature=0,
                                           stop=[stop, "never appears"])
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    chunks = list(server.client.completions.create(model="tiny-chat", prompt="The quick", max_tokens=24,
                                                   temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


# -- chat -----------------------------------------------------------------------------------------------------------
def test_chat_uses_the_template(server: ThreadServer, ref: Reference) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello fox"}]
    ids = ref.tokenizer("<|system|>Be brief.\n<|user|>Hello fox\n<|assistant|>", add_special_tokens=False)["input_ids"]
    expected = ref.tokenizer.decode(ref.greedy_ids(ids, 10), skip_special_tokens=True)
    out = server.client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 10

    chunks = list(server.client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10,
                                                        temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_without_template_is_400(model_dirs: dict[str, Path], ref: Reference) -> None:
    plain = ThreadServer(model_dirs["tiny"], "tiny", max_batch_size=2)
    try:
        with pytest.raises(openai.BadRequestError) as err:
            plain.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 400 and "chat template" in err.value.message
        out = plain.client.completions.create(model="tiny", prompt="The quick", max_tokens=5, temperature=0)
        assert out.choices[0].text == ref.greedy("The quick", 5)[1]
    finally:
        plain.close()


# -- bad input ------------------------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": ', 400, "malformed JSON"),
    ("/v1/completions", {"model": "tiny-chat"}, 400, "prompt: field required"),
    ("/v1/completions", {"prompt": "hi"}, 400, "model: field required"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "hi", "n": 9}, 400, "max-batch-size"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "The quick brown fox " * 20}, 400, "max-prompt-tokens"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "hi", "max_tokens": 5000}, 400, "max-model-len"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": [5, 100000]}, 400, "token ids"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": {"text": "hi"}}, 400, "prompt: must be a string"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "'gpt-4' does not exist"),
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": [{"content": "hi"}]}, 400, "messages"),
]


def test_bad_requests_get_a_4xx_naming_the_problem(server: ThreadServer) -> None:
    good = {"model": "tiny-chat", "prompt": "The quick", "max_tokens": 3, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path, body, status, needle in BAD_REQUESTS:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = http.post(path, content=content, headers={"content-type": "application/json"})
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert needle in error["message"], (body, error)
            assert error["type"] == "invalid_request_error"
            # and the server goes on serving
            after = http.post("/v1/completions", json=good)
            assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3
    assert metric(server.url, "parloop_batch_size") == 0


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_and_frees_the_row(server: ThreadServer, stream: bool) -> None:
    cancelled = metric(server.url, 'parloop_sequences_finished_total{reason="cancelled"}')
    generated = metric(server.url, "parloop_generation_tokens_total")
    # 4000 tokens take seconds: the request is still running when the client goes away
    body = {"model": "tiny-chat", "prompt": "The quick", "max_tokens": 4000, "temperature": 0, "stream": stream}
    if stream:
        with httpx.Client(base_url=server.url, timeout=30) as http, http.stream("POST", "/v1/completions",
                                                                               json=body) as response:
            assert next(response.iter_lines()).startswith("data: ")
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 20
    while metric(server.url, 'parloop_sequences_finished_total{reason="cancelled"}') == cancelled:
        assert time.monotonic() < deadline, "the disconnected request was never cancelled"
        time.sleep(0.05)
    assert metric(server.url, "parloop_batch_size") == 0
    assert metric(server.url, "parloop_kv_cache_bytes") == 0
    assert metric(server.url, "parloop_generation_tokens_total") - generated < 4000


def test_models_health_and_metrics(server: ThreadServer) -> None:
    assert [m.id for m in server.client.models.list()] == ["tiny-chat"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    before = metric(server.url, "parloop_generation_tokens_total")
    server.client.completions.create(model="tiny-chat", prompt="The quick", max_tokens=4, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("parloop_requests_total", "parloop_prompt_tokens_total", "parloop_queue_length",
                 "parloop_batch_size", "parloop_kv_cache_bytes", "parloop_time_to_first_token_seconds_count"):
        assert re.search(rf"^{name}", text, re.M), name
    assert 'parloop_requests_total{endpoint="completions",status="200"}' in text
    assert metric(server.url, "parloop_generation_tokens_total") == before + 4


# -- load -----------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_server(model_dir: Path, max_batch_size: int, *extra: str, env: dict[str, str] | None = None,
                 log_path: Path | None = None, headers: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`parloop serve` in its own process (its own interpreter lock, as in real use); its log goes to `log_path`
    when given (a pipe nobody reads would fill up and block the server)."""
    port = free_port()
    code = ("import argparse, sys; from parloop.inference import server; "
            "p = argparse.ArgumentParser(); server.add_arguments(p); sys.exit(server.run(p.parse_args(sys.argv[1:])))")
    stderr = subprocess.PIPE if log_path is None else log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-c", code, "--model", str(model_dir), "--port", str(port),
                             "--max-batch-size", str(max_batch_size), "--log-level", "warning", *extra],
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, stderr=stderr,
                            stdout=None if log_path is None else stderr, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise AssertionError("parloop serve exited: "
                                 f"{proc.stderr.read() if log_path is None else log_path.read_text()}")
        assert time.monotonic() < deadline, "parloop serve did not come up in 120 s"
        try:
            if httpx.get(f"{url}/health", timeout=1, headers=headers).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


async def stream_clients(url: str, prompts: list[str], max_tokens: int) -> tuple[list[str], list[float], float]:
    """All prompts at once, each a streaming client; returns texts, times to first token, and wall time."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(prompt: str) -> tuple[str, float]:
        start = time.perf_counter()
        first = None
        text, usage = "", None
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices:
                first = first or time.perf_counter()
                text += chunk.choices[0].text
            if chunk.usage is not None:
                usage = chunk.usage
        assert usage is not None and usage.completion_tokens == max_tokens
        return text, first - start

    start = time.perf_counter()
    results = await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), timeout=240)
    wall = time.perf_counter() - start
    await client.close()
    return [t for t, _ in results], [f for _, f in results], wall


def test_load_32_streaming_clients_batched_and_unbatched(model_dirs: dict[str, Path],
                                                         capsys: pytest.CaptureFixture) -> None:
    clients, max_tokens = 32, 16
    prompts = [f"{SENTENCES[i % len(SENTENCES)][:10 + i]}" for i in range(clients)]
    outputs = {}
    with ThreadPoolExecutor(2) as pool:  # both start together: an idle server takes no time from the other's run
        servers = dict(zip((32, 1), pool.map(lambda b: spawn_server(model_dirs["tiny"], b), (32, 1)), strict=True))
    for max_batch, (proc, url) in servers.items():
        try:
            texts, ttfts, wall = asyncio.run(stream_clients(url, prompts, max_tokens))
        finally:
            proc.terminate()
            proc.wait(30)
        outputs[max_batch] = texts
        ttft_ms = sorted(1000 * t for t in ttfts)
        p99 = ttft_ms[min(len(ttft_ms) - 1, round(0.99 * (len(ttft_ms) - 1)))]
        with capsys.disabled():  # the numbers are the point of this test: show them in every run
            print(f"\n[load] max batch {max_batch:2d}: {clients} streaming clients x {max_tokens} tokens in "
                  f"{wall:.2f} s = {clients * max_tokens / wall:.0f} tokens/s; time to first token p50 "
                  f"{statistics.median(ttft_ms):.0f} ms, p99 {p99:.0f} ms")
    # greedy decoding: batching must not change a single token
    assert outputs[32] == outputs[1]


# -- parloop generate and the text layer ------------------------------------------------------------------------------
def run_generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return generate.run(parser.parse_args(argv))


def test_generate_streams_and_reports(model_dirs: dict[str, Path], ref: Reference, tmp_path: Path,
                                      capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    _, expected = ref.greedy("def add(", 10)
    common = ["--model", str(model_dirs["tiny"]), "--device", "cpu", "--max-tokens", "10", "--temperature", "0"]
    assert run_generate(["def add(", *common]) == 0
    out = capsys.readouterr()
    assert out.out == expected + "\n"
    assert re.search(r"time to first token \d+\.\d ms \| \d+\.\d tokens/s \| finish: length", out.err)

    (tmp_path / "prompt.txt").write_text("def add(")
    run_generate(["--file", str(tmp_path / "prompt.txt"), *common])
    assert capsys.readouterr().out == expected + "\n"

    monkeypatch.setattr(sys, "stdin", io.StringIO("def add("))
    run_generate([*common, "--stop", expected[4:6]])
    assert capsys.readouterr().out == expected[:expected.index(expected[4:6])] + "\n"


def test_generate_errors_are_clear(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="chat template"):
        run_generate(["hi", "--chat", "--model", str(model_dirs["tiny"])])
    with pytest.raises(SystemExit, match="max_tokens must be >= 1"):
        run_generate(["hi", "--max-tokens", "0", "--model", str(model_dirs["tiny"])])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        run_generate(["hi", "--model", str(tmp_path)])


def test_text_stream_releases_whole_characters_and_hides_stop_strings(ref: Reference) -> None:
    tokenizer = ref.tokenizer
    text = "Café 🙂 東京 and more"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > 8
    stream = TextStream(tokenizer)
    pieces = [stream.push(t) for t in ids] + [stream.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)

    stream = TextStream(tokenizer, stop=["東京", "zzz"])
    pieces = []
    for t in ids:
        pieces.append(stream.push(t))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    assert stream.stopped and "".join(pieces) == "Café 🙂 "
    assert all("東" not in p for p in pieces)  # the start of a stop string is held back until it is decided

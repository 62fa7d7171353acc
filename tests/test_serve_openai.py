"""What real OpenAI clients rely on, checked against a server on loopback: log-probabilities and echo (so that
lm-evaluation-harness scores tasks), penalties, logit bias and top-k, unsupported parameters named in a 400,
model routes, OpenAI-shaped errors, access policy, and greedy output equal to `model.generate` for every loop
layout."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import lm_eval
import openai
import pytest
import torch
from conftest import tiny_model
from lm_eval.tasks import TaskManager
from test_serve import CHAT_TEMPLATE, Reference, ThreadServer, build_tokenizer, metric

from parloop.inference.guard import AccessPolicy
from parloop.inference.text import StopMatcher, tokens_per_second

PROMPT = "The quick brown"


def save_model(root: Path, name: str, **overrides: Any) -> Path:
    tokenizer = build_tokenizer(CHAT_TEMPLATE)
    model = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=512, **overrides)
    model.save_pretrained(root / name)
    tokenizer.save_pretrained(root / name)
    return root / name


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("openai"), "tiny", plt_window_size=[2, 0])


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> Reference:
    return Reference(model_dir)


class FragileTokenizer:
    """The real tokenizer, except that a prompt containing BOOM makes it raise (a bug the server cannot foresee)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __call__(self, text: str, **kwargs: Any) -> Any:
        if "BOOM" in text:
            raise RuntimeError("tokenizer bug")
        return self._tokenizer(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


@pytest.fixture(scope="module")
def server(model_dir: Path, ref: Reference) -> Iterator[ThreadServer]:
    srv = ThreadServer(model_dir, "tiny", tokenizer=FragileTokenizer(ref.tokenizer), max_batch_size=8)
    yield srv
    srv.close()


def token_text(tokenizer: Any, token: int) -> str:
    """How the server names a token: its text, or its vocabulary entry when it is part of a character."""
    text = tokenizer.decode([token])
    return tokenizer.convert_ids_to_tokens(token) if "\ufffd" in text else text


def model_logprobs(ref: Reference, ids: list[int]) -> torch.Tensor:
    """log p(ids[j] | ids[:j]) for j >= 1, straight from the model."""
    with torch.no_grad():
        logits = ref.model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


# -- log-probabilities -------------------------------------------------------------------------------------------
def test_completion_logprobs_are_the_models_own(server: ThreadServer, ref: Reference) -> None:
    prompt_ids = ref.tokenizer(PROMPT)["input_ids"]
    new, text = ref.greedy(PROMPT, 6)
    out = server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == text
    assert lp.tokens == [token_text(ref.tokenizer, t) for t in new]
    expected = model_logprobs(ref, prompt_ids + new)[-len(new):]
    assert torch.allclose(torch.tensor(lp.token_logprobs), expected, atol=1e-4)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(chosen, abs=1e-6)  # greedy: the best one
    chunks = list(server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                                   logprobs=3, stream=True))
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_scores_the_prompt(server: ThreadServer, ref: Reference, max_tokens: int) -> None:
    ids = ref.tokenizer("def add(a, b):\n    return")["input_ids"]
    out = server.client.completions.create(model="tiny", prompt=ids, max_tokens=max_tokens, temperature=0,
                                           logprobs=1, echo=True)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.token_logprobs) == len(ids) + max_tokens
    every = model_logprobs(ref, ids + ref.greedy_ids(ids, 1))
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), every[:len(ids) - 1 + max_tokens], atol=1e-4)
    assert out.choices[0].text.startswith(ref.tokenizer.decode(ids))
    assert out.usage.completion_tokens == max_tokens


def test_chat_logprobs(server: ThreadServer, ref: Reference) -> None:
    messages = [{"role": "user", "content": "Hello fox"}]
    out = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                                logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    ids = ref.tokenizer("<|user|>Hello fox\n<|assistant|>", add_special_tokens=False)["input_ids"]
    new = ref.greedy_ids(ids, 5)
    assert [c.token for c in content] == [token_text(ref.tokenizer, t) for t in new]
    assert torch.allclose(torch.tensor([c.logprob for c in content]), model_logprobs(ref, ids + new)[-5:], atol=1e-4)
    assert all(len(c.top_logprobs) == 2 for c in content)
    plain = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


# -- penalties, logit bias, top-k --------------------------------------------------------------------------------
def penalised_greedy(ref: Reference, ids: list[int], steps: int, presence: float, frequency: float) -> list[int]:
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = ref.model(torch.tensor([ids + out])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
        out.append(int((logits - counts * frequency - (counts > 0).float() * presence).argmax()))
    return out


def test_penalties_logit_bias_and_top_k_take_effect(server: ThreadServer, ref: Reference) -> None:
    ids = ref.tokenizer(PROMPT)["input_ids"]
    expected = penalised_greedy(ref, ids, 12, presence=1.5, frequency=2.0)
    assert expected != ref.greedy_ids(ids, 12)  # the penalties matter for this prompt
    out = server.client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0,
                                           presence_penalty=1.5, frequency_penalty=2.0, logprobs=0)
    assert out.choices[0].text == ref.tokenizer.decode(expected, skip_special_tokens=True)

    favourite = ref.tokenizer(" fox")["input_ids"][-1]
    out = server.client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0.7, seed=3,
                                           logit_bias={str(favourite): 100})
    assert out.choices[0].text == ref.tokenizer.decode([favourite] * 5)

    greedy = ref.tokenizer.decode(ref.greedy_ids(ids, 8), skip_special_tokens=True)
    out = server.client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=1.5, seed=1,
                                           extra_body={"top_k": 1})
    assert out.choices[0].text == greedy


UNSUPPORTED = [
    ("/v1/completions", {"best_of": 2}, "best_of"),
    ("/v1/completions", {"suffix": "return x"}, "suffix"),
    ("/v1/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/completions", {"frobnicate": True}, "frobnicate"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
     "messages.0.tool_calls"),
    ("/v1/completions", {"logit_bias": {"99999": 5}}, "logit_bias"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
]


@pytest.mark.parametrize(("path", "extra", "param"), UNSUPPORTED)
def test_unsupported_parameters_are_a_400_naming_them(server: ThreadServer, path: str, extra: dict,
                                                      param: str) -> None:
    base = ({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    response = httpx.post(f"{server.url}{path}", json={"model": "tiny", **base, **extra}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]


# -- routes and errors -------------------------------------------------------------------------------------------
def test_model_routes_and_openai_shaped_errors(server: ThreadServer) -> None:
    assert server.client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as err:
        server.client.models.retrieve("gpt-4")
    assert err.value.body["code"] == "model_not_found"
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405),
                                 ("DELETE", "/v1/models", 405)):
        response = httpx.request(method, f"{server.url}{path}", timeout=10)
        assert response.status_code == status
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and path in error["message"]
    assert httpx.get(f"{server.url}/v1/completions").headers["allow"] == "POST"


def test_500s_are_openai_shaped_and_counted(server: ThreadServer) -> None:
    before = metric(server.url, 'parloop_requests_total{endpoint="completions",status="500"}')
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "BOOM"}, timeout=30)
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert metric(server.url, 'parloop_requests_total{endpoint="completions",status="500"}') == before + 1
    assert server.client.completions.create(model="tiny", prompt="ok", max_tokens=2).usage.completion_tokens == 2


def test_api_key_and_cors_when_configured(model_dir: Path) -> None:
    policy = AccessPolicy(api_key="k3y", allowed_origins=("http://ok.example",))
    srv = ThreadServer(model_dir, "tiny", policy=policy, max_batch_size=2)
    try:
        assert srv.client.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0).models.list()
        preflight = httpx.options(f"{srv.url}/v1/completions", headers={
            "Origin": "http://ok.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://ok.example"
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
        for origin, status in (("http://ok.example", 200), ("http://evil.example", 403)):
            response = httpx.post(f"{srv.url}/v1/completions", json=body,
                                  headers={"Origin": origin, "Authorization": "Bearer k3y"})
            assert response.status_code == status
    finally:
        srv.close()


# -- operations --------------------------------------------------------------------------------------------------
def test_tokens_per_second_counts_engine_time() -> None:
    # two choices: first tokens at t=1.0 and 1.1, last tokens at 2.0 and 3.0, 11 tokens each
    seqs = [SimpleNamespace(output_ids=[0] * 11, first_token_at=1.0, last_token_at=2.0),
            SimpleNamespace(output_ids=[0] * 11, first_token_at=1.1, last_token_at=3.0)]
    assert tokens_per_second(seqs, started_at=0.5) == pytest.approx(20 / 2.0)
    one = [SimpleNamespace(output_ids=[7], first_token_at=1.0, last_token_at=1.0)]
    assert tokens_per_second(one, started_at=0.75) == pytest.approx(1 / 0.25)


def test_stop_matcher_finds_what_find_finds() -> None:
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        matcher, found, fed = StopMatcher(stops), None, 0
        while found is None and fed < len(text):
            size = rng.randint(1, 4)
            found = matcher.feed(text[fed:fed + size])
            fed += size
        # the first stop string to be completed, by where it ends, then where it starts
        ends = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
        assert found == (min(ends)[1] if ends else None), (text, stops)


# -- greedy through the server equals model.generate, for every loop layout --------------------------------------
@pytest.mark.parametrize(("mode", "loops"), [("parallel", 1), ("parallel", 2), ("parallel", 3),
                                             ("sequential_shared", 2), ("sequential", 3)])
def test_greedy_through_the_server_equals_generate(tmp_path: Path, mode: str, loops: int) -> None:
    directory = save_model(tmp_path, mode, plt_loop_mode=mode, plt_num_loops=loops, plt_window_size=[2, 0])
    ref = Reference(directory)
    prompts = ["The quick brown", "def add(a, b):", "A sliding window keeps the last"]
    expected = [ref.greedy(p, 14)[1] for p in prompts]
    srv = ThreadServer(directory, "tiny", max_batch_size=4)
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent: they decode in one batch
            outs = list(pool.map(lambda p: srv.client.completions.create(
                model="tiny", prompt=p, max_tokens=14, temperature=0).choices[0].text, prompts))
    finally:
        srv.close()
    assert outs == expected


# -- lm-evaluation-harness ---------------------------------------------------------------------------------------
LL_TASK = """task: parloop_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
GEN_TASK = """task: parloop_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def write_tasks(root: Path) -> None:
    # choices follow the context after lm-eval's default delimiter, a space
    docs = [{"context": "The quick brown", "choices": ["fox jumps", "dog sleeps"], "label": 0, "target": " fox"},
            {"context": "def add(a, b):", "choices": ["return a + b", "pass"], "label": 0, "target": "\n"},
            {"context": "Parallel loop", "choices": ["transformers", "windows", "keys"], "label": 0,
             "target": " transformers"}]
    for name, template in (("ll", LL_TASK), ("gen", GEN_TASK)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (root / f"{name}.yaml").write_text(template.format(data=data))


def test_lm_eval_local_completions(server: ThreadServer, ref: Reference, model_dir: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tasks(tmp_path)
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model="local-completions", tasks=["parloop_ll", "parloop_gen"], log_samples=True,
        model_args=f"base_url={server.url}/v1/completions,model=tiny,tokenizer={model_dir},"
                   "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1",
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    assert time.perf_counter() - start < 120
    checked = 0
    for sample in results["samples"]["parloop_ll"]:
        for (context, continuation), resps in zip(sample["arguments"], sample["resps"], strict=True):
            # as lm-eval encodes a pair: trailing spaces of the context belong to the continuation
            stripped = context.rstrip()
            ids = ref.tokenizer(context + continuation)["input_ids"]
            n_context = len(ref.tokenizer(stripped)["input_ids"])
            expected = float(model_logprobs(ref, ids)[n_context - 1:].sum())
            assert resps[0][0] == pytest.approx(expected, abs=1e-4)
            checked += 1
    assert checked == 7
    for sample in results["samples"]["parloop_gen"]:
        expected = ref.greedy(sample["arguments"][0][0], 8)[1].split("\n")[0]
        assert sample["resps"][0][0] == expected

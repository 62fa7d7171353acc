"""The CUDA decode path: the layer stack compiled with `mode="reduce-overhead"` and replayed from CUDA graphs over a
static cache (`parloop.compile.CompiledStep`). Cached equals full forward in fp32, bf16 and fp16, greedy tokens equal
eager ones in fp32, and decode steps really replay graphs. Runs only where torch sees a CUDA GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_model import left_padded_batch, prefill_then_decode
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

from parloop import PLTCache

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"no CUDA GPU visible to torch {torch.__version__}: the CUDA-graph decode path is checked on a GPU "
           "machine only (the CPU half of these checks is tests/test_compile.py)")

DEVICE = "cuda"


def compiled_model(dtype: torch.dtype, **overrides) -> torch.nn.Module:
    model = tiny_model(**overrides).to(device=DEVICE, dtype=dtype)
    model.compile_decode()
    return model


def batch(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = left_padded_batch([12, 7, 9], model.config.vocab_size)
    return ids.to(DEVICE), mask.to(DEVICE)


def cached_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        cache = PLTCache(model.config, max_length=ids.shape[1], static=True)
        return prefill_then_decode(model, ids, mask, cache, prompt=4).float()


@pytest.mark.parametrize(("mode", "loops"), [("parallel", 3), ("sequential_shared", 2), ("sequential", 2)])
def test_fp32_graphed_decoding_equals_full_forward(mode: str, loops: int) -> None:
    model = compiled_model(torch.float32, plt_loop_mode=mode, plt_num_loops=loops)
    ids, mask = batch(model)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
    # the CPU tests' tolerance: fp32 differs only by summation order
    assert (cached_logits(model, ids, mask) - full)[mask.bool()].abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("mode", "loops"), [("parallel", 3), ("sequential_shared", 2)])
def test_low_precision_graphed_decoding_is_as_exact_as_the_full_forward(dtype: torch.dtype, mode: str,
                                                                        loops: int) -> None:
    exact_model = tiny_model(plt_loop_mode=mode, plt_num_loops=loops).to(DEVICE)
    model = compiled_model(dtype, plt_loop_mode=mode, plt_num_loops=loops)
    ids, mask = batch(model)
    real = mask.bool()
    with torch.no_grad():
        exact = exact_model(ids, attention_mask=mask).logits
        full = model(ids, attention_mask=mask).logits.float()
    # Tolerance: how far rounding to `dtype` moves the full forward from the fp32 logits. The cached steps round at
    # other points (one token at a time, other kernels), so their error is of the same size, not the same values;
    # 3x leaves room for that. A wrong cache entry moves logits by O(1), far more (checked: rounding error is small).
    rounding = (full - exact)[real].abs().max()
    assert rounding < 0.1 * exact[real].std()
    assert (cached_logits(model, ids, mask) - exact)[real].abs().max() <= 3 * rounding


@pytest.mark.parametrize(("mode", "loops"), [("parallel", 4), ("sequential_shared", 2)])
def test_fp32_greedy_tokens_equal_eager(mode: str, loops: int) -> None:
    model = tiny_model(plt_loop_mode=mode, plt_num_loops=loops).to(DEVICE)
    ids, mask = batch(model)
    with torch.no_grad():
        eager = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
        model.compile_decode()
        graphed = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                                 cache_implementation="static")
    assert torch.equal(eager, graphed)


def test_decode_steps_replay_cuda_graphs() -> None:
    model = compiled_model(torch.bfloat16, plt_num_loops=3)
    ids, mask = batch(model)
    skips = counters["inductor"]["cudagraph_skips"]
    cache = PLTCache(model.config, max_length=ids.shape[1] + 8, static=True)
    with torch.no_grad():
        token = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        for _ in range(4):  # compile, warm up, record, replay
            token = model(token, past_key_values=cache, use_cache=True).logits.argmax(-1)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(token, past_key_values=cache, use_cache=True)
            torch.cuda.synchronize()
    names = [event.name for event in prof.events()]
    assert counters["inductor"]["cudagraph_skips"] == skips, "Inductor fell back from CUDA graphs"
    assert "cudaGraphLaunch" in names

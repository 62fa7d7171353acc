"""Weight-only quantization (parloop/quant.py, parloop/quant_checkpoint.py): the kernels compute what the
quantized weights say, a saved quantized checkpoint loads to the model that quantizing on load gives, every loop
mode decodes from its cache as from the full forward, and what cannot work is refused."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from test_model import MODES, left_padded_batch, prefill_then_decode
from transformers import AutoModelForCausalLM

from parloop import CheckpointError, PLTCache, cpu_kernels
from parloop.bench.options import BenchOptions
from parloop.bench.preset7b import DONE_FILE, RELEASED_7B, checkpoint_for
from parloop.bench.run7b import format_7b_table, run_7b
from parloop.cli import main
from parloop.config import ConfigError
from parloop.quant import KERNEL_ROWS, VERSIONS, QuantizationError, QuantLinear, quantization_config, quantize_model
from parloop.quant_checkpoint import quantize_checkpoint
from parloop.threads import set_threads

# int4 needs inputs divisible by the group (a multiple of 64): hidden 64, intermediate 128
SHAPE = dict(hidden_size=64, intermediate_size=128, vocab_size=64)
GROUP = 64
BF16_EPS = 2.0**-8  # relative rounding of a bf16 result


def float_checkpoint(directory: Path, **overrides: object) -> Path:
    tiny_model(**SHAPE, **overrides).save_pretrained(directory)
    return directory


def dequantized(module: QuantLinear) -> torch.Tensor:
    """The float weight `[N, K]` that a QuantLinear multiplies by, recovered through the layer itself (an
    identity input: K rows, the prefill path)."""
    eye = torch.eye(module.in_features, dtype=torch.bfloat16)
    return module(eye).float().t()


def stored_weight(module: QuantLinear) -> torch.Tensor:
    """The float weight the stored codes stand for, unpacked here independently of parloop.quant."""
    if module.weights == "int8":
        return module.weight.float() * module.weight_scale.float()[:, None]
    codes = torch.empty(module.out_features, module.in_features)
    groups, byte = module.in_features // GROUP, 0
    for first in range(0, groups, 16):  # runs of 16 groups, one per 32-bit lane of each block (docs/cpu.md)
        for t in range(GROUP // 8):
            for g in range(first, min(first + 16, groups)):
                for i in range(4):
                    codes[:, g * GROUP + 8 * t + i] = (module.weight[:, byte] & 0x0F).float()
                    codes[:, g * GROUP + 8 * t + 4 + i] = (module.weight[:, byte] >> 4).float()
                    byte += 1
    step = module.weight_scale.float().repeat_interleave(GROUP, 1)
    zero = module.weight_zero.float().repeat_interleave(GROUP, 1)
    return (codes - 8) * step + zero


@pytest.fixture(params=["parloop", "stock"])
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on parloop's CPU kernels and again on PyTorch's (what a CPU without AVX512-BF16 uses)."""
    if request.param == "parloop":
        if not cpu_kernels.cpu_supported():
            pytest.skip("this CPU has no AVX512-BF16: parloop's kernels do not run here")
        assert cpu_kernels.kernels() is not None, "the CPU kernels failed to build (see the warning)"
    else:
        monkeypatch.setenv(cpu_kernels.SWITCH, "0")
    return request.param


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_kernel_computes_the_quantized_weight_for_any_row_count(weights: str, kernel_path: str) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(GROUP * 18, 48, bias=False)  # int4: a run of 16 groups and a run of 2
    module = QuantLinear.from_linear(linear, quantization_config(weights, GROUP))
    expected = stored_weight(module)
    assert torch.allclose(dequantized(module), expected, rtol=2 * BF16_EPS, atol=1e-6)
    # the codes decode to the float weight within one step: a layout mix-up (nibble or group order) would not
    assert (expected - linear.weight).abs().max() < module.weight_scale.float().max()
    for rows in (1, 2, 3, 5, 8, 17, 200):  # one row, the stacked decode's R rows, a short and a long prompt
        x = torch.randn(rows, GROUP * 18).to(torch.bfloat16)
        reference = x.float() @ expected.t()
        # the kernels multiply exact products and round the result to bf16 once: at most 2^-8 of sum |x| |w|
        # apart from the float32 product (plus float32 summation order); parloop's int8 kernel first rounds each x
        # to 16 bits of its lane class's largest, which moves each product by under 2^-16 of that, far inside;
        # its int4 kernel rounds each x to 8 bits of its group's largest: each x moves by at most 1/254 of that
        scale = x.float().abs() @ expected.abs().t()
        rounding = torch.zeros(())
        if weights == "int4" and kernel_path == "parloop" and rows <= KERNEL_ROWS:
            top = x.float().abs().view(rows, -1, GROUP).amax(-1).repeat_interleave(GROUP, 1)
            rounding = (top / 254) @ expected.abs().t()
        assert ((module(x).float() - reference).abs() <= BF16_EPS * scale + rounding + 1e-4).all(), rows


def test_gradients_reach_the_input_of_a_quantized_layer(kernel_path: str) -> None:
    # the kernels have no backward: a call that wants gradients must take the differentiable path, not drop them
    module = QuantLinear.from_linear(torch.nn.Linear(128, 16), quantization_config("int4", GROUP))
    x = torch.randn(2, 128).to(torch.bfloat16).requires_grad_()
    module(x).float().sum().backward()
    expected = stored_weight(module).sum(0).expand(2, -1)
    assert x.grad is not None and torch.allclose(x.grad.float(), expected, rtol=0.02, atol=0.02)


def test_int8_takes_float32_activations(kernel_path: str) -> None:
    torch.manual_seed(2)
    module = QuantLinear.from_linear(torch.nn.Linear(96, 40), quantization_config("int8")).float()
    assert module.weight_scale.dtype == torch.bfloat16 and module.weight.dtype == torch.int8  # kept by .float()
    for rows in (1, 4, 12):
        x = torch.randn(rows, 96)
        out = module(x)
        assert out.dtype == torch.float32
        assert torch.allclose(out, x @ stored_weight(module).t() + module.bias, rtol=1e-5, atol=1e-5)


def test_int8_error_per_product_is_within_half_a_step() -> None:
    # Rounding moves each weight by at most half its channel's step s[n] = max|w[n]| / 127, so an output moves by
    # at most s[n] / 2 * sum|x| (then the bf16 rounding of the result): the bound that int8 weights promise.
    torch.manual_seed(1)
    linear = torch.nn.Linear(256, 64, bias=False)
    module = QuantLinear.from_linear(linear, quantization_config("int8"))
    x = torch.randn(4, 256).to(torch.bfloat16)
    exact = x.float() @ linear.weight.detach().t()
    bound = module.weight_scale.float() / 2 * x.float().abs().sum(1, keepdim=True)
    error = (module(x).float() - exact).abs()
    assert (error <= bound + BF16_EPS * exact.abs() + 1e-3).all()
    assert error.max() > 0  # the weights did change: the test compares against the float product


def test_int8_model_logits_stay_close_to_float() -> None:
    # Each product's relative error is about (max|w| / 127) / sqrt(12) / rms(w) ~ 1 % for these Gaussian weights
    # (max ~ 3 sigma over 32-64 inputs); some 15 products in sequence add up in quadrature to ~4 %, and bf16
    # activations add ~0.4 % each. So the float model's bf16 logits are within 10 % (relative norm) of the int8
    # model's, and int4 (16 levels per group instead of 255) is far further off.
    model = tiny_model(**SHAPE)
    ids = torch.randint(1, 64, (2, 12))
    with torch.no_grad():
        reference = model(ids).logits
        int8 = quantize_model(tiny_model(**SHAPE), "int8")(ids).logits.float()
        int4 = quantize_model(tiny_model(**SHAPE), "int4", GROUP)(ids).logits.float()
    relative = ((int8 - reference).norm() / reference.norm()).item()
    assert relative < 0.1
    assert ((int4 - reference).norm() / reference.norm()).item() > relative
    assert (int8.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_saved_checkpoint_loads_to_the_model_quantized_on_load(tmp_path: Path, weights: str) -> None:
    source = float_checkpoint(tmp_path / "float", tie_word_embeddings=True)
    target = quantize_checkpoint(source, tmp_path / weights, weights, GROUP, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(target)
    on_load = quantize_model(AutoModelForCausalLM.from_pretrained(source), weights, GROUP)
    assert isinstance(loaded.lm_head, QuantLinear) and not loaded.config.tie_word_embeddings
    assert loaded.config.parloop_quantization == on_load.config.parloop_quantization
    ids = torch.randint(1, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, on_load(ids).logits)
    # and the model saved by save_pretrained (transformers' writer, unaligned tensors) loads to it too
    on_load.save_pretrained(tmp_path / "resaved")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")(ids).logits,
                           loaded(ids).logits)


@pytest.mark.parametrize(("mode", "weights"), [(m, "int8") for m in MODES] + [("parallel", "int4")])
def test_cached_decoding_equals_full_forward_with_quantized_weights(mode: str, weights: str) -> None:
    # the float model's own cached-vs-full agreement in bf16 sets the tolerance: quantized products must add
    # nothing to it (a stacked decode step sends its R rows through one kernel call, the full forward T rows)
    ids, mask = left_padded_batch([11, 6, 9], 64)
    real = mask.bool()
    gaps = []
    for quantize in (False, True):
        model = tiny_model(**SHAPE, plt_loop_mode=mode, plt_num_loops=3)
        model = quantize_model(model, weights, GROUP) if quantize else model.to(torch.bfloat16)
        with torch.no_grad():
            full = model(ids, attention_mask=mask).logits.float()
            cached = prefill_then_decode(model, ids, mask, PLTCache(model.config, max_length=4), prompt=5).float()
        gaps.append(((cached - full)[real].abs().max() / full[real].abs().max()).item())
    assert gaps[1] <= max(2 * gaps[0], 4 * BF16_EPS)


def test_quantize_command_and_loading_refusals(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = float_checkpoint(tmp_path / "float")
    assert main(["quantize", "--model", str(source), "--weights", "int8", "--out", str(tmp_path / "q"),
                 "--no-progress"]) == 0
    assert "int8" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    x = torch.randint(1, 64, (1, 4))
    with pytest.raises(QuantizationError, match="cannot be trained"):
        model.train()(x)
    assert torch.isfinite(model.eval().float()(x).logits).all()  # int8 computes in float32 too
    int4 = quantize_model(tiny_model(**SHAPE), "int4", GROUP)
    with pytest.raises(QuantizationError, match="bfloat16"):
        int4.float()(x)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model(model, "int8")
    assert main(["quantize", "--model", str(tmp_path / "q"), "--weights", "int4", "--out", str(tmp_path / "q2"),
                 "--no-progress"]) == 2
    assert "already quantized" in capsys.readouterr().err
    with pytest.raises(QuantizationError, match="group"):
        quantize_model(tiny_model(**SHAPE), "int4", 128)  # hidden 32 is no multiple of 128


def test_damaged_quantized_checkpoint_is_refused(tmp_path: Path) -> None:
    target = quantize_checkpoint(float_checkpoint(tmp_path / "float"), tmp_path / "q", "int8", progress=False)
    config = json.loads((target / "config.json").read_text())
    config["parloop_quantization"]["weights"] = "int5"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="parloop_quantization"):
        AutoModelForCausalLM.from_pretrained(target)
    config["parloop_quantization"]["weights"] = "int4"  # int8 tensors under an int4 config: wrong shapes, named
    config["parloop_quantization"].update(group_size=GROUP, version=VERSIONS["int4"])
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lm_head.weight is I8"):
        AutoModelForCausalLM.from_pretrained(target)
    weights = next(target.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        AutoModelForCausalLM.from_pretrained(target)


def test_7b_builder_on_a_tiny_shape(tmp_path: Path) -> None:
    shape = dict(RELEASED_7B, vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    dirs = {w: checkpoint_for(w, tmp_path, shape, progress=False) for w in ("bf16", "int8", "int4")}
    built = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.safetensors")}
    assert len(built) == 3 * 3 and all((d / DONE_FILE).exists() for d in dirs.values())
    assert checkpoint_for("int4", tmp_path, shape, progress=False) == dirs["int4"]
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.safetensors")} == built  # reused
    ids = torch.randint(0, 256, (1, 6))
    for weights, directory in dirs.items():
        model = AutoModelForCausalLM.from_pretrained(directory)
        assert model.config.hidden_size == 128 and model.config.plt_gate_use_hidden_states
        for name, buffer in model.named_buffers():  # memory-mapped into the kernels: aligned in the file
            assert buffer.dtype not in (torch.int8, torch.uint8) or buffer.data_ptr() % 64 == 0, name
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all(), weights


def test_quantized_head_differs_from_float_head_only_by_rounding() -> None:
    model = tiny_model(**SHAPE)
    weight = model.lm_head.weight.detach().clone()
    quantize_model(model, "int8")
    x = torch.randn(3, 64).to(torch.bfloat16)
    exact = F.linear(x.float(), weight)
    bound = model.lm_head.weight_scale.float() / 2 * x.float().abs().sum(1, keepdim=True)
    assert ((model.lm_head(x).float() - exact).abs() <= bound + BF16_EPS * exact.abs() + 1e-3).all()


def test_float_tensors_under_a_quantized_config_are_refused(tmp_path: Path) -> None:
    target = quantize_checkpoint(float_checkpoint(tmp_path / "float"), tmp_path / "q", "int8", progress=False)
    weights = next(target.glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].float()
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="up_proj.weight is F32"):
        AutoModelForCausalLM.from_pretrained(target)


def test_bench_7b_path_on_a_tiny_shape(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shape = dict(RELEASED_7B, vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    options = BenchOptions(preset="7b", loops=[1, 2], modes=["parallel"], context=8, warmup=1, new_tokens=3,
                           threads=1, bandwidth_mb=8)
    result = run_7b(dataclasses.replace(options, repeat_reversed=False), ["bf16", "int8"], tmp_path, progress=False,
                    shape=shape)
    bf16, int8 = result["formats"]
    assert [(r["weights"], r["loops"]) for r in bf16["rows"] + int8["rows"]] == [
        ("bf16", 1), ("bf16", 2), ("int8", 1), ("int8", 2)]
    assert int8["checkpoint_bytes"] == sum(p.stat().st_size for p in (tmp_path / "int8").glob("*.safetensors"))
    assert int8["checkpoint_bytes"] < 0.6 * bf16["checkpoint_bytes"]
    for row in int8["rows"]:  # ratios are the rows' own times divided
        bf16_row = next(r for r in bf16["rows"] if r["loops"] == row["loops"])
        assert row["ratio_to_bf16"] == pytest.approx(row["decode_ms_per_token"] / bf16_row["decode_ms_per_token"],
                                                     rel=1e-3)
        assert row["bytes_per_step"] < bf16_row["bytes_per_step"]
    assert int8["page_cache_bytes"] == shape["vocab_size"] * shape["hidden_size"] * 2  # the bf16 embedding
    assert "int8    parallel" in format_7b_table(result) and "pass 1" not in format_7b_table(result)
    # by default both orders (bf16 int8 int8 bf16): the ratios come from the mean of the two passes' medians
    again = run_7b(options, ["bf16", "int8"], tmp_path, progress=False, shape=shape)
    bf16, int8 = again["formats"]
    assert len(int8["memory_bandwidth_passes"]) == 2
    assert int8["loops_measured"] == [sorted(options.loops), sorted(options.loops, reverse=True)]
    for row, bf16_row in zip(int8["rows"], bf16["rows"], strict=True):
        assert row["decode_ms_mean"] == pytest.approx((row["decode_ms_per_token"] + row["decode_ms_reversed"]) / 2,
                                                      rel=1e-3)
        assert row["ratio_to_bf16"] == pytest.approx(row["decode_ms_mean"] / bf16_row["decode_ms_mean"], rel=1e-3)
    assert "pass 1" in format_7b_table(again)
    assert main(["bench", "--preset", "100m", "--weights", "int8"]) == 2
    assert "--weights applies to --preset 7b" in capsys.readouterr().err


def test_threads_default_to_idle_cores_and_say_so(capsys: pytest.CaptureFixture) -> None:
    try:
        assert set_threads(3, "bench") == 3 and torch.get_num_threads() == 3
        assert "3 CPU threads (--threads)" in capsys.readouterr().err
        chosen = set_threads(None, "generate")
        assert 1 <= chosen <= (os.cpu_count() or 1) and torch.get_num_threads() == chosen
        assert "idle" in capsys.readouterr().err
    finally:
        torch.set_num_threads(1)


def test_int4_checkpoint_of_an_older_layout_is_refused(tmp_path: Path) -> None:
    # version 2 stored the codes in input order: read with today's layout it would load and decode wrongly
    target = quantize_checkpoint(float_checkpoint(tmp_path / "float"), tmp_path / "q", "int4", GROUP, progress=False)
    config = json.loads((target / "config.json").read_text())
    config["parloop_quantization"]["version"] = 2
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="version 2.*quantize the float checkpoint again"):
        AutoModelForCausalLM.from_pretrained(target)

"""parloop's CPU decode kernels (parloop/cpu_kernels.py, parloop/csrc/cpu_kernels.cpp) against float32 products
of the same numbers, for every row count they take and shapes that leave partial blocks, and the model layers
that call them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from parloop import cpu_kernels
from parloop.kernels import use_few_row_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.cpu_supported(), reason="this CPU has no AVX512-BF16")
BF16_EPS = 2.0**-8


@pytest.fixture(scope="module")
def kernels() -> Any:
    built = cpu_kernels.kernels()
    assert built is not None, "the CPU kernels failed to build (see the warning)"
    return built


def within_bf16_rounding(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> bool:
    """`out` is x @ w.T computed in float32 and rounded once to bf16: 2^-8 of sum |x| |w| (plus summation order)."""
    reference = x.float() @ w.float().t()
    scale = x.float().abs() @ w.float().abs().t()
    return bool(((out.float() - reference).abs() <= BF16_EPS * scale + 1e-5).all())


# inputs not a multiple of the 32-wide block, outputs not a multiple of the rows kept in flight
@pytest.mark.parametrize(("n", "k"), [(48, 64), (37, 200), (5, 33), (130, 1024), (1003, 96)])  # the last: many threads
def test_bf16_kernel_for_every_row_count(kernels: Any, n: int, k: int) -> None:
    w = torch.randn(n, k).to(torch.bfloat16)
    for rows in range(1, cpu_kernels.MAX_ROWS + 1):
        x = torch.randn(rows, k).to(torch.bfloat16)
        out = kernels.linear_bf16(x, w)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
        assert within_bf16_rounding(out, x, w), rows


@pytest.mark.parametrize(("n", "k"), [(48, 64), (37, 200), (5, 17)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_kernel_for_every_row_count(kernels: Any, n: int, k: int, dtype: torch.dtype) -> None:
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = (torch.rand(n) / 50).to(torch.bfloat16)
    w = q.float() * scale.float()[:, None]
    for rows in range(1, cpu_kernels.MAX_ROWS + 1):
        x = torch.randn(rows, k).to(dtype)
        out = kernels.linear_int8(x, q, scale)
        assert out.dtype == dtype
        if dtype == torch.float32:
            assert torch.allclose(out, x @ w.t(), rtol=1e-5, atol=1e-5), rows
        else:
            assert within_bf16_rounding(out, x, w), rows


def int16_lane_classes(x: torch.Tensor) -> torch.Tensor:
    """What the int8 kernel multiplies for bf16 activations x [M, K]: each row rounded to 16-bit integers with one
    scale per lane class (inputs k with the same (k mod 32) // 2), returned as float64 values x16 * scale."""
    xf = x.float()
    classes = (torch.arange(x.shape[1]) % 32) // 2
    out = torch.empty_like(xf, dtype=torch.float64)
    for c in range(16):
        cols = classes == c
        top = xf[:, cols].abs().amax(dim=1, keepdim=True)
        scale = torch.where(top > 0, top / 32767, torch.ones_like(top))
        x16 = torch.round(xf[:, cols] * (1 / scale)).clamp(-32767, 32767)  # float32, rounding half to even
        out[:, cols] = x16.double() * scale.double()
    return out


@pytest.mark.parametrize(("n", "k"), [(48, 64), (37, 200), (6, 5000)])  # the last: more than one 4096-input chunk
def test_int8_kernel_rounds_activations_per_lane_class(kernels: Any, n: int, k: int) -> None:
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = (torch.rand(n) / 50).to(torch.bfloat16)
    w = q.double() * scale.double()[:, None]
    x = torch.randn(cpu_kernels.MAX_ROWS, k)
    x[1, 3] = 300.0  # an outlier: it coarsens its own class (inputs 2, 3, 34, 35, ...) only
    x[2] = 0.0  # an all-zero row
    x = x.to(torch.bfloat16)
    for rows in range(1, cpu_kernels.MAX_ROWS + 1):
        out = kernels.linear_int8(x[:rows].contiguous(), q, scale).double()
        expected = int16_lane_classes(x[:rows]) @ w.t()
        assert ((out - expected).abs() <= 2.0**-8 * expected.abs() + 1e-6 * (x[:rows].double().abs() @ w.abs().t())
                ).all(), rows
    # An outlier of 30000 with the weights of its own class zeroed: the other classes' inputs keep their precision,
    # so the product matches the exact one up to the output's bf16 rounding. (One scale per row would round every
    # input to a multiple of 30000 / 32767 and miss by far more.)
    x[1, 3] = 30000.0
    w_other = w.clone()
    w_other[:, (torch.arange(k) % 32) // 2 == (3 % 32) // 2] = 0.0
    q_other = (w_other / scale.double()[:, None]).round().to(torch.int8)
    out = kernels.linear_int8(x[1:2].contiguous(), q_other, scale).double()
    exact = x[1:2].double() @ w_other.t()
    assert ((out - exact).abs() <= 2.0**-8 * exact.abs() + 1e-3 * (x[1:2].double().abs() @ w_other.abs().t()) / k
            ).all()


def int4_file_layout(codes: torch.Tensor, group: int) -> torch.Tensor:
    """Codes [N, K] (0..15) packed byte by byte as docs/cpu.md describes the int4 file: each run of up to 16 groups
    of a row as blocks t = 0 .. group/8 - 1; in block t, group l's 4 bytes, byte i = input 8t+i (low nibble) and
    8t+4+i (high nibble) of that group. Written as loops, independently of parloop.quant.pack_int4."""
    n, k = codes.shape
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    groups, at = k // group, 0
    for first in range(0, groups, 16):
        for t in range(group // 8):
            for g in range(first, min(first + 16, groups)):
                for i in range(4):
                    low, high = codes[:, g * group + 8 * t + i], codes[:, g * group + 8 * t + 4 + i]
                    packed[:, at] = low | (high << 4)
                    at += 1
    return packed


def int8_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """What the int4 kernel multiplies for bf16 activations x [M, K]: each group of `group` inputs of a row rounded
    to int8 with the scale max |x| / 127 of that group, returned as float64 values x8 * scale."""
    xf = x.float().view(x.shape[0], -1, group)
    top = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(top > 0, top / 127, torch.ones_like(top))
    x8 = torch.round(xf * (1 / scale)).clamp(-127, 127)  # float32, rounding half to even
    return (x8.double() * scale.double()).view(x.shape)


# 36 groups: two full runs of 16 and one of 4 (short blocks); 2 groups; one group of 256
@pytest.mark.parametrize(("n", "k", "group"), [(48, 128, 64), (37, 256, 128), (3, 256, 256), (20, 64 * 36, 64)])
def test_int4_kernel_for_every_row_count(kernels: Any, n: int, k: int, group: int) -> None:
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = int4_file_layout(codes, group)
    scale = (torch.rand(n, k // group) / 10).to(torch.bfloat16)
    zero = (torch.randn(n, k // group) / 10).to(torch.bfloat16)
    w = ((codes.double() - 8).view(n, -1, group) * scale.double()[..., None] + zero.double()[..., None]).view(n, k)
    x = torch.randn(cpu_kernels.MAX_ROWS, k)
    x[1, 5] = 300.0  # an outlier: it coarsens its own group only
    x[2] = 0.0  # an all-zero row
    x = x.to(torch.bfloat16)
    for rows in range(1, cpu_kernels.MAX_ROWS + 1):
        out = kernels.linear_int4(x[:rows].contiguous(), packed, scale, zero, group).double()
        # exact products of the rounded activations, summed in float32 (the code sums exactly in int32, the group
        # totals and the offset term in float32) and rounded once to bf16
        expected = int8_groups(x[:rows], group) @ w.t()
        magnitude = x[:rows].double().abs() @ (w.abs() + 8 * scale.double().repeat_interleave(group, 1)).t()
        assert ((out - expected).abs() <= BF16_EPS * expected.abs() + 1e-5 * magnitude + 1e-6).all(), rows
    if k == group:
        return
    # The same outlier with the weights of its group zeroed: the other groups keep their precision, so the kernel
    # matches the exact product of the unrounded activations within the int8 rounding of those groups alone (and
    # the float32 rounding of the zeroed group's offset term, which cancels its codes' sum). (One scale per row
    # would round every input to a multiple of 30000 / 127 and miss by far more.)
    x[1, 5] = 30000.0
    codes_other, zero_other = codes.clone(), zero.clone()
    codes_other[:, :group], zero_other[:, 0] = 8, 0.0  # group 0 weighs exactly 0
    w_other = w.clone()
    w_other[:, :group] = 0.0
    out = kernels.linear_int4(x[1:2].contiguous(), int4_file_layout(codes_other, group), scale, zero_other, group)
    exact = x[1:2].double() @ w_other.t()
    top = x[1:2].double().abs().view(1, -1, group).amax(-1).repeat_interleave(group, 1)  # each group's largest
    rounding = (top / 254) @ w_other.abs().t()  # each input moves by at most half a step of its group
    offsets = 1e-5 * x[1:2].double().abs() @ (w_other.abs() + 8 * scale.double().repeat_interleave(group, 1)).t()
    assert ((out.double() - exact).abs() <= BF16_EPS * exact.abs() + rounding + offsets + 1e-6).all()
    assert rounding.max() < 0.05 * (x[1:2, group:].double().abs() @ w_other[:, group:].abs().t()).max()


def test_kernels_name_what_is_wrong(kernels: Any) -> None:
    w = torch.randn(16, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        kernels.linear_bf16(torch.randn(9, 64).to(torch.bfloat16), w)
    with pytest.raises(RuntimeError, match="x has 32 inputs, the weight 64"):
        kernels.linear_bf16(torch.randn(1, 32).to(torch.bfloat16), w)
    with pytest.raises(RuntimeError, match="must be bfloat16"):
        kernels.linear_bf16(torch.randn(1, 64), w)
    with pytest.raises(RuntimeError, match="group size 32"):
        kernels.linear_int4(torch.randn(1, 64).to(torch.bfloat16), torch.zeros(16, 32, dtype=torch.uint8),
                            torch.ones(16, 2).to(torch.bfloat16), torch.zeros(16, 2).to(torch.bfloat16), 32)


def test_bf16_decode_goes_through_the_kernel(kernels: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class Spy:
        def linear_bf16(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            calls.append((x.shape[0], w.shape[0]))
            return kernels.linear_bf16(x, w)

    monkeypatch.setattr(cpu_kernels, "kernels", lambda: Spy())
    model = use_few_row_kernels(tiny_model(plt_gate_use_hidden_states=True).to(torch.bfloat16))
    ids = torch.randint(1, 61, (1, 3))
    with torch.no_grad():
        logits = model(ids).logits  # 3 rows per product: the kernel; the float reference below: F.linear
    assert calls and {rows for rows, _ in calls} == {3}
    heads = model.config.num_attention_heads
    assert (3, heads) in calls  # the hidden-state gate of the second loop (parloop.model.PLTGate)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.__class__ = torch.nn.Linear
            module.__dict__.pop("linear", None)  # the gate's own F.linear again
        reference = model(ids).logits
    assert torch.allclose(logits.float(), reference.float(), rtol=0.05, atol=0.05)
    x = torch.randn(2, 32).to(torch.bfloat16)
    assert within_bf16_rounding(model.lm_head(x), x, model.lm_head.weight)


def test_switch_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")
    assert cpu_kernels.kernels() is None
    layer = use_few_row_kernels(torch.nn.Sequential(torch.nn.Linear(32, 8))).to(torch.bfloat16)[0]
    x = torch.randn(2, 32).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.allclose(layer(x).float(), F.linear(x, layer.weight, layer.bias).float(), rtol=0.02, atol=0.02)

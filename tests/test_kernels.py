"""The few-row CPU products compute x @ W.T whichever layout they pick."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from parloop import kernels
from parloop.kernels import CANDIDATES, LAST_GAP, TRIALS, LayoutTuner, Product, chosen_layouts, few_rows_linear


@pytest.fixture(autouse=True)
def _own_tuning_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from no choices and leaves none behind (the table is module-global)."""
    monkeypatch.setattr(kernels, "_tunings", {})


@pytest.mark.parametrize("rows", [1, 2, 3, 7])
def test_every_candidate_computes_the_product(rows: int) -> None:
    x, w = torch.randn(rows, 48), torch.randn(80, 48)
    for name, product in CANDIDATES.items():
        if name == "paired" and rows != 1:
            continue
        out = product(x, w)
        assert out.shape == (rows, 80) and out.is_contiguous()
        assert torch.allclose(out, F.linear(x, w), atol=1e-5), name


def test_choice_is_made_after_timing_every_candidate_and_then_used() -> None:
    x, w = torch.randn(3, 40), torch.randn(24, 40)
    key = ((24, 40), 3, torch.float32, torch.get_num_threads())
    tried = ["linear", "weight_first", "row_by_row"]
    for i in range(TRIALS * len(tried)):
        assert key not in chosen_layouts()
        assert torch.allclose(few_rows_linear(x * i, w), i * (x @ w.T), atol=1e-4)
    assert chosen_layouts()[key] in tried
    assert torch.allclose(few_rows_linear(x, w), x @ w.T, atol=1e-5)


def drive(tuner: LayoutTuner, calls: int, seconds) -> list[str]:
    """Run `calls` calls through `tuner`, timing a call of layout n at call i as `seconds(n, i)`; the layouts run."""
    ran = []
    for i in range(calls):
        name, timed = tuner.next_name()
        ran.append(name)
        if timed:
            tuner.record(name, seconds(name, i))
    return ran


def test_a_choice_fooled_by_a_burst_in_its_trials_is_corrected() -> None:
    tuner = LayoutTuner(("fast", "slow"))
    # a burst of load slows fast's trials 10x (as when they land in bursts between slow's), so the first choice
    # is wrong
    burst = TRIALS * 2

    def seconds(name: str, i: int) -> float:
        return 2.0 if name == "slow" else 10.0 if i < burst else 1.0

    drive(tuner, burst, seconds)
    assert tuner.best == "slow"
    ran = drive(tuner, 100, lambda n, i: seconds(n, i + burst))
    assert tuner.best == "fast" and tuner.switches == 1
    assert ran[-50:].count("slow") <= 3  # once switched, the slow layout runs only in ever rarer checks


def test_bursts_in_a_minority_of_checks_do_not_switch_the_choice() -> None:
    tuner = LayoutTuner(("fast", "slow"))
    drive(tuner, 2 * TRIALS, lambda n, i: 1.0 if n == "fast" else 1.5)
    assert tuner.best == "fast"
    hits = iter(range(10**6))

    def seconds(name: str, i: int) -> float:
        # every 3rd timed call of the choice lands in a burst and takes 5x as long
        if name == "fast":
            return 5.0 if next(hits) % 3 == 0 else 1.0
        return 1.5

    drive(tuner, 5000, seconds)
    assert tuner.best == "fast" and tuner.switches == 0


def test_checks_of_a_clearly_worse_layout_become_rare() -> None:
    tuner = LayoutTuner(("linear", "weight_first", "row_by_row"))
    ran = drive(tuner, 10_000, lambda n, i: {"linear": 1.0, "weight_first": 3.0, "row_by_row": 2.0}[n])
    assert tuner.best == "linear"
    late = ran[-5000:]
    assert 0 < late.count("weight_first") + late.count("row_by_row") <= 2 * 5000 // LAST_GAP + 2


class FakeClock:
    """A clock that only moves when a product says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def slowed(self, product: Product, seconds: Iterator[float]) -> Product:
        def run(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            self.now += next(seconds)
            return product(x, w)
        return run


def test_few_rows_linear_switches_layout_when_the_measurements_say_so(monkeypatch) -> None:
    x, w = torch.randn(2, 40), torch.randn(16, 40)
    key = ((16, 40), 2, torch.float32, torch.get_num_threads())
    clock = FakeClock()
    monkeypatch.setattr(kernels, "clock", clock)
    # row_by_row is slow during its trials only (a burst), then the fastest by far
    monkeypatch.setattr(kernels, "CANDIDATES", {
        "linear": clock.slowed(CANDIDATES["linear"], itertools.repeat(2.0)),
        "weight_first": clock.slowed(CANDIDATES["weight_first"], itertools.repeat(2.0)),
        "row_by_row": clock.slowed(CANDIDATES["row_by_row"], itertools.chain([10.0] * TRIALS, itertools.repeat(1.0))),
    })
    for i in range(100):
        if i == 3 * TRIALS:
            assert chosen_layouts()[key] != "row_by_row"
        assert torch.allclose(few_rows_linear(x, w), x @ w.T, atol=1e-5)
    assert chosen_layouts()[key] == "row_by_row"

"""The machine's practical memory bandwidth, against which a decode step's achieved bandwidth is reported."""

from __future__ import annotations

import math
import time

import torch

from parloop.bench.timing import synchronizer


def measure_memory_bandwidth(device: torch.device, megabytes: int = 512, repeats: int = 10) -> float:
    """GB/s of a large tensor copy (bytes read + written), best of `repeats`: the machine's practical limit."""
    sync = synchronizer(device)
    src = torch.rand(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst's pages is not a copy
    best = math.inf
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best / 1e9

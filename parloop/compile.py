"""The compiled decode step: the layer stack of a one-token step over a static cache, through `torch.compile`.

On a GPU a decode step is launch-bound, not bandwidth-bound, unless its kernels are replayed from a CUDA graph:
`compile_step` compiles the layer stack with `torch.compile(mode="reduce-overhead")` there (docs/design.md §3).
`PLTForCausalLM.compile_decode()` installs it; it runs only for steps whose shapes never change (a static cache).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from parloop.cache import StoreCall


class CompiledStep:
    """A one-token decode step `fn(h, ..., call) -> h` over a static cache, compiled once per device type.

    On CUDA the mode defaults to "reduce-overhead": Inductor's fused kernels, replayed from a CUDA graph, so a step
    costs a few launches instead of hundreds (a 100M model's step is ~1 % of an H100's bandwidth when every op is
    launched on its own). The graph writes the cache in place, which cudagraphs allow only for inputs at a fixed
    address, so every buffer that a `StoreCall` argument writes (`StoreCall.buffers()`, which asks the cache) is
    marked static (a buffer replaced later, e.g. by `reorder_cache`, makes the graph re-record). The result is
    copied out of the graph's memory, which its next replay overwrites.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], **compile_kwargs: Any) -> None:
        self.fn, self.compile_kwargs = fn, compile_kwargs
        self.compiled: dict[str, Callable[..., torch.Tensor]] = {}

    def _for(self, device: torch.device) -> Callable[..., torch.Tensor]:
        compiled = self.compiled.get(device.type)
        if compiled is None:
            kwargs = dict(self.compile_kwargs)
            if device.type == "cuda" and "options" not in kwargs:
                kwargs.setdefault("mode", "reduce-overhead")
            compiled = self.compiled[device.type] = torch.compile(self.fn, dynamic=False, **kwargs)
        return compiled

    def __call__(self, h: torch.Tensor, *args: Any) -> torch.Tensor:
        compiled = self._for(h.device)
        if h.device.type != "cuda":
            return compiled(h, *args)
        for arg in args:
            if isinstance(arg, StoreCall):
                for buffer in arg.buffers():
                    torch._dynamo.mark_static_address(buffer)
        return compiled(h, *args).clone()


def compile_step(fn: Callable[..., torch.Tensor], **compile_kwargs: Any) -> CompiledStep:
    """`torch.compile` a one-token decode step whose shapes never change (a static cache), as a `CompiledStep`."""
    # Dynamo caches compiled graphs per code object, so every model in a process (and every loop index of the
    # sequential modes) shares the step's budget of recompilations; past it, decoding silently runs eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return CompiledStep(fn, **compile_kwargs)

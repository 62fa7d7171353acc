"""The processes of a training run: who this process is, how the model is spread over them, and how they agree.

`parallelize(model, world, strategy)` is applied to an unchanged `PLTForCausalLM`, as torchtitan does: the model
code knows nothing of DDP or FSDP2. `StopRequest` turns Ctrl-C / SIGTERM into a request that every rank honours
at the same step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from parloop.train.errors import RecipeError
from parloop.train.metrics import say


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run (one process: rank 0 of 1), and their collectives."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        """The world torchrun describes in WORLD_SIZE, RANK and LOCAL_RANK (one process without them)."""
        try:
            size = int(os.environ.get("WORLD_SIZE", "1"))
            return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), size)
        except ValueError:
            raise RecipeError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (launch with torchrun)") from None

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        values = [None] * self.size
        if self.size > 1:
            dist.all_gather_object(values, value)
        else:
            values[0] = value
        return values

    def all_reduce(self, tensor: torch.Tensor, op: Literal["sum", "max"] = "sum") -> torch.Tensor:
        """`tensor` reduced in place over all ranks (and returned)."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor


@contextlib.contextmanager
def process_group(world: World, backend: str, device: str) -> Iterator[None]:
    """The default process group of a multi-process run, for the duration of the block (nothing for one process).

    `backend` "auto" is nccl on GPUs and gloo on CPUs; `device` is the recipe's `train.device`.
    """
    if world.size == 1:
        yield
        return
    if "MASTER_ADDR" not in os.environ:
        raise RecipeError(f"WORLD_SIZE = {world.size} but MASTER_ADDR is not set: launch with torchrun")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def pick_device(name: str, world: World) -> torch.device:
    """The device of this process for `train.device` = `name` (auto: this rank's GPU if there is one)."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RecipeError("train.device = 'cuda' but no CUDA GPU is visible: use train.device=cpu")
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def parallelize(model: nn.Module, world: World, strategy: Literal["ddp", "fsdp"]) -> nn.Module:
    """`model` (already on its device) made data-parallel over `world`: DDP or FSDP2; unchanged for one process."""
    if world.size == 1:
        return model
    device = next(model.parameters()).device
    if strategy == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (world.size,))
    # Each decoder layer is its own FSDP unit; embeddings, final norm and lm_head go with the root. The PLT
    # loops call a layer R times per forward, and FSDP2 gathers its weights for every call (and again in
    # backward): R times the all-gather traffic of a plain transformer, the usual memory savings.
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """Skip the gradient all-reduce of a parallelized `model` unless `sync` (the last micro-batch of a step)."""
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


class StopRequest:
    """SIGINT/SIGTERM handler: ask the loop to checkpoint and stop after the current step.

    torchrun forwards the terminal's Ctrl-C to its workers, so a worker may see two signals for one key press;
    only a third one aborts immediately, without saving.
    """

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count >= 3:
            raise KeyboardInterrupt
        if self.count == 1:
            say(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping")

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
            yield self
            return
        # a signal the process was started ignoring (`nohup`, `cmd &` in a script) stays ignored, as Python leaves it
        previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)
                    if signal.getsignal(s) is not signal.SIG_IGN}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def agreed(self, world: World, device: torch.device) -> bool:
        """Do all ranks stop now? Any rank that saw a signal decides, so all save the same step."""
        flag = torch.tensor([float(self.count > 0)], device=device)
        return bool(world.all_reduce(flag, op="max").item())

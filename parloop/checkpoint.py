"""Checkpoint files of a model directory (design §4): integrity of the safetensors files and strict loading.

`transformers` would initialise a missing weight at random and drop an unexpected one with a warning; a released
checkpoint loaded that way computes something plausible but wrong. Here every such mismatch is an error that names it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from parloop import plt
from parloop.quant import FIELD, HEAD, LAYER_LINEARS, TENSORS, stored_quantization


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt, or whose weights do not match the model its config describes."""


def check_weight_files(directory: Path) -> None:
    """Fail, naming the file, if a safetensors file of the checkpoint is missing, truncated or corrupt."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err})") from err
    else:
        names = [p.name for p in sorted(directory.glob("*.safetensors"))]
    for name in names:
        path = directory / name
        if not path.exists():
            raise CheckpointError(f"{path} is listed in {index.name} but missing: the checkpoint is incomplete")
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception as err:  # safetensors raises its own error type for every kind of damage
            raise CheckpointError(f"{path} is truncated or corrupt ({err}); save or download it again") from err


# the dtype each tensor of a quantized layer must have in the files, per format (a float tensor under a quantized
# config would otherwise be cast into the integer buffer: plausible numbers, wrong model)
SAFETENSORS_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.bfloat16: "BF16"}
QUANTIZED_DTYPES = {weights: {name: SAFETENSORS_DTYPES[dtype] for name, dtype in tensors.items()}
                    for weights, tensors in TENSORS.items()}


def check_quantized_dtypes(directory: Path) -> None:
    """Fail, naming the tensor, if a quantized checkpoint stores a quantized layer's tensor in the wrong dtype."""
    weights = (stored_quantization(directory) or {}).get("weights")
    if weights not in QUANTIZED_DTYPES:
        return
    expected = QUANTIZED_DTYPES[weights]
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors handle is no dict)
                module, _, kind = name.rpartition(".")
                layer = module.rsplit(".", 1)[-1]
                if (layer in LAYER_LINEARS or module == HEAD) and kind in expected:
                    dtype = f.get_slice(name).get_dtype()
                    if dtype != expected[kind]:
                        raise CheckpointError(f"{path.name}: {name} is {dtype}, but a {weights} checkpoint stores "
                                              f"it as {expected[kind]}: the files do not match {FIELD} in "
                                              "config.json; quantize the float checkpoint again")


EMBEDDING = "model.embed_tokens.weight"
PAGE_CACHE_CHUNK = 16 * 2**20  # bytes per read: a bounded buffer, whatever the tensor's size


def _tensor_file(directory: Path, name: str) -> Path | None:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        file = json.loads(index.read_text()).get("weight_map", {}).get(name)
        return directory / file if file else None
    single = directory / "model.safetensors"
    return single if single.is_file() else None


def read_into_page_cache(directory: Path, name: str = EMBEDDING) -> int:
    """Read tensor `name`'s bytes in a checkpoint's files once, so that the OS keeps them in its page cache; return
    how many bytes (0 when the files do not hold it).

    `from_pretrained` maps the files and each page comes from the disk when first touched. A decode step reads all
    of every other weight, so those pages are resident after the first step, but only one row of the embedding per
    token: every token not seen before would wait for the disk (4-9 ms a token on our machine, docs/cpu.md). Read
    here with plain reads, the bytes land in the page cache and not in this process: its resident memory does not
    grow by the table, only by the rows decoding touches.
    """
    path = _tensor_file(Path(directory), name)
    if path is None:
        return 0
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(header_size)).get(name)
        if entry is None:
            return 0
        begin, end = entry["data_offsets"]
        f.seek(8 + header_size + begin)
        buffer = bytearray(min(PAGE_CACHE_CHUNK, end - begin))
        done = 0
        while done < end - begin:
            got = f.readinto(memoryview(buffer)[:min(len(buffer), end - begin - done)])
            if not got:
                break
            done += got
    return done


def mismatch_problems(info: dict[str, Any], unused_gate: bool) -> list[str]:
    """The loading report of `from_pretrained(..., output_loading_info=True)` as a list of problems. With
    `unused_gate` (a model with one loop), a missing G-SWA gate is not one: the gate is never used."""
    missing = [k for k in info["missing_keys"] if not (unused_gate and plt.is_gate_weight(k))]
    problems = [f"missing weight {k}" for k in sorted(missing)]
    problems += [f"unexpected weight {k}" for k in sorted(info["unexpected_keys"])]
    problems += [f"weight {m[0]} has shape {tuple(m[1])} in the checkpoint but the config needs {tuple(m[2])}"
                 for m in sorted(info["mismatched_keys"])]
    return problems


def load_strict(load: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call `PreTrainedModel.from_pretrained` (`load`) and raise `CheckpointError` naming every weight that is
    missing, unexpected or wrongly shaped, and every damaged weight file of a local directory."""
    if args and Path(args[0]).is_dir():
        check_weight_files(Path(args[0]))
        check_quantized_dtypes(Path(args[0]))
    want_info = kwargs.pop("output_loading_info", False)
    kwargs.setdefault("ignore_mismatched_sizes", True)  # so that we can name the key ourselves
    model, info = load(*args, output_loading_info=True, **kwargs)
    problems = mismatch_problems(info, unused_gate=plt.unused_gate(model.config))
    if problems:
        fields = ", ".join(model.config.weight_fields)
        raise CheckpointError("checkpoint does not match its config.json: " + "; ".join(problems)
                              + f". Check {fields} and the sizes in config.json against the weight files.")
    return (model, info) if want_info else model

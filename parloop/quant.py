"""Weight-only quantization for CPU decoding: int8 per output channel, int4 in groups (docs/cpu.md).

A decode step reads every weight once per token, so its time is the weights' bytes over the memory bandwidth:
8-bit weights halve it, 4-bit weights (plus a bf16 scale and zero per group of `group_size` inputs) nearly quarter
it. Decode-sized products (1 to 8 rows: the R stacked rows of a `parallel` step go through one call) run on
parloop's CPU kernels (`parloop.cpu_kernels`), which unpack each weight block once for all rows; where those cannot
run (no AVX512-BF16), on PyTorch's own `aten._weight_int8pack_mm` / `aten._weight_int4pack_mm_for_cpu`. A short
prompt goes through the kernels 8 rows at a time; a long one (or a call that wants gradients) dequantizes blocks of
output rows and multiplies them with PyTorch's matrix product.
Activations are bfloat16 (parloop's int8 kernel rounds them to 16-bit integers, one scale per 1/16 of the inputs:
as fine as bf16 itself for all but the smallest; its int4 kernel to 8-bit integers per group, as llama.cpp does,
which moves a product by a few percent of what int4's own weight rounding does; docs/cpu.md); int8 also takes
float32 (computed in float32).

The weights of every decoder layer's linear products (q/k/v/o, gate/up/down) and of the output head are quantized;
the embedding (one row read per token), norms and G-SWA gates stay as they are.

On disk a quantized checkpoint is an ordinary model directory whose `config.json` carries `parloop_quantization`
and whose quantized layers `X` hold `X.weight` (int8 `[N, K]`, or uint8 `[N, K/2]` with two int4 codes per byte in
`pack_int4`'s order: 16 groups side by side) and `X.weight_scale` (bf16 `[N]` for int8, `[N, K/group]` for int4)
and, for int4, `X.weight_zero` (bf16 `[N, K/group]`), all loaded by `from_pretrained` without a copy. The layout
is fixed (no torch-specific packing), so a checkpoint works on every machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from parloop import cpu_kernels

FORMATS = ("int8", "int4")
# the format version written; int4's version 1 was torch's CPU-specific packing, version 2 a plain nibble order
VERSIONS = {"int8": 1, "int4": 3}
DEFAULT_GROUP_SIZE = 128  # int4: inputs sharing a scale and zero (the common choice of GPTQ/AWQ/llama.cpp Q4)
GROUP_SIZES = (64, 128, 256)  # what the CPU kernels take (multiples of 64)
SUPERBLOCK = 16  # int4 groups stored side by side, one per 32-bit lane (pack_int4)
# the linear products quantized: each decoder layer's, and the output head
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HEAD = "lm_head"
FIELD = "parloop_quantization"  # the config.json field
# the tensors of a quantized layer and their dtypes in the files, per format
TENSORS = {"int8": {"weight": torch.int8, "weight_scale": torch.bfloat16},
           "int4": {"weight": torch.uint8, "weight_scale": torch.bfloat16, "weight_zero": torch.bfloat16}}
# Up to KERNEL_ROWS rows (a short prompt) go through parloop's kernels 8 rows at a time; more rows dequantize
# DEQUANTIZE_ROWS output rows at a time and use PyTorch's matrix product, which is faster from about 100 rows on
# (docs/cpu.md); the block bounds the temporary float weight.
KERNEL_ROWS = 128
DEQUANTIZE_ROWS = 2048


class QuantizationError(ValueError):
    """A quantization request or quantized checkpoint that cannot work; the message says what to change."""


def quantization_config(weights: str, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, Any]:
    """The `parloop_quantization` value of a checkpoint quantized to `weights`."""
    if weights not in FORMATS:
        raise QuantizationError(f"weights {weights!r} is not a quantized format: use one of {', '.join(FORMATS)}")
    if weights == "int8":
        return {"weights": "int8", "version": VERSIONS["int8"]}
    if group_size not in GROUP_SIZES:
        raise QuantizationError(f"group size {group_size} is not supported: use one of {GROUP_SIZES}")
    return {"weights": "int4", "version": VERSIONS["int4"], "group_size": group_size}


def check_quantization_config(value: Any) -> None:
    """Raise `QuantizationError` naming what is wrong with a `parloop_quantization` value (None is fine)."""
    if value is None:
        return
    if not isinstance(value, dict) or value.get("weights") not in FORMATS or value.get("version") not in (1, 2, 3):
        raise QuantizationError(f"{FIELD} = {value!r} is invalid: it must be written by `parloop quantize` "
                                f"(weights one of {', '.join(FORMATS)}, version as in {VERSIONS})")
    if value["weights"] == "int8" and value["version"] != VERSIONS["int8"]:
        raise QuantizationError(f"{FIELD} = {value!r}: int8 checkpoints are version {VERSIONS['int8']}")
    if value["weights"] == "int4" and value["version"] != VERSIONS["int4"]:
        raise QuantizationError(f"this int4 checkpoint (version {value['version']}) was written by an older "
                                f"parloop in another layout of the codes (this one reads version "
                                f"{VERSIONS['int4']}): quantize the float checkpoint again with `parloop quantize`")
    if value["weights"] == "int4" and value.get("group_size") not in GROUP_SIZES:
        raise QuantizationError(f"{FIELD}.group_size = {value.get('group_size')!r} is invalid: one of {GROUP_SIZES}")


def _round_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric int8 per output channel: w ~ q * scale[n], q in [-127, 127], scale = max |w[n]| / 127."""
    w = weight.detach().float()
    scale = _round_bf16(w.abs().amax(dim=1).clamp(min=1e-12) / 127)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return {"weight": q, "weight_scale": scale.to(torch.bfloat16)}


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` inputs: w ~ (q - 8) * scale + zero, q in [0, 15], the group's
    min..max spread over the 16 levels; two codes per byte in `pack_int4`'s order."""
    n, k = weight.shape
    if k % group_size:
        raise QuantizationError(f"int4 groups of {group_size} do not divide a layer's {k} inputs: pick a "
                                f"--group-size from {GROUP_SIZES} that divides every layer's input size")
    w = weight.detach().float().view(n, k // group_size, group_size)
    low, high = w.amin(-1), w.amax(-1)
    scale = _round_bf16((high - low).clamp(min=1e-12) / 15)
    zero = _round_bf16(low + 8 * scale)
    q = (torch.round((w - zero[..., None]) / scale[..., None]) + 8).clamp(0, 15).to(torch.uint8).view(n, k)
    return {"weight": pack_int4(q, group_size), "weight_scale": scale.to(torch.bfloat16),
            "weight_zero": zero.to(torch.bfloat16)}


def quantize_weight(weight: torch.Tensor, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors that replace a float `weight` `[N, K]` in the format of a `parloop_quantization` value."""
    if config["weights"] == "int8":
        return quantize_int8(weight)
    return quantize_int4(weight, config["group_size"])


def _superblocks(k: int, group_size: int) -> list[tuple[int, int]]:
    """(first input, groups) of each run of up to SUPERBLOCK groups along a row of `k` inputs."""
    groups = k // group_size
    return [(g * group_size, min(SUPERBLOCK, groups - g)) for g in range(0, groups, SUPERBLOCK)]


def pack_int4(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """int4 codes `[N, K]` (uint8, 0..15) in the file's layout `[N, K/2]`: each run of up to 16 groups of a row is
    stored as G/8 blocks, block t holding for each group 4 bytes whose low nibbles are its inputs 8t..8t+3 and
    whose high nibbles are 8t+4..8t+7 (one group per 32-bit lane: the CPU kernel's order, docs/cpu.md)."""
    n, k = codes.shape
    parts = []
    for start, groups in _superblocks(k, group_size):
        block = codes[:, start:start + groups * group_size].reshape(n, groups, group_size // 8, 2, 4)
        block = block.permute(0, 2, 1, 3, 4)  # [N, word t, group, low/high, 4]
        parts.append((block[..., 0, :] | (block[..., 1, :] << 4)).reshape(n, -1))
    return torch.cat(parts, dim=1)


def unpack_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """The int4 codes `[N, K]` (uint8, 0..15) of a weight `[N, K/2]` in `pack_int4`'s layout."""
    n, k = weight.shape[0], 2 * weight.shape[1]
    parts = []
    for start, groups in _superblocks(k, group_size):
        block = weight[:, start // 2:(start + groups * group_size) // 2].reshape(n, group_size // 8, groups, 1, 4)
        block = torch.cat([block & 15, block >> 4], dim=3)  # [N, word t, group, low/high, 4]
        parts.append(block.permute(0, 2, 1, 3, 4).reshape(n, -1))
    return torch.cat(parts, dim=1)


def stored_quantization(model_dir: Path) -> dict[str, Any] | None:
    """The `parloop_quantization` value of a model directory's config.json (None: float weights, or no config)."""
    config = Path(model_dir) / "config.json"
    return json.loads(config.read_text()).get(FIELD) if config.is_file() else None


def dequantize(tensors: dict[str, torch.Tensor], config: dict[str, Any], rows: slice = slice(None),
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The float weight `[N, K]` (or its output `rows`) that quantized `tensors` stand for."""
    weight, scale = tensors["weight"][rows], tensors["weight_scale"][rows]
    if config["weights"] == "int8":
        return weight.to(dtype) * scale.to(dtype)[:, None]
    n, group = weight.shape[0], config["group_size"]
    codes = unpack_int4(weight, group).view(n, -1, group).to(dtype)  # [N, K/G, G]
    zero = tensors["weight_zero"][rows].to(dtype)
    return ((codes - 8) * scale.to(dtype)[..., None] + zero[..., None]).view(n, -1)


class QuantLinear(nn.Module):
    """A bias-optional linear product with quantized weights, for inference on a CPU.

    Its buffers are what `quantize_weight` returns (persistent: `state_dict`, `save_pretrained` and
    `from_pretrained` see them under the layer's own name) and keep their dtypes through `model.to(dtype)`: only
    the activations change dtype. Any number of rows go through one call.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, config: dict[str, Any],
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, config
        self.weights = config["weights"]
        groups = in_features // config.get("group_size", in_features)
        shapes = {"weight": (out_features, in_features if self.weights == "int8" else in_features // 2),
                  "weight_scale": (out_features,) if self.weights == "int8" else (out_features, groups),
                  "weight_zero": (out_features, groups)}
        for name, dtype in TENSORS[self.weights].items():
            self.register_buffer(name, torch.empty(shapes[name], dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self._stock_int4: tuple[torch.Tensor, torch.Tensor] | None = None  # aten's packing, built if needed

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: dict[str, Any]) -> QuantLinear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, config, device="cpu")
        for name, tensor in quantize_weight(linear.weight, config).items():
            setattr(module, name, tensor.contiguous())
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)
        return module.eval()

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        # model.float() / .to(dtype) would turn the bf16 scales into float32 tensors the kernels do not take
        super()._apply(fn, recurse)
        for name, dtype in TENSORS[self.weights].items():
            setattr(self, name, getattr(self, name).to(dtype))
        return self

    def extra_repr(self) -> str:
        group = f", group_size={self.config['group_size']}" if self.weights == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.weights}{group}"

    def _refuse(self, x: torch.Tensor) -> None:
        if self.training:
            raise QuantizationError("a model with quantized weights cannot be trained (its weights are integers "
                                    "without gradients): train the float checkpoint and quantize it afterwards; "
                                    "call model.eval() to decode")
        if x.device.type != "cpu" or self.weight.device.type != "cpu":
            raise QuantizationError(f"quantized weights run on the CPU kernels only (input on {x.device}): load "
                                    "the model on the CPU, or use the float checkpoint on a GPU")
        allowed = (torch.bfloat16, torch.float32) if self.weights == "int8" else (torch.bfloat16,)
        if x.dtype not in allowed:
            raise QuantizationError(f"a model with {self.weights} weights computes in "
                                    f"{' or '.join(str(d).removeprefix('torch.') for d in allowed)}, got {x.dtype} "
                                    "activations: load it with dtype=torch.bfloat16 or 'auto' (--dtype auto)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._refuse(x)
        rows = x.reshape(-1, self.in_features).contiguous()
        count = rows.shape[0]
        wants_grad = torch.is_grad_enabled() and x.requires_grad  # neither kernel has a backward
        kernels = None if wants_grad else cpu_kernels.kernels()
        if kernels is not None and 1 <= count <= cpu_kernels.MAX_ROWS:
            out = self._kernel(kernels, rows)
        elif kernels is not None and count <= KERNEL_ROWS:
            out = torch.cat([self._kernel(kernels, block) for block in rows.split(cpu_kernels.MAX_ROWS)])
        elif 1 <= count <= cpu_kernels.MAX_ROWS and not wants_grad:
            out = self._stock(rows)
        else:
            out = self._dequantized(rows)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def _kernel(self, kernels: Any, rows: torch.Tensor) -> torch.Tensor:
        if self.weights == "int8":
            return kernels.linear_int8(rows, self.weight, self.weight_scale)
        return kernels.linear_int4(rows, self.weight, self.weight_scale, self.weight_zero, self.config["group_size"])

    def _stock(self, rows: torch.Tensor) -> torch.Tensor:
        """PyTorch's weight-only kernels, for CPUs that cannot run parloop's (bf16 activations only)."""
        if rows.dtype != torch.bfloat16 or (self.weights == "int4" and self.out_features % 16):
            return self._dequantized(rows)  # cases the stock kernels do not take
        if self.weights == "int8":
            if self.weight.data_ptr() % 64:  # torch 2.13's int8 kernel crashes on a misaligned weight
                self.weight = self.weight.clone()
            return torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.weight_scale)
        if self._stock_int4 is None:  # aten's own packing of the codes: a second copy of the weight in memory
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                unpack_int4(self.weight, self.config["group_size"]).to(torch.int32), 2)
            scale_zeros = torch.stack([self.weight_scale.t(), self.weight_zero.t()], dim=-1).contiguous()
            self._stock_int4 = (packed, scale_zeros)
        packed, scale_zeros = self._stock_int4
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, self.config["group_size"], scale_zeros)

    def _dequantized(self, rows: torch.Tensor) -> torch.Tensor:
        """Many rows (a prefill): blocks of output rows dequantized, then PyTorch's matrix product."""
        tensors = {name: getattr(self, name) for name in TENSORS[self.weights]}
        return torch.cat([F.linear(rows, dequantize(tensors, self.config, slice(n, n + DEQUANTIZE_ROWS), rows.dtype))
                          for n in range(0, self.out_features, DEQUANTIZE_ROWS)], dim=-1)


def quantized_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the linear products that quantization replaces: every decoder layer's and the head."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, QuantLinear))
            and (name == HEAD or name.rsplit(".", 1)[-1] in LAYER_LINEARS)]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def install_quantized_layers(model: nn.Module, config: dict[str, Any]) -> None:
    """Replace the model's quantizable `nn.Linear`s by empty `QuantLinear`s of `config`'s format (for loading a
    quantized checkpoint: the weights come from the files afterwards)."""
    for name, linear in quantized_linears(model):
        device = linear.weight.device
        _replace(model, name, QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, config,
                                          device=device))


def check_quantizable(model: nn.Module, weights: str, group_size: int) -> dict[str, Any]:
    """The `parloop_quantization` value for quantizing `model`, or `QuantizationError` saying why it cannot be."""
    config = quantization_config(weights, group_size)
    if getattr(model.config, FIELD, None) is not None:
        raise QuantizationError(f"the model is already quantized ({getattr(model.config, FIELD)['weights']}): "
                                "quantize its float checkpoint instead")
    if not hasattr(model.config, FIELD):
        raise QuantizationError(f"{type(model).__name__} does not support quantized weights: only LoopCoder-V2 "
                                "(PLT) models do")
    if weights == "int4":
        sizes = sorted({m.in_features for _, m in quantized_linears(model) if m.in_features % group_size})
        if sizes:
            raise QuantizationError(f"int4 groups of {group_size} do not divide the input sizes {sizes}: pick a "
                                    f"group size from {GROUP_SIZES} that divides them")
    return config


@torch.no_grad()
def quantize_model(model: nn.Module, weights: str, group_size: int = DEFAULT_GROUP_SIZE,
                   dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Quantize a float PLT model in place (returns it, in eval mode, on the CPU), one layer at a time so that
    each float weight can be freed as soon as its quantized copy exists. The head is untied from the embedding.
    `dtype` is what the rest of the model (embedding, norms, gates) and the activations compute in: bfloat16, or
    float32 with int8 weights."""
    config = check_quantizable(model, weights, group_size)
    if dtype not in (torch.bfloat16, torch.float32) or (weights == "int4" and dtype != torch.bfloat16):
        raise QuantizationError(f"{weights} weights compute in bfloat16{' or float32' * (weights == 'int8')}, "
                                f"not {dtype}")
    for name, linear in quantized_linears(model):
        _replace(model, name, QuantLinear.from_linear(linear, config))
    for param in model.parameters():  # not model.to(): that would also round RoPE's float32 frequencies
        param.data = param.data.to(dtype)
    setattr(model.config, FIELD, config)
    model.config.tie_word_embeddings = False
    model.config.dtype = dtype
    return model.eval()

"""Weight-only quantization for CPU decoding: int8 per output channel, int4 in groups (design §4c).

A decode step reads every weight once per token, so its time is the weights' bytes over the memory bandwidth:
8-bit weights halve it, 4-bit weights (plus a bf16 scale and zero per group of `group_size` inputs) nearly quarter
it. The products run on PyTorch's own CPU kernels, `aten._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu`,
which take the R stacked rows of a `parallel` decode step in one call (the weight is read once for all of them).
Activations stay bfloat16: those are the kernels' fast path (float32 activations run 10-20x slower in torch 2.13).

The weights of every decoder layer's linear products (q/k/v/o, gate/up/down) and of the output head are quantized;
the embedding (one row read per token), norms and G-SWA gates stay as they are.

On disk a quantized checkpoint is an ordinary model directory whose `config.json` carries `parloop_quantization`
and whose quantized layers `X` hold `X.weight` (int8 `[N, K]`, or uint8 `[N, K/2]` in the int4 kernel's packed
layout) and `X.weight_scale` (`[N]`, int8) or `X.weight_scale_zeros` (`[K/group, N, 2]`, int4), all loaded by
`from_pretrained` without a copy.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

FORMATS = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128  # int4: inputs sharing a scale and zero (the common choice of GPTQ/AWQ/llama.cpp Q4)
GROUP_SIZES = (32, 64, 128, 256)
# the linear products quantized: each decoder layer's, and the output head
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HEAD = "lm_head"
FIELD = "parloop_quantization"  # the config.json field


class QuantizationError(ValueError):
    """A quantization request or quantized checkpoint that cannot work; the message says what to change."""


def int4_layout_fingerprint() -> str:
    """A hash of this torch's CPU int4 packed layout, stored in a checkpoint: the layout is the kernel's own
    (so loading needs no repacking) and a torch or CPU that packs differently must not read it as the same."""
    generator = torch.Generator().manual_seed(0)
    digest = hashlib.sha256()
    for n, k in ((64, 64), (48, 128)):
        values = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=generator)
        digest.update(torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 2).numpy().tobytes())
    return digest.hexdigest()[:16]


def quantization_config(weights: str, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, Any]:
    """The `parloop_quantization` value of a checkpoint quantized to `weights`."""
    if weights not in FORMATS:
        raise QuantizationError(f"weights {weights!r} is not a quantized format: use one of {', '.join(FORMATS)}")
    if weights == "int8":
        return {"weights": "int8", "version": 1}
    if group_size not in GROUP_SIZES:
        raise QuantizationError(f"group size {group_size} is not supported: use one of {GROUP_SIZES}")
    return {"weights": "int4", "version": 1, "group_size": group_size, "int4_layout": int4_layout_fingerprint()}


def check_quantization_config(value: Any) -> None:
    """Raise `QuantizationError` naming what is wrong with a `parloop_quantization` value (None is fine)."""
    if value is None:
        return
    if not isinstance(value, dict) or value.get("weights") not in FORMATS or value.get("version") != 1:
        raise QuantizationError(f"{FIELD} = {value!r} is invalid: it must be written by `parloop quantize` "
                                f"(weights one of {', '.join(FORMATS)}, version 1)")
    if value["weights"] == "int4":
        expected = quantization_config("int4", value.get("group_size", 0))
        if value.get("int4_layout") != expected["int4_layout"]:
            raise QuantizationError(
                f"this int4 checkpoint was packed in a layout ({value.get('int4_layout')}) that this torch "
                f"{torch.__version__} does not use ({expected['int4_layout']}): quantize the float checkpoint "
                "again here with `parloop quantize`")


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
    min..max spread over the 16 levels (the convention of `aten._weight_int4pack_mm_for_cpu`)."""
    n, k = weight.shape
    if n % 16:
        raise QuantizationError(f"the int4 kernel needs output sizes divisible by 16, got a layer of {n}: use int8")
    if k % group_size:
        raise QuantizationError(f"int4 groups of {group_size} do not divide a layer's {k} inputs: pick a "
                                f"--group-size from {GROUP_SIZES} that divides every layer's input size")
    w = weight.detach().float().view(n, k // group_size, group_size)
    low, high = w.amin(-1), w.amax(-1)
    scale = _round_bf16((high - low).clamp(min=1e-12) / 15)
    zero = _round_bf16(low + 8 * scale)
    q = (torch.round((w - zero[..., None]) / scale[..., None]) + 8).clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    scale_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return {"weight": packed, "weight_scale_zeros": scale_zeros}


def quantize_weight(weight: torch.Tensor, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors that replace a float `weight` `[N, K]` in the format of a `parloop_quantization` value."""
    if config["weights"] == "int8":
        return quantize_int8(weight)
    return quantize_int4(weight, config["group_size"])


class QuantLinear(nn.Module):
    """A bias-optional linear product with quantized weights, for inference on a CPU in bfloat16.

    Its buffers are what `quantize_weight` returns (persistent: `state_dict`, `save_pretrained` and
    `from_pretrained` see them under the layer's own name). Any number of rows go through one kernel call.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, config: dict[str, Any],
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, config
        self.weights = config["weights"]
        if self.weights == "int8":
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        else:
            groups = in_features // config["group_size"]
            self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                       device=device))
            self.register_buffer("weight_scale_zeros", torch.empty(groups, out_features, 2, dtype=torch.bfloat16,
                                                                   device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: dict[str, Any]) -> QuantLinear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, config, device="cpu")
        for name, tensor in quantize_weight(linear.weight, config).items():
            setattr(module, name, tensor)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)
        return module.eval()

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
        if x.dtype != torch.bfloat16:
            raise QuantizationError(f"a model with quantized weights computes in bfloat16, got {x.dtype} "
                                    "activations (torch's CPU kernels are fast only there): load it with "
                                    "dtype=torch.bfloat16 or 'auto' (--dtype auto or bfloat16)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._refuse(x)
        if self.weight.data_ptr() % 64:  # the int8 kernel crashes on a misaligned weight (see quant_checkpoint)
            self.weight = self.weight.clone()
        rows = x.reshape(-1, self.in_features)
        if self.weights == "int8":
            out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.weight_scale)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight, self.config["group_size"],
                                                              self.weight_scale_zeros)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)


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
        outputs = sorted({m.out_features for _, m in quantized_linears(model) if m.out_features % 16})
        if outputs:
            raise QuantizationError(f"the int4 kernel needs output sizes divisible by 16, and this model has "
                                    f"{outputs} (vocab_size?): use int8")
    return config


@torch.no_grad()
def quantize_model(model: nn.Module, weights: str, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Quantize a float PLT model in place (returns it, in eval mode, on the CPU), one layer at a time so that
    each float weight can be freed as soon as its quantized copy exists. The head is untied from the embedding."""
    config = check_quantizable(model, weights, group_size)
    for name, linear in quantized_linears(model):
        _replace(model, name, QuantLinear.from_linear(linear, config))
    for param in model.parameters():  # not model.to(): that would also round RoPE's float32 frequencies
        param.data = param.data.to(torch.bfloat16)
    setattr(model.config, FIELD, config)
    model.config.tie_word_embeddings = False
    model.config.dtype = torch.bfloat16
    return model.eval()

"""The layers of PLT in vLLM: the G-SWA gate, attention over vLLM's paged KV cache, and the decoder block.

Hidden states are `[S * N, d]`: S loop streams of the step's N tokens, stream-major. S = 1 when the loops run one
after another; S = R in a one-pass decode step, where every weight sees all R streams in one matmul
(docs/design.md §3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import CacheConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.model_loader.weight_utils import sharded_weight_loader
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.utils import set_weight_attrs

from parloop import plt
from parloop.config import PLTConfig


def layer_prefix(model_prefix: str, index: int, rest: str) -> str:
    """A module name with exactly one integer, as vLLM needs to order the KV caches of attention layers."""
    return f"{model_prefix}.layers.{index}.{rest}"


class VllmPLTGate(nn.Module):
    """The G-SWA gate g in (0, 1) per head, the weight of the global branch (docs/design.md §2): from the post-RoPE
    query (`sigmoid(q . w[h] + b[h])`) or from the block input before input_layernorm
    (`sigmoid(w @ gate_norm(h_in) + b)[h]`). Tensor parallelism splits it by heads, like the attention."""

    def __init__(self, config: PLTConfig) -> None:
        super().__init__()
        heads = config.num_attention_heads // get_tensor_model_parallel_world_size()
        self.use_hidden_states = config.plt_gate_use_hidden_states
        in_dim = config.hidden_size if self.use_hidden_states else config.head_dim
        self.weight = nn.Parameter(torch.empty(heads, in_dim))
        self.bias = nn.Parameter(torch.empty(heads))
        for param in (self.weight, self.bias):
            set_weight_attrs(param, {"weight_loader": sharded_weight_loader(0)})
        if self.use_hidden_states:
            self.gate_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, q: torch.Tensor, h_in: torch.Tensor) -> torch.Tensor:
        """q `[N, heads, hd]`, h_in `[N, d]` -> g `[N, heads, 1]`."""
        if self.use_hidden_states:
            logits = F.linear(self.gate_norm(h_in), self.weight, self.bias)
        else:
            logits = torch.einsum("nhd,hd->nh", q, self.weight) + self.bias
        return torch.sigmoid(logits)[..., None]


class VllmPLTAttention(nn.Module):
    """Loop 0: causal attention over the paged full cache (`attn`). Loop r >= 1: G-SWA, the global branch reading
    `attn`'s cache without writing it, the local branch over loop r's own sliding-window cache (`local[r-1]`)."""

    def __init__(self, config: PLTConfig, cache_config: CacheConfig | None, quant_config: QuantizationConfig | None,
                 layer_index: int, model_prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        hd, loops, layers = config.head_dim, config.plt_num_loops, config.num_hidden_layers
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads // tp, \
            max(1, config.num_key_value_heads // tp), hd
        prefix = layer_prefix(model_prefix, layer_index, "self_attn")
        self.qkv_proj = QKVParallelLinear(config.hidden_size, hd, config.num_attention_heads,
                                          config.num_key_value_heads, bias=config.attention_bias,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(config.num_attention_heads * hd, config.hidden_size,
                                        bias=config.attention_bias, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(hd, max_position=config.max_position_embeddings, is_neox_style=True,
                                   rope_parameters=config.rope_parameters)
        common = dict(num_kv_heads=self.kv_heads, cache_config=cache_config, quant_config=quant_config)
        self.attn = Attention(self.heads, hd, hd ** -0.5, prefix=f"{prefix}.attn", **common)
        # `[W, 0]` (keys t-W..t) is a window of W + 1 in vLLM
        self.local = nn.ModuleList(
            Attention(self.heads, hd, hd ** -0.5, per_layer_sliding_window=config.window + 1,
                      prefix=layer_prefix(model_prefix, r * layers + layer_index, "self_attn.local"), **common)
            for r in range(1, loops))
        if plt.uses_gate(config):
            self.plt_gate = VllmPLTGate(config)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, h_in: torch.Tensor, first_loop: int,
                streams: int) -> torch.Tensor:
        """x: normed block input `[S * N, d]` of loops first_loop..first_loop+S-1; h_in: the same before the norm;
        positions `[S * N]`: every stream's tokens have their token's position."""
        qkv, _ = self.qkv_proj(x)
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        n = positions.shape[0] // streams
        # stream 0 of a one-pass step is loop 0: it writes this token's K0/V0 before the other loops read them
        outs = [self._attend(first_loop + s, q[s * n:(s + 1) * n], k[s * n:(s + 1) * n], v[s * n:(s + 1) * n],
                             h_in[s * n:(s + 1) * n]) for s in range(streams)]
        out, _ = self.o_proj(outs[0] if streams == 1 else torch.cat(outs))
        return out

    def _attend(self, loop: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h_in: torch.Tensor) -> torch.Tensor:
        if loop == 0:
            return self.attn(q, k, v)
        n = q.shape[0]
        shape = (n, self.heads, self.head_dim)
        global_out = self.attn(q, None, None).view(shape)
        local_out = self.local[loop - 1](q, k, v).view(shape)
        g = self.plt_gate(q.reshape(shape), h_in)
        return torch.lerp(local_out, global_out, g).reshape(n, -1)  # g * global + (1 - g) * local


class VllmPLTDecoderLayer(nn.Module):
    """A pre-norm Llama block whose attention is `VllmPLTAttention`."""

    def __init__(self, config: PLTConfig, cache_config: CacheConfig | None, quant_config: QuantizationConfig | None,
                 layer_index: int, model_prefix: str) -> None:
        super().__init__()
        self.self_attn = VllmPLTAttention(config, cache_config, quant_config, layer_index, model_prefix)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act, quant_config=quant_config,
                            bias=config.mlp_bias, prefix=layer_prefix(model_prefix, layer_index, "mlp"))
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, first_loop: int, streams: int) -> torch.Tensor:
        h = h + self.self_attn(positions, self.input_layernorm(h), h, first_loop, streams)
        return h + self.mlp(self.post_attention_layernorm(h))

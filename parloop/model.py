"""The Parallel Loop Transformer (design §1-2) in one file.

A stack of Llama blocks is applied R times ("loops"). Loop 0 is an ordinary causal transformer over the token
embeddings E. Loop r >= 1 reads `a * E[t] + b * H[r-1][t-1]`: the previous loop's state one token EARLIER (the
cross-loop offset). Its attention is shared-KV gated sliding-window attention (G-SWA): a global branch over loop 0's
keys/values of the same layer, a local branch over its own keys in a window of W+1, mixed by a learned gate.

Because of the offset, when token t is decoded every loop's input is already known, so a decode step runs all R
loops as R stacked "streams" through each layer once (`_decode_stacked`); the weights are read once per token.

Hidden states inside the layers are `[B, S, T, d]`: S loop streams (1 when loops run one after another over a
chunk of T tokens; R in a stacked decode step, where T = 1) over T positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from parloop import plt
from parloop.attention import attend
from parloop.cache import ForwardKV, KVStore, PLTCache, StoreCall
from parloop.checkpoint import load_strict
from parloop.compile import compile_step
from parloop.config import PLTConfig
from parloop.quant import install_quantized_layers

# Keyword arguments of the causal-LM loss (transformers' `ForCausalLMLoss`), which `PLTForCausalLM.forward` hands
# to it as Llama does: gradient accumulation's token count, pre-shifted labels, the label to ignore.
LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")
# Keyword arguments that transformers passes to a forward call and that change nothing in the model: parloop tracks
# cache slots itself (`cache_position`), the loss count belongs to the loss, and `generate()` forwards its
# generation-mode arguments (the tokenizers of stop strings and assisted decoding,
# `GenerationMixin._extract_generation_mode_kwargs`) to every call.
IGNORED_KWARGS = {"cache_position", "num_items_in_batch", "tokenizer", "assistant_tokenizer"}


class PLTRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in fp32 and cast back before the weight, exactly as Llama does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class PLTRotaryEmbedding(nn.Module):
    """RoPE with a cos/sin table built once and extended only when a longer position shows up."""

    def __init__(self, config: PLTConfig) -> None:
        super().__init__()
        self.config = config
        inv_freq, self.scaling = self.compute_inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_table", torch.empty(0), persistent=False)
        self.register_buffer("sin_table", torch.empty(0), persistent=False)

    def compute_inv_freq(self) -> tuple[torch.Tensor, float]:
        config = self.config
        rope_type = config.rope_parameters.get("rope_type", "default")
        if rope_type == "default":
            theta, dim = config.rope_parameters["rope_theta"], config.head_dim
            return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
        if rope_type in ROPE_INIT_FUNCTIONS and rope_type != "dynamic":
            return ROPE_INIT_FUNCTIONS[rope_type](config, None)
        raise ValueError(f"PLTConfig.rope_parameters rope_type = {rope_type!r} is not supported: use one of "
                         f"default, {', '.join(t for t in ROPE_INIT_FUNCTIONS if t != 'dynamic')}")

    def _extend(self, length: int) -> None:
        length = max(length, 2 * self.cos_table.shape[0], 256)
        freqs = torch.arange(length, device=self.inv_freq.device, dtype=torch.float32)[:, None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos_table = emb.cos() * self.scaling
        self.sin_table = emb.sin() * self.scaling

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype,
                bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[B, 1, 1, T, hd]`, broadcastable over streams and heads. `bound` (> every position) spares
        reading the positions back from the GPU, which would stall every decode step."""
        needed = bound if bound is not None else int(position_ids.max()) + 1 if position_ids.numel() else 1
        if needed > self.cos_table.shape[0] or self.cos_table.device != position_ids.device:
            self._extend(needed)
        cos = self.cos_table[position_ids].to(dtype)[:, None, None]
        sin = self.sin_table[position_ids].to(dtype)[:, None, None]
        return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class PLTMLP(nn.Module):
    def __init__(self, config: PLTConfig) -> None:
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PLTGate(nn.Module):
    """The G-SWA gate g in (0, 1) per head: weight on the global (shared-KV) branch.

    Query gate: `g = sigmoid(q . w[h] + b[h])` with the post-RoPE query of head h.
    Hidden-state gate: `g = sigmoid(w @ gate_norm(h_in) + b)[h]` with the block input before input_layernorm.
    """

    linear: Callable[..., torch.Tensor] = staticmethod(F.linear)  # parloop.kernels.use_few_row_kernels swaps it

    def __init__(self, config: PLTConfig) -> None:
        super().__init__()
        self.use_hidden_states = config.plt_gate_use_hidden_states
        in_dim = config.hidden_size if self.use_hidden_states else config.head_dim
        self.weight = nn.Parameter(torch.empty(config.num_attention_heads, in_dim))
        self.bias = nn.Parameter(torch.zeros(config.num_attention_heads))
        if self.use_hidden_states:
            self.gate_norm = PLTRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, q: torch.Tensor, h_in: torch.Tensor) -> torch.Tensor:
        """q `[B, S, H, T, hd]`, h_in `[B, S, T, d]` -> g `[B, S, H, T, 1]`."""
        if self.use_hidden_states:
            logits = self.linear(self.gate_norm(h_in), self.weight, self.bias).transpose(-1, -2)
        else:
            logits = torch.einsum("bshtd,hd->bsht", q, self.weight) + self.bias[:, None]
        return torch.sigmoid(logits)[..., None]


@dataclass
class AttentionRecord:
    """What one attention call computed, handed to an attention probe (diagnostics, attention weights)."""

    layer: int
    first_loop: int  # the call's streams are loops first_loop .. first_loop + S - 1
    queries: torch.Tensor  # [B, S, H, T, hd] post-RoPE
    keys: torch.Tensor  # [B, Hkv, Tk, hd] post-RoPE keys of the global branch (loop 0's; own full cache ungated)
    mask: torch.Tensor  # [B, 1, T, Tk] which of those keys each query may attend to
    gate: torch.Tensor | None  # [B, S', H, T, 1] G-SWA gate of the streams of loops >= 1 (None when ungated)


class PLTAttention(nn.Module):
    def __init__(self, config: PLTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        d, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=bias)
        self.layout = config.loop_layout
        if plt.builds_gate(config):  # at R = 1 too, unused (parloop.plt)
            self.plt_gate = PLTGate(config)
        self.probe: Callable[[AttentionRecord], None] | None = None  # see PLTModel.set_attention_probe

    def forward(self, x: torch.Tensor, h_in: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                first_loop: int, call: StoreCall) -> torch.Tensor:
        """x: normed block input `[B, S, T, d]` of loops first_loop..first_loop+S-1; h_in: the same before the norm."""
        B, S, T, _ = x.shape
        step = call.step
        H, Hkv, hd, layer = self.num_heads, self.num_kv_heads, self.head_dim, self.layer_idx
        q = apply_rope(self.q_proj(x).view(B, S, T, H, hd).transpose(2, 3), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, S, T, Hkv, hd).transpose(2, 3), cos, sin)
        v = self.v_proj(x).view(B, S, T, Hkv, hd).transpose(2, 3)

        g = None
        if not self.layout.gated:
            # R = 1, or vanilla looped (`sequential`): plain causal attention over this loop's own full cache
            keys, values = call.append(layer, self.layout.full_cache_of(first_loop), k[:, 0], v[:, 0])
            out = attend(q[:, 0], keys, values, step.global_mask)[:, None]
        else:
            # Global branch: every stream attends to loop 0's keys of this layer. Loop 0's stream writes them
            # first; streams are folded into the query rows (with T = 1 or S = 1 the mask broadcasts).
            if first_loop == 0:
                keys, values = call.append(layer, 0, k[:, 0], v[:, 0])
            else:
                keys, values = call.read(layer, 0)
            rows = q.transpose(1, 2).reshape(B, H, S * T, hd)
            out = attend(rows, keys, values, step.global_mask).view(B, H, S, T, hd).transpose(1, 2)

            # Local branch of loops >= 1: each loop's own keys, t-W..t. Streams are folded into the head axis so
            # one call serves all loops (query head s*H+h maps to KV head s*Hkv + h // (H/Hkv)).
            lo = 1 if first_loop == 0 else 0
            if lo < S:
                n = S - lo
                qs = q[:, lo:]
                wk, wv = call.window(layer, first_loop + lo, k[:, lo:], v[:, lo:])
                local = attend(qs.reshape(B, n * H, T, hd), wk.reshape(B, n * Hkv, -1, hd),
                               wv.reshape(B, n * Hkv, -1, hd), step.local_mask).view(B, n, H, T, hd)
                g = self.plt_gate(qs, h_in[:, lo:])
                mixed = g * out[:, lo:] + (1 - g) * local
                out = mixed if lo == 0 else torch.cat([out[:, :1], mixed], dim=1)
        if self.probe is not None:
            self.probe(AttentionRecord(layer, first_loop, q, keys, step.global_mask, g))
        return self.o_proj(out.transpose(2, 3).reshape(B, S, T, H * hd))


class PLTDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: PLTConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = PLTAttention(config, layer_idx)
        self.mlp = PLTMLP(config)
        self.input_layernorm = PLTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = PLTRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, first_loop: int,
                call: StoreCall) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), h, cos, sin, first_loop, call)
        return h + self.mlp(self.post_attention_layernorm(h))


@dataclass
class PLTModelOutput(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus, on request, the state after each loop (`[B, T, d]` each, before any norm)."""

    loop_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class PLTOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus, on request, the state after each loop (`[B, T, d]` each, before any norm)."""

    loop_states: tuple[torch.Tensor, ...] | None = None


class PLTPreTrainedModel(PreTrainedModel):
    config_class = PLTConfig
    config: PLTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PLTDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def _check_and_adjust_attn_implementation(self, attn_implementation: str | None, is_init_check: bool = False,
                                              allow_all_kernels: bool = False) -> str:
        # G-SWA needs its own kernel calls (parloop/attention.py, through torch SDPA); a backend named here would be
        # ignored, so a request for one is refused rather than silently not honoured.
        if attn_implementation not in (None, "sdpa"):
            raise ValueError(
                f"attn_implementation={attn_implementation!r} is not supported: parloop's attention always runs "
                "through torch's scaled_dot_product_attention ('sdpa'), whose results equal the eager "
                "softmax(q k^T) v. Leave attn_implementation unset (or 'sdpa'); for attention maps use "
                "PLTModel.set_attention_probe.")
        return "sdpa"

    def num_used_parameters(self) -> int:
        """Parameters the forward pass uses: an R = 1 model keeps G-SWA gate weights (as the released code writes
        them) that it never applies."""
        unused = plt.unused_gate(self.config)
        return sum(p.numel() for name, p in self.named_parameters() if not (unused and plt.is_gate_weight(name)))

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, PLTRotaryEmbedding):  # non-persistent buffers: rebuilt after a meta-device load
            init.copy_(module.inv_freq, module.compute_inv_freq()[0])
            module.cos_table = module.sin_table = torch.empty(0, device=module.inv_freq.device)
        if isinstance(module, PLTGate):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.bias)


class PLTModel(PLTPreTrainedModel):
    def __init__(self, config: PLTConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(PLTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = PLTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = PLTRotaryEmbedding(config)
        self.compiled_layers = None  # set by PLTForCausalLM.compile_decode
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def set_attention_probe(self, probe: Callable[[AttentionRecord], None] | None) -> None:
        """Call `probe` with an `AttentionRecord` after every attention call (None removes it)."""
        for layer in self.layers:
            layer.self_attn.probe = probe

    def _layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, first_loop: int, call: StoreCall,
                collect: list[torch.Tensor] | None) -> torch.Tensor:
        if self.compiled_layers is not None and call.step.static and h.shape[2] == 1 and collect is None:
            return self.compiled_layers(h, cos, sin, first_loop, call)
        return self.run_layers(h, cos, sin, first_loop, call, collect)

    def run_layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, first_loop: int, call: StoreCall,
                   collect: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The layer stack over streams `[B, S, T, d]`; each layer's output is appended to `collect` if given."""
        for layer in self.layers:
            h = layer(h, cos, sin, first_loop, call)
            if collect is not None:
                collect.append(h)
        return h

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: PLTCache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_loop_states: bool = False, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> PLTModelOutput | tuple:
        """The final loop's normed hidden states `[B, T, d]`, the cache, and on request the loop states and the
        hidden states. `hidden_states` has `1 + R * L` entries: the embeddings, then the output of every layer in
        every loop (loop 0's L layers first, then loop 1's, ...), the last one replaced by the final normed state,
        as for Llama. `loop_states` has R entries: the state after each loop, before any norm."""
        use_cache, hidden, return_dict = self._resolve_flags(kwargs, use_cache, output_hidden_states,
                                                             output_attentions, return_dict, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        emb = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = emb.shape
        cache = PLTCache(self.config, max_length=T) if use_cache and past_key_values is None else past_key_values
        store: KVStore = cache if cache is not None else ForwardKV(self.config)
        call = store.begin(attention_mask, B, T, emb.dtype, emb.device)
        bound = None
        if position_ids is None:  # our positions count real tokens, so they stay below the slot count
            position_ids, bound = call.step.position_ids, call.step.start + T
        cos, sin = self.rotary_emb(position_ids, emb.dtype, bound)

        collect = [] if hidden else None
        if cache is not None and T == 1 and self.config.loop_layout.offset:
            h, states = self._decode_stacked(emb, cos, sin, call, collect)
        else:
            h, states = self._loops_one_by_one(emb, cos, sin, call, collect)
        out = PLTModelOutput(last_hidden_state=self.norm(h), past_key_values=cache,
                             hidden_states=(emb, *collect[:-1], self.norm(h)) if hidden else None,
                             loop_states=tuple(states) if output_loop_states else None)
        return out if return_dict else out.to_tuple()

    def _resolve_flags(self, kwargs: dict, use_cache: bool | None, output_hidden_states: bool | None,
                       output_attentions: bool | None, return_dict: bool | None,
                       cache: object) -> tuple[bool, bool, bool]:
        """The call's options, defaulting to the config as in transformers, and refusals of what cannot work."""
        unknown = set(kwargs) - IGNORED_KWARGS
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward got unexpected keyword arguments: {sorted(unknown)}")
        if cache is not None and not isinstance(cache, PLTCache):
            raise TypeError(f"past_key_values is a {type(cache).__name__}, but a PLT model keeps loop 0's keys, the "
                            "window rings and the cross-loop carries: pass a parloop.PLTCache(model.config) or None")
        if output_attentions if output_attentions is not None else self.config.output_attentions:
            raise ValueError("output_attentions is not supported: loops r >= 1 mix two attention distributions "
                             "(global over loop 0's keys, local over a window) through a gate, so there is no single "
                             "attention matrix per layer. Use PLTModel.set_attention_probe(fn) to receive each call's "
                             "queries, keys, mask and gate, or `parloop eval --task loop-diagnostics`.")
        if use_cache is None:
            checkpointing = self.training and any(layer.gradient_checkpointing for layer in self.layers)
            use_cache = self.config.use_cache and not checkpointing
        hidden = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return bool(use_cache), bool(hidden), self.config.return_dict if return_dict is None else return_dict

    def _loops_one_by_one(self, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, call: StoreCall,
                          collect: list[torch.Tensor] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Training, prefill and the sequential modes: loop r runs over the whole chunk after loop r-1."""
        states = []
        h = self._layers(emb[:, None], cos, sin, 0, call, collect)[:, 0]
        states.append(h)
        for r in range(1, self.config.plt_num_loops):
            prev = plt.handoff(h, self.norm, self.config)
            if self.config.loop_layout.offset:
                # the offset: loop r at t reads loop r-1 at t-1; the carry is loop r-1's state at the slot before
                # this chunk (zero at the start); a pad slot before a token contributes nothing.
                loops = slice(r - 1, r)
                carried = call.read_carries(loops).transpose(0, 1)
                shifted = torch.cat([carried, prev[:, :-1]], dim=1) * call.step.prev_valid
                call.write_carries(loops, prev[None])  # after the read: a cache hands out views
                prev = shifted
            h = self._layers(plt.loop_input(emb, prev, self.config)[:, None], cos, sin, r, call, collect)[:, 0]
            states.append(h)
        if collect is not None:
            collect[:] = [c[:, 0] for c in collect]
        return h, states

    def _decode_stacked(self, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, call: StoreCall,
                        collect: list[torch.Tensor] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One new token in `parallel` mode: all R loops as R streams through each layer once.

        Loop r's input a*E[t] + b*H[r-1][t-1] needs only the carry from the previous step, so the streams are
        independent within the step. Afterwards stream r (< R-1) becomes the carry for loop r+1.
        """
        every = slice(None)
        carries = call.read_carries(every)[:, :, None].transpose(0, 1)  # [B, R-1, 1, d]
        carried = plt.loop_input(emb[:, None], carries * call.step.prev_valid[:, None], self.config)
        streams = torch.cat([emb[:, None], carried], dim=1)  # [B, R, 1, d]
        h = self._layers(streams, cos, sin, 0, call, collect)
        call.write_carries(every, plt.handoff(h[:, :-1], self.norm, self.config).transpose(0, 1))
        if collect is not None:  # per layer [B, R, 1, d] -> loop-major, like the one-by-one order
            collect[:] = [c[:, r] for r in range(h.shape[1]) for c in collect]
        return h[:, -1], list(h.unbind(1))


class PLTForCausalLM(PLTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> PLTForCausalLM:  # type: ignore[override]
        """`PreTrainedModel.from_pretrained`, but strict: a missing, unexpected or wrongly shaped weight raises
        `CheckpointError` naming it, instead of being randomly initialised or dropped with a warning."""
        return load_strict(super().from_pretrained, *args, **kwargs)

    def __init__(self, config: PLTConfig) -> None:
        super().__init__(config)
        self.model = PLTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.parloop_quantization is not None:  # a quantized checkpoint: its layers' buffers come from the files
            install_quantized_layers(self, config.parloop_quantization)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: PLTCache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                output_loop_states: bool = False, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None, **kwargs) -> PLTOutput | tuple:
        """Logits of the final loop, and the shifted next-token cross-entropy when `labels` are given (-100 is
        ignored), like any causal LM in `transformers`. See `PLTModel.forward` for the other outputs."""
        loss_kwargs = {k: kwargs.pop(k) for k in LOSS_KWARGS if k in kwargs}
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_loop_states, output_hidden_states, output_attentions, return_dict=True, **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        result = PLTOutput(loss=loss, logits=logits, past_key_values=out.past_key_values,
                           hidden_states=out.hidden_states, loop_states=out.loop_states)
        return result if (self.config.return_dict if return_dict is None else return_dict) else result.to_tuple()

    def compile_decode(self, **compile_kwargs) -> None:
        """Compile the layer stack of one-token steps with `torch.compile`. It is used when decoding with a
        `PLTCache(static=True)` (or `generate(..., cache_implementation="static")`), whose shapes never change."""
        self.model.compiled_layers = compile_step(self.model.run_layers, **compile_kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, generation_mode,
                                      batch_size: int, max_cache_length: int) -> None:
        # generate() would otherwise build a DynamicCache; ours is sized for the whole generation up front.
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic", "static"):
                raise ValueError(f"cache_implementation={generation_config.cache_implementation!r} is not supported: "
                                 "a PLT model decodes with parloop's PLTCache, 'dynamic' (grows) or 'static' "
                                 "(preallocated, for compile_decode)")
            static = generation_config.cache_implementation == "static"
            model_kwargs["past_key_values"] = PLTCache(self.config, max_length=max_cache_length, static=static)
            if generation_config.is_assistant:  # the main model will crop away the drafts it rejects
                model_kwargs["past_key_values"].activate_past_recording()
            return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                              max_cache_length)

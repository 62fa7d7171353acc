"""The models a bench run times: PLT models that all share the R = 1 weights, and `transformers`' Llama with the
same weights as the reference."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM

from parloop import plt
from parloop.config import PLTConfig
from parloop.model import PLTForCausalLM

# the PLTConfig fields that LlamaConfig shares under the same names
_LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "max_position_embeddings",
                 "tie_word_embeddings", "attention_bias", "mlp_bias")


def plt_config(shape: dict[str, int], loops: int, mode: str, window: int, max_length: int) -> PLTConfig:
    return PLTConfig(**shape, tie_word_embeddings=True, plt_num_loops=loops, plt_loop_mode=mode,
                     plt_window_size=[window, 0], max_position_embeddings=max(4096, max_length))


def build_plt(config: PLTConfig, base_state: dict[str, torch.Tensor] | None, seed: int) -> PLTForCausalLM:
    """A model of `config` with the weights of `base_state` (the R = 1 model); gates are seeded by R."""
    torch.manual_seed(seed + 1000 * config.plt_num_loops)
    model = PLTForCausalLM(config)
    if base_state is not None:
        shared = {k: v for k, v in base_state.items() if not plt.is_gate_weight(k)}  # R = 1 carries an unused gate
        missing, unexpected = model.load_state_dict(shared, strict=False)
        not_gates = [k for k in missing if not plt.is_gate_weight(k)]
        if unexpected or not_gates:
            raise RuntimeError(f"R = 1 weights do not fit the {config.plt_loop_mode} R = {config.plt_num_loops} "
                               f"model: missing {not_gates}, unexpected {unexpected}")
    return model.eval()


def build_reference(config: PLTConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """`transformers`' `LlamaForCausalLM` with the weights of an R = 1 PLT model (the names are the same)."""
    llama = LlamaForCausalLM(LlamaConfig(**{k: getattr(config, k) for k in _LLAMA_FIELDS}, attn_implementation="sdpa"))
    llama.load_state_dict({k: v for k, v in state.items() if not plt.is_gate_weight(k)}, strict=True)
    return llama.eval()


class CompiledDecode(nn.Module):
    """`transformers`' own fastest decode for `model`: one-token steps through its compiled call (what `generate`
    uses with a static cache: `torch.compile(mode="reduce-overhead")`, CUDA graphs on a GPU), the prefill eager."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.compiled = model.get_compiled_call(CompileConfig())

    def forward(self, input_ids: torch.Tensor, **kwargs) -> object:
        call = self.compiled if input_ids.shape[1] == 1 else self.model
        return call(input_ids=input_ids, **kwargs)

"""`IQuestPLTCoderForCausalLM` for vLLM: exact PLT (docs/design.md §2) on vLLM's paged KV cache (docs/vllm.md).

A step whose requests all bring exactly one new token (decoding) runs the R loops as R stacked streams through
each layer once: one matmul per weight for all loops, as parloop's own decoder does (docs/design.md §3). Any other
step (a prefill chunk is present) runs the loops one after another over all its tokens, decoding tokens included:
each loop needs the previous loop's states of the chunk's earlier tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.sequence import IntermediateTensors

from parloop import plt
from parloop.config import PLTConfig
from parloop.vllm.handoff import HandoffStore, previous_slots
from parloop.vllm.layers import VllmPLTDecoderLayer

# checkpoint name -> (vLLM parameter, shard): vLLM fuses q/k/v and gate/up into one matmul each
STACKED_PARAMS = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
                  (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1)]


def check_supported(config: PLTConfig, vllm_config: VllmConfig) -> None:
    """Refuse, with the reason, what the plugin does not compute exactly."""
    if config.plt_loop_mode != "parallel":
        raise NotImplementedError(f"plt_loop_mode = {config.plt_loop_mode!r}: parloop's vLLM plugin runs the "
                                  "released PLT ('parallel') only; use parloop's own engine for the other modes")
    if vllm_config.cache_config.cache_dtype != "auto":
        raise NotImplementedError("a quantised KV cache (kv_cache_dtype != 'auto') would also quantise the "
                                  "cross-loop states parloop keeps in the cache pages; use kv_cache_dtype='auto'")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise NotImplementedError("parloop's vLLM plugin does not support pipeline parallelism")


class VllmPLTModel(nn.Module):
    """The decoder stack (embeddings, layers, final norm) and the loop schedule of a vLLM step."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: PLTConfig = vllm_config.model_config.hf_config
        check_supported(config, vllm_config)
        cache, quant = vllm_config.cache_config, vllm_config.quant_config
        self.config = config
        self.loops = config.plt_num_loops
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config=quant,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(VllmPLTDecoderLayer(config, cache, quant, i, prefix)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.handoff = HandoffStore(config, cache, self.loops * config.num_hidden_layers, prefix)
        # False: decode loop by loop, as a fork of vLLM does (kept for the benchmark, parloop.vllm.bench)
        self.one_pass_decode = True

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        if self.loops == 1:
            return self.norm(self._layers(positions, emb, 0, 1))
        metadata = self.handoff.metadata()
        if metadata is None:  # vLLM's dummy runs (memory profiling, warm-up): no cache, zero carries
            return self.norm(self._loop_by_loop(positions, emb, None))
        if self.one_pass_decode and metadata.max_query_len == 1:
            return self.norm(self._one_pass(positions, emb, metadata))
        return self.norm(self._loop_by_loop(positions, emb, metadata))

    def _layers(self, positions: torch.Tensor, h: torch.Tensor, first_loop: int, streams: int) -> torch.Tensor:
        positions = positions.repeat(streams) if streams > 1 else positions
        for layer in self.layers:
            h = layer(positions, h, first_loop, streams)
        return h

    def _carry(self, loop: int, emb: torch.Tensor, prev: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """H[loop][t-1] for every token t of the step (zero at a request's first position and on padding rows);
        `prev` is `previous_slots` of the step."""
        carry = torch.zeros_like(emb)
        if prev is not None:
            slots, has_prev = prev
            # where, not a product: a page never written may hold NaN
            carry[:len(slots)] = torch.where(has_prev[:, None], self.handoff.read(loop, slots).to(emb.dtype), 0.0)
        return carry

    def _store(self, loop: int, h: torch.Tensor, metadata: object | None) -> None:
        if metadata is not None:
            n = metadata.num_actual_tokens
            self.handoff.write(loop, plt.handoff(h[:n], self.norm, self.config), metadata.slot_mapping[:n].long())

    def _previous(self, positions: torch.Tensor, metadata: object | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if metadata is None else previous_slots(metadata, positions, self.handoff.block_size)

    def _loop_by_loop(self, positions: torch.Tensor, emb: torch.Tensor, metadata: object | None) -> torch.Tensor:
        """Prefill (and mixed steps): loop r runs over all the step's tokens after loop r-1 has stored its states,
        so that loop r at token t reads H[r-1][t-1] from the store, inside the chunk or before it alike."""
        prev = self._previous(positions, metadata)
        h = self._layers(positions, emb, 0, 1)
        for r in range(1, self.loops):
            self._store(r - 1, h, metadata)
            h = self._layers(positions, plt.loop_input(emb, self._carry(r - 1, emb, prev), self.config), r, 1)
        return h

    def _one_pass(self, positions: torch.Tensor, emb: torch.Tensor, metadata: object) -> torch.Tensor:
        """A decode step: loop r's input a*E[t] + b*H[r-1][t-1] needs only stored states, so the R loops run as R
        stacked streams through each layer once; streams 0..R-2 then store their states for the next token."""
        prev = self._previous(positions, metadata)
        n = emb.shape[0]
        streams = [emb] + [plt.loop_input(emb, self._carry(r, emb, prev), self.config)
                           for r in range(self.loops - 1)]
        h = self._layers(positions, torch.cat(streams), 0, self.loops)
        for r in range(self.loops - 1):
            self._store(r, h[r * n:(r + 1) * n], metadata)
        return h[(self.loops - 1) * n:]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint names of docs/design.md §4; q/k/v and gate/up go into vLLM's fused parameters."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        skip_gates = plt.unused_gate(self.config)  # R = 1: the released code's gates are never applied
        for name, tensor in weights:
            if skip_gates and plt.is_gate_weight(name):
                continue
            for fused, part, shard in STACKED_PARAMS:
                if part in name:
                    target = name.replace(part, fused)
                    params[target].weight_loader(params[target], tensor, shard)
                    break
            else:
                target = name
                param = params[target]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(target)
        return loaded


class VllmPLTForCausalLM(nn.Module):
    """The architecture `IQuestPLTCoderForCausalLM` (LoopCoder-V2's checkpoint format, docs/design.md §4)."""

    # which checkpoint weights vLLM's fused layers hold, for quantisation methods that look them up
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: PLTConfig = vllm_config.model_config.hf_config
        self.config = config
        self.model = VllmPLTModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.config.tie_word_embeddings:  # the head is the embedding; a saved copy of it is redundant
            weights = ((name, w) for name, w in weights if not name.startswith("lm_head."))
        return AutoWeightsLoader(self).load_weights(weights)

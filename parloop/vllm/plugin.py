"""The `vllm.general_plugins` entry point: make vLLM load `IQuestPLTCoderForCausalLM` checkpoints."""

from __future__ import annotations

from transformers import AutoConfig
from vllm import ModelRegistry

from parloop.config import RELEASED_ARCHITECTURE, PLTConfig

# a string, so that vLLM imports the model (and torch's heavy modules) only when such a checkpoint is loaded
MODEL_CLASS = "parloop.vllm.model:VllmPLTForCausalLM"


def register() -> None:
    """Register the config type with `transformers` and the architecture with vLLM; safe to call repeatedly (vLLM
    calls it in every process it starts)."""
    AutoConfig.register(PLTConfig.model_type, PLTConfig, exist_ok=True)
    if RELEASED_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(RELEASED_ARCHITECTURE, MODEL_CLASS)

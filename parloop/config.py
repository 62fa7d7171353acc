"""PLTConfig: the Llama fields plus the Parallel Loop Transformer fields of LoopCoder-V2's config.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from parloop.quant import QuantizationError, check_quantization_config

LOOP_MODES = ("parallel", "sequential_shared", "sequential")
RELEASED_ARCHITECTURE = "IQuestPLTCoderForCausalLM"
RELEASED_EOS_TOKEN_IDS = (2, 75864, 75869)  # the released config class's default


@dataclass(frozen=True)
class LoopLayout:
    """Which buffers and mechanisms each loop uses, derived once from the config (design §2, the loop-mode table).

    Everything that depends on the loop mode (model, cache, cache-less training store) reads it from here.
    """

    loops: int  # R
    full_cache_loops: int  # loops that keep a full KV cache: every loop in `sequential`, else loop 0 only
    window_loops: int  # loops r >= 1 with G-SWA (a window ring of their own): R-1, or 0 (R = 1 or `sequential`)
    offset: bool  # loop r at t reads loop r-1 at t-1 (`parallel`): R-1 carried states, one-pass decode steps

    @classmethod
    def of(cls, mode: str, loops: int) -> LoopLayout:
        gswa = loops > 1 and mode != "sequential"
        return cls(loops=loops, full_cache_loops=loops if mode == "sequential" else 1,
                   window_loops=loops - 1 if gswa else 0, offset=loops > 1 and mode == "parallel")

    @property
    def gated(self) -> bool:
        """Loops r >= 1 use G-SWA (global over loop 0's keys + own window, mixed by the gate)."""
        return self.window_loops > 0

    @property
    def carry_loops(self) -> int:
        return self.loops - 1 if self.offset else 0

    def full_cache_of(self, loop: int) -> int:
        """Index of the full cache that `loop` writes and reads when it is not G-SWA."""
        return loop if self.full_cache_loops > 1 else 0


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field, the value and what is allowed."""


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"PLTConfig.{field} = {value!r} is invalid: {allowed}")


@strict
class PLTConfig(PreTrainedConfig):
    """Configuration of a Parallel Loop Transformer (`model_type = "iquestpltcoder"`).

    Every default is that of the released LoopCoder-V2 config class (`IQuestPLTCoderConfig`), so a `config.json`
    that leaves a field out means the same here as there (design §4). The Llama fields mean what they mean for
    `LlamaConfig`. The PLT fields:

    - `plt_num_loops` (R): how many times the layer stack is applied; R = 1 is a plain Llama model.
    - `plt_window_size` `[left, right]`: the sliding window of loops r >= 1 over their own keys; `[64, 0]` means
      keys t-64..t. `right` must be 0.
    - `plt_normalize_per_loop`: pass the state between loops through the final norm.
    - `plt_emb_scale`, `plt_hidden_scale`: loop input = emb_scale * embedding + hidden_scale * previous loop
      (None means 1.0).
    - `plt_gate_use_hidden_states`: the G-SWA gate reads the block input (True) or the query (False).
    - `plt_loop_mode`: `parallel` (PLT), `sequential_shared` (no cross-loop offset) or `sequential` (vanilla
      looped transformer, R full KV caches).
    """

    # the config.json fields that decide which weights a checkpoint has, named when the weights do not match
    weight_fields = ("plt_num_loops", "plt_loop_mode", "plt_gate_use_hidden_states", "tie_word_embeddings")

    model_type = "iquestpltcoder"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = field(default_factory=lambda: list(RELEASED_EOS_TOKEN_IDS))
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False

    plt_num_loops: int = 2
    plt_window_size: list[int] | tuple[int, int] | None = None
    plt_normalize_per_loop: bool = True
    plt_emb_scale: float | None = None
    plt_hidden_scale: float | None = None
    plt_gate_use_hidden_states: bool = False
    plt_loop_mode: str = "parallel"
    # parloop's weight-only quantization (parloop/quant.py), written by `parloop quantize`; None = float weights
    parloop_quantization: dict | None = None

    default_theta = 500000.0

    def __post_init__(self, **kwargs: Any) -> None:
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.plt_window_size = [64, 0] if self.plt_window_size is None else list(self.plt_window_size)
        super().__post_init__(**kwargs)
        self.check()

    def validate_architecture(self) -> None:  # called by `@strict`
        self.check()

    def check(self) -> None:
        """Raise `ConfigError` naming the first field whose value cannot work."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                 self.num_key_value_heads,
                 f"num_attention_heads ({self.num_attention_heads}) must be divisible by it")
        _require(self.head_dim % 2 == 0, "head_dim", self.head_dim, "must be even (rotary embeddings)")
        _require(self.hidden_act in ("silu", "swish"), "hidden_act", self.hidden_act,
                 "only 'silu' (SwiGLU) is supported")
        _require(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "must be > 0")
        _require(isinstance(self.plt_num_loops, int) and self.plt_num_loops >= 1, "plt_num_loops",
                 self.plt_num_loops, "must be an integer >= 1")
        window = self.plt_window_size
        _require(len(window) == 2 and all(isinstance(w, int) for w in window), "plt_window_size", window,
                 "must be a list [left, right] of two integers")
        _require(window[0] >= 0, "plt_window_size", window, "left must be >= 0")
        _require(window[1] == 0, "plt_window_size", window, "right must be 0 (the window is causal)")
        _require(self.plt_loop_mode in LOOP_MODES, "plt_loop_mode", self.plt_loop_mode,
                 f"allowed: {', '.join(LOOP_MODES)}")
        for name in ("plt_emb_scale", "plt_hidden_scale"):
            value = getattr(self, name)
            _require(value is None or isinstance(value, (int, float)), name, value, "must be a number or null")
        try:
            check_quantization_config(self.parloop_quantization)
        except QuantizationError as err:
            raise ConfigError(f"PLTConfig.{err}") from err

    @property
    def loop_layout(self) -> LoopLayout:
        return LoopLayout.of(self.plt_loop_mode, self.plt_num_loops)

    @property
    def window(self) -> int:
        """`left` of `plt_window_size`: loops r >= 1 see their own keys t-window..t."""
        return self.plt_window_size[0]

    def to_dict(self) -> dict[str, Any]:
        # Also write the legacy `rope_theta` / `rope_scaling` keys that LoopCoder-V2's config.json carries, so
        # tools that predate `rope_parameters` read the same RoPE.
        out = super().to_dict()
        rope = dict(out.get("rope_parameters") or {})
        out["rope_theta"] = rope.get("rope_theta", self.default_theta)
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        out["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
        # the released checkpoint's architecture name, so Hub tooling that reads it recognises the model
        if out.get("architectures"):
            out["architectures"] = [RELEASED_ARCHITECTURE if a == "PLTForCausalLM" else a
                                    for a in out["architectures"]]
        return out

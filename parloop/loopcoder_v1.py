"""LoopCoder-V1 (IQuest-Coder-V1 "Loop" models, `model_type: "iquestloopcoder"`) as a parloop model (design §4b).

V1 is parloop's `sequential_shared` mode with `plt_emb_scale = 0`, `plt_hidden_scale = 1`,
`plt_normalize_per_loop = False`, the query gate and `plt_window_size = [loop_window_size - 1, 0]`, so the V1 classes
are thin: the config derives those fields from V1's own `loop_num` / `loop_window_size` and writes back only V1's
fields; the weights differ from parloop's in one name, the query gate of layer i, which V1 stores as
`model.gate_projections.{i}` and parloop keeps in the layer's attention (`model.layers.{i}.self_attn.plt_gate`).
That rename is registered with `transformers`' checkpoint conversion mappings, which `from_pretrained` applies and
`save_pretrained` reverses, so a V1 directory loads and saves in its own names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import MISSING, fields
from functools import partial
from pathlib import Path
from typing import Any

from huggingface_hub.dataclasses import strict
from safetensors import safe_open
from transformers import PreTrainedModel
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming

from parloop.checkpoint import CheckpointError, load_strict
from parloop.config import ConfigError, PLTConfig
from parloop.model import PLTForCausalLM, PLTModel

V1_MODEL_TYPE = "iquestloopcoder"
V1_ARCHITECTURE = "IQuestLoopCoderForCausalLM"

# checkpoint name -> parloop name; `save_pretrained` applies the reverse
GATE_RENAMING = WeightRenaming(r"gate_projections\.(\d+)\.", r"layers.\1.self_attn.plt_gate.")
_TO_V1_NAME = GATE_RENAMING.reverse_transform()
register_checkpoint_conversion_mapping(V1_MODEL_TYPE, [GATE_RENAMING], overwrite=True)
_PARLOOP_GATE_NAME = re.compile(r"\.self_attn\.plt_gate\.")


@strict
class LoopCoderV1Config(PLTConfig):
    """Configuration of a LoopCoder-V1 model: the Llama fields plus `loop_num` (R) and `loop_window_size` (W, the
    keys of the local window counting the current one). Defaults are those of the released `IQuestLoopCoderConfig`,
    so a `config.json` that leaves a field out means the same here as there.

    The `plt_*` fields are derived from `loop_num` and `loop_window_size` (design §4b) and are not written to
    `config.json`; passing one with a value other than the derived one (or `PLTConfig`'s default, which cannot be
    told from not passing it) raises `ConfigError`.
    """

    model_type = V1_MODEL_TYPE
    weight_fields = ("loop_num", "tie_word_embeddings")

    vocab_size: int = 76800
    hidden_size: int = 5120
    intermediate_size: int = 27648
    num_hidden_layers: int = 80
    num_attention_heads: int = 40
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False

    loop_num: int = 2
    loop_window_size: int = 64

    default_theta = 500000.0

    def __post_init__(self, **kwargs: Any) -> None:
        self.check_loops()
        derived = self.derived_plt_fields()
        defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory()
                    for f in fields(PLTConfig) if f.name in derived}
        for name, value in derived.items():
            given = getattr(self, name)
            if given not in (defaults[name], value):
                raise ConfigError(f"LoopCoderV1Config.{name} = {given!r} is invalid: a LoopCoder-V1 model derives it "
                                  f"from loop_num and loop_window_size ({value!r} here); set those instead")
            setattr(self, name, value)
        super().__post_init__(**kwargs)

    def derived_plt_fields(self) -> dict[str, Any]:
        """The parloop fields that compute V1's semantics (design §4b)."""
        return dict(plt_num_loops=self.loop_num, plt_window_size=[self.loop_window_size - 1, 0],
                    plt_normalize_per_loop=False, plt_emb_scale=0.0, plt_hidden_scale=1.0,
                    plt_gate_use_hidden_states=False, plt_loop_mode="sequential_shared")

    def check_loops(self) -> None:
        for name in ("loop_num", "loop_window_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"LoopCoderV1Config.{name} = {value!r} is invalid: must be an integer >= 1")

    def check(self) -> None:
        self.check_loops()
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            # the released V1 code builds plain RoPE from rope_theta whatever rope_scaling says
            raise ConfigError(f"LoopCoderV1Config.rope_scaling = {self.rope_parameters!r} is invalid: the released "
                              "LoopCoder-V1 code ignores it (plain RoPE from rope_theta), so parloop cannot tell "
                              "which RoPE such a checkpoint was trained with; remove it or set it to null")
        super().check()

    def to_dict(self) -> dict[str, Any]:
        # V1's config.json format: V1's loop fields and the released architecture name, no plt_* fields
        out = {k: v for k, v in super().to_dict().items() if not k.startswith("plt_")}
        if out.get("architectures"):
            out["architectures"] = [V1_ARCHITECTURE if a == LoopCoderV1ForCausalLM.__name__ else a
                                    for a in out["architectures"]]
        return out


class LoopCoderV1Model(PLTModel):
    """The decoder stack of a LoopCoder-V1 model (`AutoModel`); parloop's `PLTModel` with V1's config and names."""

    config_class = LoopCoderV1Config


class LoopCoderV1ForCausalLM(PLTForCausalLM):
    """A LoopCoder-V1 causal LM (`AutoModelForCausalLM` for `model_type: "iquestloopcoder"`).

    It computes V1's one-token semantics in every path (full forward, prefill, cached decoding with `PLTCache`) and
    loads and saves V1's checkpoint format. Loading is strict, with weights named as the checkpoint names them.
    """

    config_class = LoopCoderV1Config

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> LoopCoderV1ForCausalLM:  # type: ignore[override]
        load = super(PLTForCausalLM, cls).from_pretrained  # PreTrainedModel's, made strict here
        loaded = load_strict(partial(_named_as_v1, load), *args, **kwargs)
        if args and Path(args[0]).is_dir():  # after load_strict: it has checked the files
            _reject_parloop_gate_names(Path(args[0]))
        return loaded


def _named_as_v1(load: Callable[..., tuple[PreTrainedModel, dict]], *args: Any, **kwargs: Any) -> tuple[Any, dict]:
    """`load` (from_pretrained with its loading report) with the report's weights named as V1 names them."""
    model, info = load(*args, **kwargs)
    info = dict(info, missing_keys={_v1_name(k) for k in info["missing_keys"]},
                unexpected_keys={_v1_name(k) for k in info["unexpected_keys"]},
                mismatched_keys=[(_v1_name(m[0]), *m[1:]) for m in info["mismatched_keys"]])
    return model, info


def _v1_name(name: str) -> str:
    return _TO_V1_NAME.rename_source_key(name)[0]


def _reject_parloop_gate_names(directory: Path) -> None:
    """A V1 checkpoint names its gates `model.gate_projections.{i}`; one that uses parloop's names would load (both
    map to the same parameter) but save back under other names, so it is refused."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        names: Iterable[str] = json.loads(index.read_text()).get("weight_map", {})
    else:
        names = [k for path in sorted(directory.glob("*.safetensors")) for k in _keys(path)]
    foreign = sorted(n for n in names if _PARLOOP_GATE_NAME.search(n))
    if foreign:
        raise CheckpointError(f"checkpoint does not match its config.json: unexpected weight {foreign[0]} "
                              f"({len(foreign)} such): a LoopCoder-V1 checkpoint names the gate of layer i "
                              "model.gate_projections.{i}.weight / .bias")


def _keys(path: Path) -> list[str]:
    with safe_open(path, framework="pt") as f:
        return list(f.keys())


__all__ = ["GATE_RENAMING", "LoopCoderV1Config", "LoopCoderV1ForCausalLM", "LoopCoderV1Model"]

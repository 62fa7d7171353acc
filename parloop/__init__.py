"""parloop: Parallel Loop Transformers (PLT) in PyTorch.

`import parloop` registers the LoopCoder-V2 model type (`iquestpltcoder`) and the LoopCoder-V1 one (`iquestloopcoder`)
with `transformers`' Auto classes, so `AutoModelForCausalLM.from_pretrained(dir)` loads such a checkpoint without
`trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from parloop.cache import PLTCache
from parloop.checkpoint import CheckpointError
from parloop.config import ConfigError, PLTConfig
from parloop.loopcoder_v1 import LoopCoderV1Config, LoopCoderV1ForCausalLM, LoopCoderV1Model
from parloop.model import PLTForCausalLM, PLTModel

AutoConfig.register(PLTConfig.model_type, PLTConfig, exist_ok=True)
AutoModel.register(PLTConfig, PLTModel, exist_ok=True)
AutoModelForCausalLM.register(PLTConfig, PLTForCausalLM, exist_ok=True)
AutoConfig.register(LoopCoderV1Config.model_type, LoopCoderV1Config, exist_ok=True)
AutoModel.register(LoopCoderV1Config, LoopCoderV1Model, exist_ok=True)
AutoModelForCausalLM.register(LoopCoderV1Config, LoopCoderV1ForCausalLM, exist_ok=True)

__all__ = ["CheckpointError", "ConfigError", "LoopCoderV1Config", "LoopCoderV1ForCausalLM", "LoopCoderV1Model",
           "PLTCache", "PLTConfig", "PLTForCausalLM", "PLTModel"]
__version__ = "0.1.0"

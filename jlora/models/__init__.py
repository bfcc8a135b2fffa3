"""Model families (Llama-family decoder and GPT-2) with HF-compatible names.

Loading and saving checkpoints (``from_pretrained`` / ``save_pretrained``)
lives in ``jlora.io``, which depends on this package, not the reverse.
"""

from jlora.models._attention import ATTENTION, AttentionMask, attend, check_attention, target_backend
from jlora.models._cache import KVCache
from jlora.models._config import SUPPORTED, ModelConfig, from_hf_config
from jlora.models._decoder import CausalLM, check_scan_unroll
from jlora.models._generate import generate, sample_token
from jlora.models._gpt2 import Gpt2LMHeadModel
from jlora.models._remat import REMAT_POLICIES
from jlora.models._sharding import (AXES, LOGICAL_RULES, LOGICAL_TO_MESH, make_mesh, param_spec, replicated,
                                    shard_state, state_shardings)


def model_class(config: ModelConfig):
  """The NNX model class for ``config.model_type``."""
  if config.model_type == "gpt2":
    return Gpt2LMHeadModel
  if config.model_type in SUPPORTED:
    return CausalLM
  raise ValueError(f"model_type={config.model_type!r} is not supported; use one of {', '.join(SUPPORTED)}.")


__all__ = ["ATTENTION", "AXES", "AttentionMask", "CausalLM", "Gpt2LMHeadModel", "KVCache", "LOGICAL_RULES",
           "LOGICAL_TO_MESH", "ModelConfig", "REMAT_POLICIES", "SUPPORTED", "attend", "check_attention",
           "check_scan_unroll", "from_hf_config", "generate", "make_mesh", "model_class", "param_spec", "replicated",
           "sample_token", "shard_state", "state_shardings", "target_backend"]

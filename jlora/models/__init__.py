"""Model families (the Llama family, Gemma 2/3, Phi-3, Qwen3-MoE, Mixtral, GPT-2) with HF-compatible names, and the family registry.

A family registers itself with ``register_family(Family(...))``: the
``model_type`` values it reads, its config, its ``LanguageModel`` class,
its checkpoint names, sharding rules and PEFT quirks. Loading and saving
checkpoints (``from_pretrained`` / ``save_pretrained``) lives in
``jlora.io``, which depends on this package and asks the registry, not the
reverse.
"""

from jlora.models._attention import (ATTENTION, AttentionMask, attend, check_attention, cudnn_packed_layout,
                                     target_backend)
from jlora.models._cache import KVCache
from jlora.models._config import FamilyConfig, LayerAttention, LlamaConfig, ModelConfig
from jlora.models._decoder import LLAMA, CausalLM, scan_layers, stacked
from jlora.models._family import (Family, families, family_for, family_of, from_hf_config, model_class,
                                  register_family, sharding_rules, supported_model_types)
from jlora.models._gemma import GEMMA, GemmaConfig, GemmaForCausalLM
from jlora.models._generate import generate, sample_token
from jlora.models._phi3 import PHI3, Phi3Config, Phi3ForCausalLM
from jlora.models._gpt2 import GPT2, Gpt2Config, Gpt2LMHeadModel
from jlora.models._language_model import LanguageModel, check_scan_unroll
from jlora.models._mixtral import MIXTRAL, MixtralConfig
from jlora.models._qwen3_moe import QWEN3_MOE, MoeConfig, MoeForCausalLM, Qwen3MoeConfig
from jlora.models._remat import REMAT_POLICIES, check_remat, placed
from jlora.models._sharding import (AXES, LOGICAL_TO_MESH, logical_rules, make_mesh, param_spec, replicated,
                                    shard_state, state_shardings)
from jlora.models._token_ids import check_token_ids

SUPPORTED = supported_model_types()
"""The ``model_type`` values of the built-in families (``supported_model_types()`` also lists registered ones)."""

__all__ = ["ATTENTION", "AXES", "AttentionMask", "CausalLM", "Family", "FamilyConfig", "GEMMA", "GPT2", "GemmaConfig",
           "GemmaForCausalLM", "Gpt2Config", "Gpt2LMHeadModel", "KVCache", "LLAMA", "LOGICAL_TO_MESH", "LanguageModel",
           "LayerAttention", "LlamaConfig", "MIXTRAL", "MixtralConfig", "ModelConfig", "MoeConfig",
           "MoeForCausalLM", "PHI3", "Phi3Config", "Phi3ForCausalLM", "QWEN3_MOE", "Qwen3MoeConfig", "REMAT_POLICIES",
           "SUPPORTED", "attend", "check_attention", "check_remat", "check_scan_unroll", "check_token_ids",
           "cudnn_packed_layout", "families", "family_for", "family_of", "from_hf_config", "generate", "logical_rules",
           "make_mesh", "model_class", "param_spec", "placed", "register_family", "replicated", "sample_token",
           "scan_layers", "shard_state", "sharding_rules", "stacked", "state_shardings", "supported_model_types",
           "target_backend"]

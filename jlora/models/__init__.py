"""Model families (Llama-family decoder and GPT-2) with HF-compatible names.

Loading and saving checkpoints (``from_pretrained`` / ``save_pretrained``)
lives in ``jlora.io``, which depends on this package, not the reverse.
"""

from jlora.models._attention import ATTENTION, check_attention, target_backend
from jlora.models._cache import KVCache
from jlora.models._config import SUPPORTED, ModelConfig, from_hf_config
from jlora.models._decoder import CausalLM, check_scan_unroll
from jlora.models._generate import generate, sample_token
from jlora.models._gpt2 import Gpt2LMHeadModel
from jlora.models._remat import REMAT_POLICIES
from jlora.models._token_ids import check_token_ids


def model_class(config: ModelConfig):
  """The NNX model class for ``config.model_type``."""
  if config.model_type == "gpt2":
    return Gpt2LMHeadModel
  if config.model_type in SUPPORTED:
    return CausalLM
  raise ValueError(f"model_type={config.model_type!r} is not supported; use one of {', '.join(SUPPORTED)}.")


__all__ = ["ATTENTION", "CausalLM", "Gpt2LMHeadModel", "KVCache", "ModelConfig", "REMAT_POLICIES", "SUPPORTED",
           "check_attention", "check_scan_unroll", "check_token_ids", "from_hf_config", "generate", "model_class", "sample_token",
           "target_backend"]

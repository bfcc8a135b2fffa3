"""Model families (Llama-family decoder and GPT-2) with HF-compatible names.

``from_pretrained`` / ``save_pretrained`` live in ``jlora.io`` and are
re-exported here lazily (``jlora.io`` depends on this package, not the reverse).
"""

from jlora.models._cache import KVCache
from jlora.models._config import SUPPORTED, ModelConfig, from_hf_config
from jlora.models._decoder import CausalLM
from jlora.models._generate import generate, sample_token
from jlora.models._gpt2 import Gpt2LMHeadModel


def model_class(config: ModelConfig):
  """The NNX model class for ``config.model_type``."""
  if config.model_type == "gpt2":
    return Gpt2LMHeadModel
  if config.model_type in SUPPORTED:
    return CausalLM
  raise ValueError(f"model_type={config.model_type!r} is not supported; use one of {', '.join(SUPPORTED)}.")


def __getattr__(name):
  if name in ("from_pretrained", "save_pretrained"):
    from jlora.io import _hf
    return getattr(_hf, name)
  raise AttributeError(f"module 'jlora.models' has no attribute {name!r}")


__all__ = ["CausalLM", "Gpt2LMHeadModel", "KVCache", "ModelConfig", "SUPPORTED", "from_hf_config",
           "generate", "model_class", "sample_token", "from_pretrained", "save_pretrained"]

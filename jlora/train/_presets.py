"""Named base models for demos and tests: random weights, no download.

``"tiny"``: a 2-layer Llama-family ``jlora.models.CausalLM`` (hidden 64,
4 heads, 258-token byte vocabulary, 128 positions); trains on a CPU in
minutes with the byte tokenizer.
"""

from __future__ import annotations

from jlora.train._config import ModelConfig
from jlora.train._model import register_preset

TINY = dict(model_type="llama", vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=128,
            rope=(("rope_theta", 10000.0), ("rope_type", "default")))


def _model_classes():
  try:
    from jlora.models import CausalLM, ModelConfig as ArchConfig
  except ImportError:
    try:  # jlora.models without its public __init__ yet
      from jlora.models._config import ModelConfig as ArchConfig
      from jlora.models._decoder import CausalLM
    except ImportError as e:
      raise ValueError("The 'tiny' preset needs jlora.models, which is not installed; pass a model to "
                       "jlora.train(cfg, model=...) or register_preset() your own.") from e
  return CausalLM, ArchConfig


def _tiny(cfg: ModelConfig):
  import jax.numpy as jnp
  from flax import nnx

  CausalLM, ArchConfig = _model_classes()
  return CausalLM(ArchConfig(**TINY), dtype=getattr(jnp, cfg.dtype), rngs=nnx.Rngs(cfg.seed))


register_preset("tiny", _tiny)

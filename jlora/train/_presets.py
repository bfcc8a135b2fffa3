"""Named base models for demos and tests: random weights, no download.

``"tiny"``: a 2-layer Llama-family ``jlora.models.CausalLM`` (hidden 64,
4 heads, 258-token byte vocabulary, 128 positions); trains on a CPU in
minutes with the byte tokenizer.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jlora.models import CausalLM
from jlora.models import ModelConfig as ArchConfig
from jlora.train._config import ModelConfig
from jlora.train._model import register_preset

TINY = dict(model_type="llama", vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=128,
            rope=(("rope_theta", 10000.0), ("rope_type", "default")))


def _tiny(cfg: ModelConfig):
  return CausalLM(ArchConfig(**TINY), dtype=getattr(jnp, cfg.dtype), rngs=nnx.Rngs(cfg.seed))


register_preset("tiny", _tiny)

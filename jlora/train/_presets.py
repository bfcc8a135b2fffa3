"""Named base models for demos and tests, no download: the preset registry and the built-in presets.

``register_preset(name, factory)`` makes ``model.name = name`` build
``factory(model_config)``.

``"byte-stories"``: the pretrained base shipped in ``jlora/train/data/base``
(``config.json`` + ``model.safetensors``, ~4 MB): a 4-layer, 128-wide
Llama over the 258-id byte vocabulary (``ByteTokenizer``), trained on
stories by ``scripts/train_base.py``. It writes stories and has never seen a
question, which is what the default job's adapter teaches it.

``"tiny"``: a 2-layer Llama-family ``jlora.models.CausalLM`` (hidden 64,
4 heads, 258-token byte vocabulary, 128 positions) with random weights from
``model.seed``; trains on a CPU in seconds (tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax.numpy as jnp
from flax import nnx

from jlora.io import from_pretrained
from jlora.models import CausalLM, LlamaConfig
from jlora.train._config import ModelSection

_PRESETS: dict[str, Callable[[ModelSection], nnx.Module]] = {}


def register_preset(name: str, factory: Callable[[ModelSection], nnx.Module]) -> None:
  """Make ``model.name = name`` build ``factory(model_config)`` (a model with random weights).

  Registering a built-in name (``"tiny"``) replaces it.
  """
  _PRESETS[name] = factory


def presets() -> list[str]:
  return sorted(_PRESETS)


def preset(name: str) -> Callable[[ModelSection], nnx.Module] | None:
  """The factory registered as ``name``, if any."""
  return _PRESETS.get(name)


BASE_DIR = Path(__file__).parent / "data" / "base"
TINY = dict(model_type="llama", vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=128,
            rope=(("rope_theta", 10000.0), ("rope_type", "default")))


def _tiny(cfg: ModelSection):
  return CausalLM(LlamaConfig(**TINY), dtype=getattr(jnp, cfg.dtype), rngs=nnx.Rngs(cfg.seed))


def _byte_stories(cfg: ModelSection):
  if not (BASE_DIR / "model.safetensors").is_file():
    raise ValueError(f"The shipped base model is missing from {BASE_DIR}; reinstall jlora, or recreate it "
                     "with `python scripts/train_base.py` from a jlora checkout.")
  return from_pretrained(BASE_DIR, dtype=getattr(jnp, cfg.dtype))


register_preset("tiny", _tiny)
register_preset("byte-stories", _byte_stories)

"""Model configs: the sizes every family shares, and the per-layer attention settings.

A family's config is a frozen dataclass that extends ``FamilyConfig`` with
its own switches (``LlamaConfig``: biases, q/k norms, rope, Mistral's
window). The original ``config.json`` travels along (as a JSON string, so the
config stays hashable and static in the NNX graph) and is written back
unchanged by ``save_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass(frozen=True)
class LayerAttention:
  """Static attention settings of one layer of the scanned stack.

  ``sliding_window``: a query sees at most this many keys back (itself
  included); None: global (causal) attention. Layers of one model may differ
  (alternating local and global layers); the scan still compiles one layer
  body, which selects the layer's entry of a small static table.

  ``logit_soft_cap``: attention logits become ``cap * tanh(logits / cap)``
  (Gemma 2); None: no cap. ``rope_table``: which of the model's rope tables
  the layer rotates with (Gemma 3's local layers use a second one); 0 for
  the model's main table.
  """

  sliding_window: int | None = None
  logit_soft_cap: float | None = None
  rope_table: int = 0

  def __post_init__(self):
    window = self.sliding_window
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
      raise ValueError(f"sliding_window={window!r} is not a positive number of keys; use None for global "
                       "attention or a window of at least 1.")
    cap = self.logit_soft_cap
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0):
      raise ValueError(f"logit_soft_cap={cap!r} is not a positive number; use None for uncapped attention logits.")


@dataclasses.dataclass(frozen=True)
class FamilyConfig:
  """Architecture sizes every decoder-only family has (HF names where they exist).

  ``hf_json`` is the original config.json. Families extend this class with
  their own switches and may override ``layer_attention``.
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  max_position_embeddings: int
  norm_eps: float = 1e-6
  hidden_act: str = "silu"
  tie_word_embeddings: bool = False
  hf_json: str = "{}"

  def layer_attention(self) -> tuple[LayerAttention, ...]:
    """One ``LayerAttention`` per layer (default: global attention everywhere)."""
    return (LayerAttention(),) * self.num_hidden_layers

  def hf_dict(self) -> dict[str, Any]:
    """``config.json``'s fields, with ``tie_word_embeddings`` as the model now has it (untied by merging)."""
    hf = json.loads(self.hf_json)
    hf["tie_word_embeddings"] = self.tie_word_embeddings
    return hf


@dataclasses.dataclass(frozen=True)
class LlamaConfig(FamilyConfig):
  """The Llama family's config (llama, mistral, qwen2, qwen3).

  ``rope`` is a sorted tuple of the rope parameters (``rope_type``,
  ``rope_theta``, ``factor`` ...); ``sliding_window`` (Mistral) applies to
  every layer, or (Qwen2/Qwen3's ``use_sliding_window``) to the layers
  ``layer_types`` marks ``"sliding_attention"``.
  """

  attention_bias: bool = False
  o_proj_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  sliding_window: int | None = None
  rope: tuple = ()
  layer_types: tuple[str, ...] = ()

  @property
  def rope_parameters(self) -> dict[str, Any]:
    """The standard rope dict (``rope_type``, ``rope_theta``, ...); empty ``rope``: default rope, theta 10000."""
    return {"rope_type": "default", "rope_theta": 10000.0, **dict(self.rope)}

  def layer_attention(self) -> tuple[LayerAttention, ...]:
    if self.layer_types:
      return tuple(LayerAttention(w) for w in layer_windows(self.layer_types, self.sliding_window))
    return (LayerAttention(self.sliding_window),) * self.num_hidden_layers


ModelConfig = LlamaConfig
"""Deprecated name of ``LlamaConfig`` (it once held every family's switches); use the family's config."""


def hf_get(hf, *names, default=None):
  """The first of ``names`` that the transformers config ``hf`` sets (not None), else ``default``."""
  for name in names:
    value = getattr(hf, name, None)
    if value is not None:
      return value
  return default


def hf_json(hf) -> str:
  """The transformers config ``hf`` as the sorted JSON string a config keeps."""
  return json.dumps(hf.to_dict(), sort_keys=True, default=str)


LAYER_TYPES = ("sliding_attention", "full_attention")


def layer_windows(layer_types, sliding_window: int | None) -> tuple[int | None, ...]:
  """Each layer's window: ``sliding_window`` on ``"sliding_attention"`` layers, None (global) on the rest.

  Raises:
    ValueError: a layer type other than ``LAYER_TYPES``, or sliding layers without a ``sliding_window``.
  """
  for kind in layer_types:
    if kind not in LAYER_TYPES:
      raise ValueError(f"config.json's layer_types holds {kind!r}; jlora implements {' and '.join(LAYER_TYPES)} "
                       "layers.")
  if "sliding_attention" in layer_types and not sliding_window:
    raise ValueError("config.json's layer_types has sliding_attention layers but sliding_window is not set; "
                     "set sliding_window in config.json.")
  return tuple(sliding_window if kind == "sliding_attention" else None for kind in layer_types)


def refuse_options(hf, model_type: str, options: dict) -> None:
  """ValueError naming the first option of ``options`` (``{attribute: fix}``) that ``hf`` sets (truthy)."""
  for name, fix in options.items():
    value = getattr(hf, name, None)
    if value:
      raise ValueError(f"{model_type} config sets {name}={value!r}, which jlora does not implement; {fix}")

"""``ModelConfig``: the few numbers a jlora model needs, read from a HF config.

The original ``config.json`` travels along (as a JSON string, so the config
stays hashable and static in the NNX graph) and is written back unchanged by
``save_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED = LLAMA_FAMILY + ("gpt2",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only LM (HF names where they exist).

  ``rope`` is a sorted tuple of the rope parameters (``rope_type``,
  ``rope_theta``, ``factor`` ...); ``hf_json`` is the original config.json.
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
  attention_bias: bool = False
  o_proj_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  sliding_window: int | None = None
  rope: tuple = ()
  hf_json: str = "{}"

  @property
  def rope_parameters(self) -> dict[str, Any]:
    return dict(self.rope)

  def hf_dict(self) -> dict[str, Any]:
    return json.loads(self.hf_json)


def _get(hf, *names, default=None):
  for name in names:
    value = getattr(hf, name, None)
    if value is not None:
      return value
  return default


def from_hf_config(hf) -> ModelConfig:
  """A ``ModelConfig`` from a ``transformers`` config object.

  Raises:
    ValueError: unknown ``model_type`` (lists the supported ones) or an
      option jlora does not implement.
  """
  model_type = getattr(hf, "model_type", None)
  if model_type not in SUPPORTED:
    raise ValueError(
        f"config.json has model_type={model_type!r}, which jlora does not implement; supported "
        f"model types: {', '.join(SUPPORTED)}.")
  raw = json.dumps(hf.to_dict(), sort_keys=True, default=str)
  tie = bool(_get(hf, "tie_word_embeddings", default=model_type == "gpt2"))
  if model_type == "gpt2":
    for option in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
      if getattr(hf, option, False):
        raise ValueError(f"gpt2 with {option}=True is not supported; set it to false in config.json.")
    if not getattr(hf, "scale_attn_weights", True):
      raise ValueError("gpt2 with scale_attn_weights=False is not supported; set it to true in config.json.")
    hidden = hf.n_embd
    return ModelConfig(
        model_type="gpt2", vocab_size=hf.vocab_size, hidden_size=hidden,
        intermediate_size=hf.n_inner or 4 * hidden, num_hidden_layers=hf.n_layer,
        num_attention_heads=hf.n_head, num_key_value_heads=hf.n_head,
        head_dim=hidden // hf.n_head, max_position_embeddings=hf.n_positions,
        norm_eps=hf.layer_norm_epsilon, hidden_act=hf.activation_function,
        tie_word_embeddings=True, attention_bias=True, o_proj_bias=True, mlp_bias=True, hf_json=raw)
  if model_type.startswith("qwen") and getattr(hf, "use_sliding_window", False):
    raise ValueError(f"{model_type} with use_sliding_window=True is not supported; set it to false in config.json.")
  heads = hf.num_attention_heads
  rope = dict(getattr(hf, "rope_parameters", None) or {})
  rope.setdefault("rope_type", "default")
  rope.setdefault("rope_theta", _get(hf, "rope_theta", default=10000.0))
  if rope["rope_type"] not in ("default", "llama3"):
    raise ValueError(
        f"rope_type={rope['rope_type']!r} is not supported; jlora implements 'default' and 'llama3'.")
  bias = bool(getattr(hf, "attention_bias", False)) or model_type == "qwen2"
  return ModelConfig(
      model_type=model_type, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
      intermediate_size=hf.intermediate_size, num_hidden_layers=hf.num_hidden_layers,
      num_attention_heads=heads, num_key_value_heads=_get(hf, "num_key_value_heads", default=heads),
      head_dim=_get(hf, "head_dim", default=hf.hidden_size // heads),
      max_position_embeddings=hf.max_position_embeddings, norm_eps=hf.rms_norm_eps,
      hidden_act=hf.hidden_act, tie_word_embeddings=tie, attention_bias=bias,
      o_proj_bias=bool(getattr(hf, "attention_bias", False)),
      mlp_bias=bool(getattr(hf, "mlp_bias", False)), qk_norm=model_type == "qwen3",
      sliding_window=getattr(hf, "sliding_window", None) if model_type == "mistral" else None,
      rope=tuple(sorted((k, v) for k, v in rope.items() if not isinstance(v, (dict, list)))),
      hf_json=raw)

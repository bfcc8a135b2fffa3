"""A test-only model family, registered through the public call a built-in family uses.

``"jlora_toy"``: a Llama-shaped decoder whose odd layers attend within a
local window of ``local_window`` keys and whose even layers attend globally
(as Gemma 2 alternates). transformers learns its config class through
``AutoConfig.register`` (as a user's custom model would); jlora learns the
family through ``jlora.models.register_family``.
"""

from __future__ import annotations

import dataclasses
import json

import torch
import transformers

from jlora import models

MODEL_TYPE = "jlora_toy"


class ToyHfConfig(transformers.LlamaConfig):
  model_type = MODEL_TYPE

  def __init__(self, local_window: int = 4, **kwargs):
    self.local_window = local_window
    super().__init__(**kwargs)


@dataclasses.dataclass(frozen=True)
class ToyConfig(models.LlamaConfig):
  """The Llama family's switches plus the window of the odd layers (None: every layer global)."""

  local_window: int | None = 4

  def layer_attention(self):
    local = models.LayerAttention(self.local_window)
    return tuple(local if i % 2 else models.LayerAttention() for i in range(self.num_hidden_layers))


class ToyLM(models.CausalLM):
  """The Llama blocks and names; each layer's window comes from ``ToyConfig.layer_attention``."""


def toy_config_from_hf(hf) -> ToyConfig:
  base = models.LLAMA.from_hf(hf)
  return ToyConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
                   local_window=hf.local_window)


TOY = models.register_family(models.Family(
    name="toy", model_types=(MODEL_TYPE,), from_hf=toy_config_from_hf, model_class=ToyLM,
    ignored_tensors=models.LLAMA.ignored_tensors, sharding_rules=models.LLAMA.sharding_rules))
if MODEL_TYPE not in transformers.CONFIG_MAPPING:
  transformers.AutoConfig.register(MODEL_TYPE, ToyHfConfig)

VOCAB = 61
SIZES = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def save_checkpoint(path, local_window: int = 3, seed: int = 0):
  """An HF-style directory (``config.json`` + ``model.safetensors``) of a random toy model.

  The weights are written by transformers (a Llama with the toy's shapes);
  ``config.json`` then names the toy's ``model_type`` and window.
  """
  torch.manual_seed(seed)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      p.add_(0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0.0, 0.25)
  hf.save_pretrained(str(path))
  config = json.loads((path / "config.json").read_text())
  config.update(model_type=MODEL_TYPE, local_window=local_window, architectures=None)
  (path / "config.json").write_text(json.dumps(config))
  return hf

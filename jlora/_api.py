"""Top-level API pieces that join ``jlora.nn`` and ``jlora.io``.

``jlora.nn`` knows nothing of files; here ``get_peft_model`` also accepts
WLoRA upstreams given as PEFT adapter directories.
"""

from __future__ import annotations

import dataclasses
import os

from flax import nnx

from jlora import nn as _nn
from jlora.io._peft_load import load_peft
from jlora.nn import WLoraConfig
from jlora.nn._config import AdapterConfig


def get_peft_model(model: nnx.Module, config: AdapterConfig, adapter_name: str = "default") -> nnx.Module:
  """Inject adapter ``adapter_name`` into ``model`` (in place) and activate it.

  As ``jlora.nn.get_peft_model``; in addition each ``WLoraConfig.upstream_loras``
  entry that is not an adapter of the model but a PEFT adapter directory is
  loaded first (``jlora.load_peft``) as adapter ``"<adapter_name>.upstream<k>"``,
  which stays in the model, inactive.
  """
  if isinstance(config, WLoraConfig):
    existing = _nn.peft_config(model)
    names, loaded = [], []
    for k, entry in enumerate(config.upstream_loras):
      if entry in existing:
        names.append(entry)
      elif os.path.isdir(os.path.expanduser(entry)):
        name = f"{adapter_name}.upstream{k}"
        try:
          load_peft(model, entry, adapter_name=name, activate=False)
        except BaseException:
          for done in loaded:
            _nn.delete_adapter(model, done)
          raise
        loaded.append(name)
        names.append(name)
      else:
        raise ValueError(
            f"WLoRA upstream {entry!r} is neither an adapter of the model (it has "
            f"{list(existing) or 'none'}) nor a PEFT adapter directory; pass an adapter name or "
            "the path of a directory holding adapter_config.json and adapter_model.safetensors."
        )
    config = dataclasses.replace(config, upstream_loras=tuple(names))
    try:
      return _nn.get_peft_model(model, config, adapter_name)
    except BaseException:
      for done in loaded:
        _nn.delete_adapter(model, done)
      raise
  return _nn.get_peft_model(model, config, adapter_name)

"""``get_peft_model``: inject and activate an adapter; WLoRA upstreams may be PEFT adapter directories.

``jlora.nn`` knows nothing of files (it adds adapters with ``add_adapter``);
this joins it with ``load_peft``. It lives in ``jlora.io`` so that
``jlora.train`` can use it without importing the top-level package; it is
``jlora.get_peft_model``.
"""

from __future__ import annotations

import dataclasses
import os

from flax import nnx

from jlora import nn as _nn
from jlora.io._peft_load import load_peft
from jlora.nn import AdapterConfig, WLoraConfig


def get_peft_model(model: nnx.Module, config: AdapterConfig, adapter_name: str = "default") -> nnx.Module:
  """Inject adapter ``adapter_name`` into ``model`` (in place) and activate it.

  Returns the same model object, now holding LoRA layers. Each
  ``WLoraConfig.upstream_loras`` entry that is not an adapter of the model
  but a PEFT adapter directory is loaded first (``jlora.load_peft``) as adapter ``"<adapter_name>.upstream<k>"``,
  which stays in the model, inactive. Every entry is checked before any is
  loaded, and a failure removes the upstreams this call loaded: a failed call
  leaves the model as it was.
  """
  if not isinstance(config, WLoraConfig):
    return _add_and_activate(model, config, adapter_name)
  existing = _nn.peft_config(model)
  if adapter_name in existing:
    raise ValueError(f"The model already has an adapter named {adapter_name!r}; pick another name or "
                     "delete_adapter() it first.")
  names, to_load = [], []
  for k, entry in enumerate(config.upstream_loras):
    if entry in existing:
      names.append(entry)
    elif os.path.isdir(os.path.expanduser(entry)):
      names.append(f"{adapter_name}.upstream{k}")
      to_load.append((entry, names[-1]))
    else:
      raise ValueError(
          f"WLoRA upstream {entry!r} is neither an adapter of the model (it has "
          f"{list(existing) or 'none'}) nor a PEFT adapter directory; pass an adapter name or "
          "the path of a directory holding adapter_config.json and adapter_model.safetensors.")
  loaded = []
  try:
    for entry, name in to_load:
      load_peft(model, entry, adapter_name=name, activate=False)
      loaded.append(name)
    return _add_and_activate(model, dataclasses.replace(config, upstream_loras=tuple(names)), adapter_name)
  except BaseException:
    for name in reversed(loaded):
      _nn.delete_adapter(model, name)
    raise


def _add_and_activate(model: nnx.Module, config: AdapterConfig, adapter_name: str) -> nnx.Module:
  _nn.add_adapter(model, adapter_name, config)
  _nn.set_adapter(model, adapter_name)
  return model

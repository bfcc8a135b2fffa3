"""``load_peft``: a PEFT LoRA adapter directory into a jlora model.

The adapter is injected from the directory's config exactly as
``jlora.add_adapter`` would (same targeting, ranks, scalings, rank masks for
stacked layers), then every factor is overwritten with the checkpoint's
tensor. The modules the config selects must be exactly the modules the
checkpoint holds; anything else is an error that names the keys.

Into a model sharded over a mesh (``from_pretrained(..., mesh=...)``) each
factor goes straight to its devices, laid out like its layer's kernel:
``lora_A [.., in, r]`` split as the kernel's ``in`` dim, ``lora_B [.., r, out]``
as its ``out`` dim, the rank dim replicated.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jlora.io import _peft_layout as layout
from jlora.io import _safetensors
from jlora.io._peft_config import CONFIG_NAME, from_peft_dict, read_json
from jlora.nn import (
    LoraConfig, LoraLayer, add_adapter, delete_adapter, lora_layer_type, lora_layers, set_adapter)
from jlora.nn._targets import candidates

WEIGHTS_NAME = "adapter_model.safetensors"
_CONVERT = (
    "convert it once with torch: `from safetensors.torch import save_file; save_file(torch.load("
    "'adapter_model.bin', weights_only=True), 'adapter_model.safetensors')` (or load it in PEFT and "
    "save_pretrained again, which writes safetensors)"
)


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[LoraConfig, dict[str, np.ndarray]]:
  """The jlora config and the raw tensors of a PEFT adapter directory."""
  path = Path(adapter_dir).expanduser()
  if path.is_file():
    raise ValueError(f"PEFT adapter path {path} is a file; pass the directory that holds {CONFIG_NAME} and "
                     f"{WEIGHTS_NAME} (probably {path.parent}).")
  if not path.is_dir():
    raise ValueError(
        f"PEFT adapter directory {path} does not exist; pass a local directory holding "
        f"{CONFIG_NAME} and {WEIGHTS_NAME}."
    )
  config = from_peft_dict(read_json(path / CONFIG_NAME), path / CONFIG_NAME)
  weights = path / WEIGHTS_NAME
  if not weights.is_file():
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickled:
      raise ValueError(
          f"{path} holds only pickled weights ({', '.join(pickled)}) and jlora never unpickles "
          f"files; {_CONVERT}."
      )
    raise ValueError(f"{path} has no {WEIGHTS_NAME}; copy the adapter's weights file next to "
                     f"{CONFIG_NAME}.")
  return config, dict(_safetensors.read(weights))


def load_peft(model: nnx.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default",
              is_trainable: bool = False, activate: bool = True) -> nnx.Module:
  """Load a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

  Args:
    model: a jlora model whose module names match the PEFT base model's
      (``base_model.model.`` + jlora's PEFT-style names).
    adapter_dir: the directory ``PeftModel.save_pretrained`` wrote.
    is_trainable: as in ``PeftModel.from_pretrained``: False (the default)
      puts the adapter in inference mode (LoRA dropout off, like torch's
      ``eval()``; ``model.train()`` turns it back on); True leaves dropout on.
    adapter_name: the name the adapter gets in ``model``; call again with
      other names to load several adapters.
    activate: make it the (only) active adapter, as
      ``PeftModel.from_pretrained`` does; False just adds it.

  Returns:
    ``model`` (modified in place). The adapter's parameters are ordinary
    ``LoraParam`` either way (``jlora.adapter_optimizer`` trains them).

  Raises:
    ValueError: a missing/malformed directory, config or weights file, an
      unsupported PEFT feature, or tensors that do not fit the model
      (missing, unexpected, wrong shape or rank).
  """
  path = Path(adapter_dir).expanduser()
  config, tensors = read_adapter(path)
  try:
    add_adapter(model, adapter_name, config)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  try:
    _fill(model, adapter_name, tensors, path / WEIGHTS_NAME)
  except BaseException:
    delete_adapter(model, adapter_name)  # leave the model as it was
    raise
  if not is_trainable:
    for _, layer in lora_layers(model):
      if adapter_name in layer.adapters:
        layer.adapters[adapter_name].deterministic = True
  if activate:
    set_adapter(model, adapter_name)
  return model


def _live_ranks(adapter, size: int) -> np.ndarray:
  if adapter.rank_mask is None:
    return np.full(size, adapter.rank, np.int64)
  return np.asarray(adapter.rank_mask[...]).reshape(size, -1).sum(-1).astype(np.int64)


def _fill(model: nnx.Module, name: str, tensors: dict, file: Path) -> None:
  """Overwrite adapter ``name``'s factors with the checkpoint's; consume the used tensors."""
  tensors = dict(tensors)
  missing, updates = [], []
  for _, layer in lora_layers(model):
    if name not in layer.adapters:
      continue
    kind = layout.kind_of(layer)
    adapter = layer.adapters[name]
    size = max(1, int(np.prod(layer.stack_shape)))
    ranks = _live_ranks(adapter, size)
    a = np.zeros((size,) + adapter.lora_A.shape[len(layer.stack_shape):], np.float32)
    b = np.zeros((size,) + adapter.lora_B.shape[len(layer.stack_shape):], np.float32)
    mixer = None if adapter.lora_mixer is None else np.zeros((size, adapter.rank, adapter.rank), np.float32)
    for i, module in enumerate(layer.module_names):
      if ranks[i] == 0:
        continue
      key_a, key_b = layout.factor_keys(kind, module)
      keys = [key_a, key_b] + ([layout.mixer_key(module)] if mixer is not None else [])
      absent = [k for k in keys if k not in tensors]
      if absent:
        missing += absent
        continue
      r = int(ranks[i])
      want_a, want_b = layout.peft_shapes(kind, a.shape[1:-1] + (r,), (r,) + b.shape[2:])
      for key, want in ((key_a, want_a), (key_b, want_b)):
        if tuple(tensors[key].shape) != tuple(want):
          raise ValueError(
              f"{file}: tensor {key!r} has shape {tuple(tensors[key].shape)} but the model needs "
              f"{tuple(want)} (rank {r} from adapter_config.json's r/rank_pattern): the adapter was "
              "trained on a model of other sizes, or its config does not match its weights."
          )
      a[i, ..., :r] = layout.a_from_peft(kind, tensors.pop(key_a))
      b[i, :r] = layout.b_from_peft(kind, tensors.pop(key_b))
      if mixer is not None:
        w = tensors.pop(layout.mixer_key(module))
        if w.shape != (r, r):
          raise ValueError(f"{file}: tensor {layout.mixer_key(module)!r} has shape {w.shape}, the "
                           f"MoSLoRA mixer of rank {r} needs {(r, r)}.")
        mixer[i, :r, :r] = w.T  # lora_AB(h) = h @ W.T, i.e. M = W.T
    stack = layer.stack_shape
    kernel = type(layer).base_kernel(layer.base_layer)[...]
    a, b = a.reshape(stack + a.shape[1:]), b.reshape(stack + b.shape[1:])
    updates.append((adapter.lora_A, a, _factor_sharding(kernel, len(stack), a.ndim, "A")))
    updates.append((adapter.lora_B, b, _factor_sharding(kernel, len(stack), b.ndim, "B")))
    if mixer is not None:
      mixer = mixer.reshape(stack + mixer.shape[1:])
      updates.append((adapter.lora_mixer, mixer, _factor_sharding(kernel, len(stack), mixer.ndim, "mixer")))
  if missing:
    raise ValueError(
        f"{file} lacks {len(missing)} tensor(s) that adapter_config.json implies, e.g. "
        f"{', '.join(missing[:4])}; the config's target_modules/layers_to_transform do not match the "
        "weights, or the file is incomplete."
    )
  base_updates = _base_weights(model, tensors)
  if tensors:
    raise ValueError(
        f"{file} has {len(tensors)} tensor(s) this model has no place for, e.g. "
        f"{', '.join(sorted(tensors)[:4])}; the adapter targets modules the model lacks (another "
        "architecture or more layers), or adapter_config.json's target_modules leaves them out."
    )
  for variable, value, sharding in updates + base_updates:
    value = np.asarray(value, variable[...].dtype)
    variable[...] = jnp.asarray(value) if sharding is None else jax.device_put(value, sharding)


def _factor_sharding(kernel: jax.Array, stack_ndim: int, ndim: int, factor: str) -> NamedSharding | None:
  """Where a factor of a layer whose kernel is sharded on a mesh goes; None when it is not.

  Stack dims follow the kernel's, ``A [.., in, r]`` its ``in`` dims (all but
  the last), ``B [.., r, out]`` its ``out`` dim; rank dims are replicated.
  """
  sharding = getattr(kernel, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return None
  spec = tuple(sharding.spec) + (None,) * (kernel.ndim - len(sharding.spec))
  if factor == "A":
    dims = spec[:-1] + (None,)
  elif factor == "B":
    dims = spec[:stack_ndim] + (None, spec[-1])
  else:
    dims = spec[:stack_ndim] + (None, None)
  if len(dims) != ndim:
    dims = spec[:stack_ndim] + (None,) * (ndim - stack_ndim)
  return NamedSharding(sharding.mesh, P(*dims))


def _base_weights(model: nnx.Module, tensors: dict) -> list:
  """Base weights PEFT saved with the adapter (``save_embedding_layers``); PEFT loads them into
  the base model, so jlora does too. Consumes the keys it places."""
  updates = []
  for cand in candidates(model):
    if len(cand.names) != 1:
      continue  # PEFT saves only embedding/output layers, never a stacked one
    wrapped = isinstance(cand.module, LoraLayer)
    keys = [f"{layout.PREFIX}{cand.names[0]}.base_layer.weight"] if wrapped else []
    keys.append(f"{layout.PREFIX}{cand.names[0]}.weight")
    key = next((k for k in keys if k in tensors), None)
    if key is None:
      continue
    wrapper = type(cand.module) if wrapped else None
    wrapper = wrapper or lora_layer_type(cand.base)
    kernel = wrapper.base_kernel(cand.base)
    kind = "embed" if wrapper.embedding_init else ("linear" if wrapper.kernel_ndim(cand.base) == 2 else "conv")
    if kind == "conv":
      continue
    value = tensors[key] if kind == "embed" else tensors[key].T
    if tuple(value.shape) != tuple(kernel.shape):
      raise ValueError(
          f"Tensor {key!r} (a base weight PEFT saved with the adapter) has shape "
          f"{tuple(tensors[key].shape)}, which does not fit {cand.names[0]} {tuple(kernel.shape)}: "
          "the vocabulary was resized for the adapter; resize the model's embeddings to match first."
      )
    tensors.pop(key)
    sharding = getattr(kernel[...], "sharding", None)
    updates.append((kernel, value, sharding if isinstance(sharding, NamedSharding) else None))
  return updates

"""``load_peft``: a PEFT adapter directory into a jlora model, read as its kind declares.

The adapter is injected from the directory's config exactly as
``jlora.add_adapter`` would (same targeting, ranks, scalings, rank masks for
stacked layers), then every factor is overwritten with the checkpoint's
tensor (``PeftFormat.tensors``, converted by each parameter's role). The
modules the config selects must be exactly the modules the checkpoint holds;
anything else is an error that names the keys.

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
from jlora.io._peft_check import check_tensors
from jlora.io._peft_config import CONFIG_NAME, from_peft_dict, read_json
from jlora.nn import (
    AdapterKind, LoraConfig, LoraLayer, PeftFormat, add_adapter, candidates, delete_adapter,
    SWAPPABLE_ROLES, hotswap_factors, kind_for_config, kind_of, lora_layer_type, lora_layers, module_copies, peft_config, rewrites_base, set_adapter)

WEIGHTS_NAME = "adapter_model.safetensors"
_CONVERT = (
    "convert it once with torch: `from safetensors.torch import save_file; save_file(torch.load("
    "'adapter_model.bin', weights_only=True), 'adapter_model.safetensors')` (or load it in PEFT and "
    "save_pretrained again, which writes safetensors)"
)


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[LoraConfig, dict[str, np.ndarray]]:
  """The jlora config and the raw tensors of a PEFT adapter directory, checked against each other
  (``check_tensors``: every tensor one the config's kind has, every factor at the config's rank)."""
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
  tensors = dict(_safetensors.read(weights))
  check_tensors(config, tensors, weights)
  return config, tensors


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
    if rewrites_base(getattr(config, "init_lora_weights", None)):  # PiSSA / OLoRA: give the base its weights back
      for _, layer in lora_layers(model):
        if adapter_name in layer.adapters:
          kernel = layer.kernel()
          kernel[...] = (kernel[...] + layer.delta_weight(adapter_name)).astype(kernel.dtype)
    delete_adapter(model, adapter_name)  # leave the model as it was
    raise
  if not is_trainable:
    for _, layer in lora_layers(model):
      if adapter_name in layer.adapters:
        layer.adapters[adapter_name].deterministic = True
  if activate:
    set_adapter(model, adapter_name)
  return model


def peft_format(kind: AdapterKind) -> PeftFormat:
  """``kind``'s PEFT format; a clear error for a kind registered without one."""
  if kind.peft is None:
    raise ValueError(f"{kind.name} adapters have no PEFT checkpoint format (their kind was registered "
                     "without peft=); keep them in jlora's own format (jlora.adapter_state).")
  return kind.peft


def _fill(model: nnx.Module, name: str, tensors: dict, file: Path) -> None:
  """Overwrite adapter ``name``'s parameters with the checkpoint's; consume the used tensors."""
  tensors = dict(tensors)
  missing, updates, shared = [], [], {}
  for _, wrapper in module_copies(model):
    if name in wrapper.adapters:
      missing += _fill_copy(wrapper, name, tensors, file, updates)
  for _, layer in lora_layers(model):
    if name not in layer.adapters:
      continue
    adapter = layer.adapters[name]
    kind = kind_of(adapter)
    fmt = peft_format(kind)
    missing += _fill_layer(layer, adapter, kind, fmt, tensors, file, updates)
    if fmt.shared_from_peft is not None:
      shared.setdefault(id(fmt), (fmt, []))[1].append((layer, adapter))
  if missing:
    raise ValueError(
        f"{file} lacks {len(missing)} tensor(s) that adapter_config.json implies, e.g. "
        f"{', '.join(missing[:4])}; the config's target_modules/layers_to_transform do not match the "
        "weights, or the file is incomplete."
    )
  for fmt, pairs in shared.values():
    try:
      writes = fmt.shared_from_peft(pairs, tensors, peft_config(model)[name])
    except ValueError as e:
      raise ValueError(f"{file}: {e}") from None
    updates += [(variable, value, None) for variable, value in writes]
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


def _fill_copy(layer, name: str, tensors: dict, file: Path, updates: list) -> list:
  """A ``modules_to_save`` copy's weights; returns the keys it lacks."""
  missing = []
  for key, (variable, convert) in layout.module_variables(
      layer.adapters[name].module, layer.module_names[0]).items():
    if key not in tensors:
      missing.append(key)
      continue
    value = convert(tensors.pop(key))
    if tuple(value.shape) != tuple(variable.shape):
      raise ValueError(f"{file}: tensor {key!r} (a modules_to_save copy) does not fit "
                       f"{layer.module_names[0]}: {tuple(value.shape)} vs {tuple(variable.shape)}.")
    sharding = getattr(variable[...], "sharding", None)
    updates.append((variable, value, sharding if isinstance(sharding, NamedSharding) else None))
  return missing


def _fill_layer(layer, adapter, kind: AdapterKind, fmt: PeftFormat, tensors: dict, file: Path,
                updates: list) -> list:
  """One layer's adapter parameters from ``tensors`` (each by its role); returns the keys it lacks.

  A, B and mixers start from zeros (a stacked layer's slot beyond its live
  rank stays zero), every other role from its current values.
  """
  lkind = layout.layout_of(layer)
  window = len(layer.base_layer.kernel_size) if lkind == "conv" else 0
  stack = layer.stack_shape
  size = max(1, int(np.prod(stack)))
  ranks = adapter.live_ranks()
  slots = {}
  for attr in fmt.tensors:
    variable = getattr(adapter, attr)
    role = kind.roles[attr]
    start = (np.zeros(variable.shape, np.float32) if role in ("A", "B", "mixer")
             else np.array(variable[...], np.float32))
    slots[attr] = (variable, role, start.reshape((size,) + variable.shape[len(stack):]))
  missing = []
  for i, module in enumerate(layer.module_names):
    if ranks[i] == 0:
      continue
    keys = {attr: layout.tensor_key(lkind, role, fmt.tensors[attr], module)
            for attr, (_, role, _) in slots.items()}
    absent = [k for k in keys.values() if k not in tensors]
    if absent:
      missing += absent
      continue
    r = int(ranks[i])
    for attr, (variable, role, slot) in slots.items():
      _check_shape(lkind, role, keys[attr], tensors[keys[attr]], slot[i], r, window, file)
      value = layout.from_peft(lkind, role, tensors.pop(keys[attr]))
      if role == "A":
        slot[i, ..., :r] = value
      elif role == "B":
        slot[i, :r] = value
      elif role == "mixer":
        slot[i, :r, :r] = value
      else:
        slot[i] = value.reshape(slot[i].shape)
  kernel = type(layer).base_kernel(layer.base_layer)[...]
  for variable, role, slot in slots.values():
    value = slot.reshape(stack + slot.shape[1:])
    updates.append((variable, value, _factor_sharding(kernel, len(stack), value.ndim, role)))
  return missing


def _check_shape(lkind: str, role: str, key: str, w: np.ndarray, slot: np.ndarray, r: int, window: int,
                 file: Path) -> None:
  """Raise, naming the tensor, if a PEFT tensor of ``role`` does not fit its slot at live rank ``r``."""
  want = layout.to_peft(lkind, role, np.empty(slot.shape, np.int8), r, window).shape
  if role in ("A", "B") and tuple(w.shape) != tuple(want):
    raise ValueError(
        f"{file}: tensor {key!r} has shape {tuple(w.shape)} but the model needs "
        f"{tuple(want)} (rank {r} from adapter_config.json's r/rank_pattern): the adapter was "
        "trained on a model of other sizes, or its config does not match its weights.")
  if role == "mixer" and tuple(w.shape) != tuple(want):
    raise ValueError(f"{file}: tensor {key!r} has shape {w.shape}, the MoSLoRA mixer of rank {r} needs {want}.")
  if role == "magnitude" and w.size != slot.size:
    raise ValueError(f"{file}: tensor {key!r} holds {w.size} magnitudes, "
                     f"the layer has {slot.size} output features.")
  if role not in ("A", "B", "mixer", "magnitude") and w.size != slot.size:
    raise ValueError(f"{file}: tensor {key!r} has shape {tuple(w.shape)}, the model needs "
                     f"{tuple(slot.shape)}: the adapter was trained on a model of other sizes.")


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
  elif factor == "magnitude":  # DoRA's role: one per output feature
    dims = spec[:stack_ndim] + (spec[-1],)
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


def hotswap_adapter(model: nnx.Module, adapter_dir: str | os.PathLike,
                    adapter_name: str = "default") -> nnx.Module:
  """Load a PEFT LoRA adapter's weights into the existing adapter ``adapter_name``, in place.

  PEFT's ``hotswap_adapter``: the model's structure does not change (same
  shapes, dtypes, graph), so functions already jitted over the model's state
  run the new adapter without recompiling. The new adapter may have a
  smaller rank than the slot (it is zero-padded), other alphas and
  per-module ranks, and may leave modules out (they get a zero update); it
  may not adapt modules the slot does not, nor exceed the slot's rank.

  Returns:
    ``model``.
  """
  path = Path(adapter_dir).expanduser()
  config, tensors = read_adapter(path)
  roles = set(kind_for_config(config).roles.values())
  if config.modules_to_save or not {"A", "B"} <= roles <= SWAPPABLE_ROLES:
    raise ValueError(f"{path}: hot-swap replaces LoRA / DoRA factors only; this adapter is "
                     f"{kind_for_config(config).name} or also has modules_to_save copies. Load it with "
                     "jlora.load_peft instead.")
  kinds = {}
  for _, layer in lora_layers(model):
    if adapter_name in layer.adapters:
      kinds.update({module: layout.layout_of(layer) for module in layer.module_names})
  factors, unknown = {}, []
  for key in sorted(tensors):
    module = next((key[len(layout.PREFIX):-len(s)] for s in (".lora_A.weight", ".lora_embedding_A")
                   if key.startswith(layout.PREFIX) and key.endswith(s)), None)
    if module is None:
      continue
    if module not in kinds:
      unknown.append(module)
      continue
    key_a, key_b = layout.factor_keys(kinds[module], module)
    if key_b not in tensors:
      raise ValueError(f"{path}: {key_a!r} has no matching {key_b!r}; the adapter file is incomplete.")
    entry = (layout.a_from_peft(kinds[module], tensors[key_a]), layout.b_from_peft(kinds[module], tensors[key_b]),
             config.scaling_for(module))
    if layout.magnitude_key(module) in tensors:
      entry += (tensors[layout.magnitude_key(module)],)
    factors[module] = entry
  if unknown:
    raise ValueError(
        f"{path} adapts modules that adapter {adapter_name!r} does not, e.g. {', '.join(unknown[:4])}; "
        "hot-swapping cannot add layers (that would change the model's structure). Load it as a new "
        "adapter instead (jlora.load_peft).")
  try:
    hotswap_factors(model, adapter_name, factors)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  return model

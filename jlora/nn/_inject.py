"""Model-level adapter management: inject, add, delete, activate, disable.

Adapters are injected in place: each selected layer is replaced by its
registered ``LoraLayer`` wrapper. The configs of a model's adapters live on the
model root (``peft_config(model)``), as PEFT keeps them on ``PeftModel``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora.nn._config import AdapterConfig, LoraConfig, MoSLoraConfig, WLoraConfig
from jlora.nn._layer import LoraLayer
from jlora.nn._adapters import LoraAdapter
from jlora.nn._dora import DoraAdapter
from jlora.nn._init import rewrites_base
from jlora.nn._modules_to_save import ModuleCopy, ModulesToSaveLayer
from jlora.nn._new_adapters import frozen_copy, new_wlora_adapter
from jlora.nn._registry import lora_layer_type, registered_types
from jlora.nn._targets import (
    Candidate, candidates, describe, is_selected, name_matches, output_head_name)
from jlora.nn._variables import LoraBuffer, UpstreamLoraParam

CONFIG_ATTR = "jlora_peft_config"
BASE_ROUTE = "__base__"


def peft_config(model: nnx.Module) -> dict[str, AdapterConfig]:
  """Adapter name -> config, in the order the adapters were added."""
  return dict(getattr(model, CONFIG_ATTR, ()))


def _set_configs(model: nnx.Module, configs: Mapping[str, AdapterConfig]) -> None:
  # A tuple of pairs of frozen dataclasses: hashable, so it can sit in a graphdef.
  if configs:
    setattr(model, CONFIG_ATTR, tuple(configs.items()))
  elif hasattr(model, CONFIG_ATTR):  # no adapters left: the model is the plain base model again
    delattr(model, CONFIG_ATTR)


def lora_layers(model: nnx.Module) -> Iterator[tuple[tuple, LoraLayer]]:
  """``(path, layer)`` for every LoRA layer in the model."""
  for path, node in nnx.iter_graph(model):
    if isinstance(node, LoraLayer):
      yield path, node


def get_peft_model(model: nnx.Module, config: AdapterConfig, adapter_name: str = "default") -> nnx.Module:
  """Inject adapter ``adapter_name`` into ``model`` (in place) and activate it.

  Returns the same model object, now holding LoRA layers. For a
  ``WLoraConfig`` the upstream adapters must already be in the model
  (``jlora.get_peft_model`` at the top level also accepts PEFT directories).
  """
  add_adapter(model, adapter_name, config)
  set_adapter(model, adapter_name)
  return model


def add_adapter(model: nnx.Module, adapter_name: str, config: AdapterConfig) -> None:
  """Add adapter ``adapter_name`` to ``model`` without activating it."""
  configs = peft_config(model)
  if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE_ROUTE:
    raise ValueError(f"Invalid adapter name {adapter_name!r}.")
  if adapter_name in configs:
    raise ValueError(
        f"The model already has an adapter named {adapter_name!r}; pick another name or "
        "delete_adapter() it first."
    )
  if not isinstance(config, (LoraConfig, WLoraConfig)):
    raise TypeError(f"Expected a LoraConfig, MoSLoraConfig or WLoraConfig, got {type(config).__name__}.")
  try:
    if isinstance(config, WLoraConfig):
      _add_wlora(model, adapter_name, config, configs)
    else:
      _add_lora(model, adapter_name, config)
  except BaseException:
    _discard(model, adapter_name)
    raise
  configs[adapter_name] = config
  _set_configs(model, configs)


def _discard(model: nnx.Module, adapter_name: str) -> None:
  """Undo a failed ``add_adapter``: drop ``adapter_name`` and unwrap the layers it alone wrapped."""
  for path, layer in list(lora_layers(model)):
    if adapter_name in layer.adapters:
      layer.remove(adapter_name)
    if not layer.adapters:
      _replace(model, path, layer.base_layer)


def _wrapper_for(cand: Candidate) -> LoraLayer:
  """The LoRA layer at ``cand.path``, or a new one around the base module (not yet in the model)."""
  if isinstance(cand.module, LoraLayer):
    return cand.module
  return lora_layer_type(cand.module)(cand.module, cand.names)


def _add_lora(model: nnx.Module, adapter_name: str, config: LoraConfig) -> None:
  if config.target_modules is None:
    raise ValueError(
        "LoraConfig.target_modules is required: a list of module names (e.g. ['q_proj', "
        "'v_proj']), a regex, or 'all-linear'."
    )
  head = output_head_name(model)
  cands = list(candidates(model))
  if not cands:
    kinds = ", ".join(sorted(t.__name__ for t in registered_types()))
    raise ValueError(
        f"{type(model).__name__} has no layers that can take LoRA (layer types with a LoRA wrapper: "
        f"{kinds}); add such layers, or register a wrapper for yours with jlora.register_lora_layer."
    )
  plans = []
  for cand in cands:
    selected = [is_selected(config, name, cand, head) for name in cand.names]
    if any(selected):
      plans.append((cand, selected))
  if not plans:
    raise ValueError(
        f"target_modules={config.target_modules!r} matches no module of the model "
        f"(layers_to_transform={config.layers_to_transform}). Modules that can take LoRA:\n  "
        + describe(cands)
    )
  mixer_init = config.mixer_init if isinstance(config, MoSLoraConfig) else None
  root_key = jax.random.key(config.seed)
  built = []  # build every wrapper and adapter first, so an error leaves the model as it was
  for index, (cand, selected) in enumerate(plans):
    ranks = [config.rank_for(n) if s else 0 for n, s in zip(cand.names, selected)]
    scalings = [config.scaling_for(n) if s else 0.0 for n, s in zip(cand.names, selected)]
    layer = _wrapper_for(cand)
    adapter = layer.new_lora_adapter(
        jax.random.fold_in(root_key, index), ranks, scalings,
        init_lora_weights=config.init_lora_weights, mixer_init=mixer_init, use_dora=config.use_dora,
        dropout=config.lora_dropout)
    built.append((cand, layer, adapter))
  built += _modules_to_save(model, config, cands, [cand for cand, _ in plans])
  for cand, layer, adapter in built:
    if layer is not cand.module:
      _replace(model, cand.path, layer)
    layer.add(adapter_name, adapter)
    if rewrites_base(config.init_lora_weights) and isinstance(adapter, LoraAdapter):
      # PiSSA / OLoRA: the base keeps the residual W - s·A·B, so the output starts unchanged.
      kernel = layer.kernel()
      kernel[...] = (kernel[...] - layer.delta_weight(adapter_name)).astype(kernel.dtype)


def _modules_to_save(model, config: LoraConfig, cands: list[Candidate], lora_targets) -> list:
  """``(candidate, ModulesToSaveLayer, ModuleCopy)`` for each module in ``config.modules_to_save``."""
  if not config.modules_to_save:
    return []
  wanted = lambda name: any(name == m or name.endswith("." + m) for m in config.modules_to_save)
  built = []
  for cand in cands:
    if not any(wanted(n) for n in cand.names):
      continue
    if any(cand is t for t in lora_targets) or (
        isinstance(cand.module, LoraLayer) and not isinstance(cand.module, ModulesToSaveLayer)):
      raise ValueError(
          f"{cand.names[0]} is both a LoRA target and in modules_to_save; a module is either "
          "adapted or fully trained, so remove it from one of target_modules / modules_to_save.")
    layer = cand.module if isinstance(cand.module, ModulesToSaveLayer) else ModulesToSaveLayer(
        cand.module, cand.names)
    built.append((cand, layer, ModuleCopy(layer.base_layer)))
  if not built:
    raise ValueError(
        f"modules_to_save={list(config.modules_to_save)} matches no module of the model. Modules "
        "that can be saved in full:\n  " + describe(cands))
  return built


def _add_wlora(model, adapter_name: str, config: WLoraConfig, configs) -> None:
  missing = [u for u in config.upstream_loras if u not in configs]
  if missing:
    raise ValueError(
        f"WLoRA upstream adapters {missing} are not in the model (it has {list(configs)}). "
        "Load them first (jlora.load_peft) or pass PEFT directories to jlora.get_peft_model."
    )
  plans = []  # validate every layer before touching any, so an error leaves the model as it was
  for _, layer in lora_layers(model):
    present = [u for u in config.upstream_loras if u in layer.adapters]
    if not present:
      continue
    if len(present) != len(config.upstream_loras):
      absent = sorted(set(config.upstream_loras) - set(present))
      raise ValueError(
          f"WLoRA upstreams must adapt the same modules, but {layer.module_names[0]} has "
          f"{present} and not {absent}."
      )
    keep = [config.target_modules is None or name_matches(config.target_modules, n)
            for n in layer.module_names]
    if not any(keep):
      continue
    upstreams = []
    for name in config.upstream_loras:
      adapter = layer.adapters[name]
      if not isinstance(adapter, LoraAdapter) or isinstance(adapter, DoraAdapter):
        raise ValueError(f"WLoRA upstream {name!r} must be a LoRA/MoSLoRA adapter, not WLoRA or DoRA.")
      upstreams.append(adapter)
    plans.append((layer, upstreams, keep))
  if not plans:
    raise ValueError(
        f"WLoRA adapter {adapter_name!r} selects no layer: target_modules="
        f"{config.target_modules!r} matches none of the upstreams' layers."
    )
  for layer, upstreams, keep in plans:
    frozen = [frozen_copy(adapter, UpstreamLoraParam) for adapter in upstreams]
    if not all(keep):  # stacked layers the targets leave out get no update
      mask = jnp.asarray(keep, jnp.float32).reshape(layer.stack_shape)
      for upstream in frozen:
        upstream.scaling[...] = upstream.scaling[...] * mask
    layer.add(adapter_name, new_wlora_adapter(layer, frozen))


def delete_adapter(model: nnx.Module, adapter_name: str) -> None:
  """Remove an adapter everywhere; layers left without adapters are unwrapped."""
  configs = _require(model, [adapter_name])
  for path, layer in list(lora_layers(model)):
    if adapter_name in layer.adapters:
      layer.remove(adapter_name)
    if not layer.adapters:
      _replace(model, path, layer.base_layer)
  del configs[adapter_name]
  _set_configs(model, configs)


def _replace(model, path: tuple, new) -> None:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if isinstance(path[-1], int):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def _require(model, names: Sequence[str]) -> dict:
  configs = peft_config(model)
  unknown = [n for n in names if n not in configs]
  if unknown:
    raise ValueError(f"Unknown adapter(s) {unknown}; the model has {list(configs) or 'none'}.")
  return configs


def set_adapter(model: nnx.Module, adapter_names: str | Sequence[str]) -> None:
  """Activate one adapter or several at once (their deltas add)."""
  names = (adapter_names,) if isinstance(adapter_names, str) else tuple(adapter_names)
  if not names:
    raise ValueError("set_adapter needs at least one adapter name.")
  _require(model, names)
  for _, layer in lora_layers(model):
    layer.active_adapters = tuple(n for n in names if n in layer.adapters)


def active_adapters(model: nnx.Module) -> tuple[str, ...]:
  """Names active in at least one layer, in configuration order."""
  live = {n for _, layer in lora_layers(model) for n in layer.active_adapters}
  return tuple(n for n in peft_config(model) if n in live)


@contextlib.contextmanager
def disable_adapters(model: nnx.Module):
  """Within the block the model computes its base output only.

  Merged adapters are unmerged first (and stay unmerged, as in PEFT): the
  base output needs the base kernels back.
  """
  layers = [layer for _, layer in lora_layers(model)]
  previous = [layer.disabled for layer in layers]
  for layer in layers:
    layer.unmerge()
    layer.disabled = True
  try:
    yield model
  finally:
    for layer, was in zip(layers, previous):
      layer.disabled = was


@contextlib.contextmanager
def per_sample_adapters(model: nnx.Module, adapter_names: Sequence[str]):
  """Within the block, batch row i uses adapter ``adapter_names[i]`` only.

  PEFT's ``model(x, adapter_names=[...])``: ``"__base__"`` rows get the base
  model. The batch size of every call inside the block must equal
  ``len(adapter_names)``. As in PEFT, no adapter may be merged (a merged
  adapter is in the base kernel, so every row, ``"__base__"`` ones too, would see it).
  """
  names = list(adapter_names)
  routes = tuple(dict.fromkeys(n for n in names if n != BASE_ROUTE))
  _require(model, routes)
  layers = [layer for _, layer in lora_layers(model)]
  for layer in layers:
    if any(isinstance(layer.adapters.get(n), DoraAdapter) for n in routes):
      raise ValueError("per_sample_adapters cannot route DoRA adapters (PEFT: \"Cannot pass "
                       "`adapter_names` when DoRA is enabled\"); run one adapter per batch instead.")
    if layer.merged_adapters:
      raise ValueError(
          f"per_sample_adapters cannot run with merged adapters {list(layer.merged_adapters)}; "
          "unmerge_adapter() first."
      )
  one_hot = np.zeros((len(names), len(routes)), np.float32)
  for row, name in enumerate(names):
    if name != BASE_ROUTE:
      one_hot[row, routes.index(name)] = 1.0
  for layer in layers:
    stacked = np.broadcast_to(one_hot, layer.stack_shape + one_hot.shape)
    layer.routing = LoraBuffer(jnp.asarray(stacked))
    layer.routing_names = routes
  try:
    yield model
  finally:
    for layer in layers:
      layer.routing = None
      layer.routing_names = ()

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

from jlora.nn._config import AdapterConfig
from jlora.nn._kinds import AdapterKind, kind_for_config, kind_of
from jlora.nn._layer import LoraLayer
from jlora.nn._modules_to_save import ModuleCopy, ModulesToSaveWrapper
from jlora.nn._registry import lora_layer_type, registered_types
from jlora.nn._targets import Candidate, candidates, describe, is_selected, output_head_name
from jlora.nn._variables import LoraBuffer

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


def module_copies(model: nnx.Module) -> Iterator[tuple[tuple, ModulesToSaveWrapper]]:
  """``(path, wrapper)`` for every ``modules_to_save`` wrapper in the model."""
  for path, node in nnx.iter_graph(model):
    if isinstance(node, ModulesToSaveWrapper):
      yield path, node


def _holders(model: nnx.Module) -> list:
  """``(path, module)`` of everything that holds adapters: LoRA layers and module-copy wrappers."""
  return list(lora_layers(model)) + list(module_copies(model))


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
  """Add adapter ``adapter_name`` to ``model`` without activating it.

  ``config`` is any registered kind's config (``LoraConfig``, ``MoSLoraConfig``,
  ``WLoraConfig``, ... see ``register_adapter_kind``).
  """
  configs = peft_config(model)
  if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE_ROUTE:
    raise ValueError(f"Invalid adapter name {adapter_name!r}.")
  if adapter_name in configs:
    raise ValueError(
        f"The model already has an adapter named {adapter_name!r}; pick another name or "
        "delete_adapter() it first."
    )
  kind = kind_for_config(config)
  try:
    _install(model, adapter_name, config, kind)
  except BaseException:
    _discard(model, adapter_name)
    raise
  configs[adapter_name] = config
  _set_configs(model, configs)


def _discard(model: nnx.Module, adapter_name: str) -> None:
  """Undo a failed ``add_adapter``: drop ``adapter_name`` and unwrap the layers it alone wrapped."""
  for path, layer in _holders(model):
    if adapter_name in layer.adapters:
      layer.remove(adapter_name)
    if not layer.adapters:
      replace_module(model, path, layer.base_layer)


def _wrapper_for(cand: Candidate) -> LoraLayer:
  """The LoRA layer at ``cand.path``, or a new one around the base module (not yet in the model)."""
  if isinstance(cand.module, LoraLayer):
    return cand.module
  if isinstance(cand.module, ModulesToSaveWrapper):
    raise ValueError(
        f"{cand.names[0]} is in modules_to_save of adapter(s) {list(cand.module.adapters)}, so it is "
        "trained in full and cannot also take this adapter; leave it out of target_modules.")
  return lora_layer_type(cand.module)(cand.module, cand.names)


def _install(model: nnx.Module, adapter_name: str, config, kind: AdapterKind) -> None:
  """Build every adapter of ``config`` first (so an error leaves the model as it was), then add them."""
  if kind.inject is not None:
    for layer, adapter in kind.inject(model, adapter_name, config):
      layer.add(adapter_name, adapter)
    return
  if getattr(config, "modules_to_save", None) and any(_names(m, output_head_name(model))
                                                      for m in config.modules_to_save):
    untie_output_head(model)
  cands = list(candidates(model))
  built = _build_targeted(model, config, kind, cands)
  copies = _modules_to_save(model, config, cands, [cand for cand, _, _ in built])
  for cand, layer, adapter in built + copies:
    if layer is not cand.module:
      replace_module(model, cand.path, layer)
    layer.add(adapter_name, adapter)
  if kind.after_add is not None:
    for _, layer, adapter in built:
      kind.after_add(layer, adapter_name, adapter, config)


def _build_targeted(model: nnx.Module, config, kind: AdapterKind, cands: list[Candidate]) -> list:
  """``(candidate, layer, adapter)`` for every module ``config`` targets, built by ``kind.build``."""
  if config.target_modules is None:
    raise ValueError(
        f"{type(config).__name__}.target_modules is required: a list of module names (e.g. ['q_proj', "
        "'v_proj']), a regex, or 'all-linear'."
    )
  head = output_head_name(model)
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
  root_key = jax.random.key(config.seed)
  planned = [(cand, _wrapper_for(cand), selected) for cand, selected in plans]
  targets = tuple(layer for _, layer, _ in planned)
  built = []
  for index, (cand, layer, selected) in enumerate(planned):
    ranks = [config.rank_for(n) if s else 0 for n, s in zip(cand.names, selected)]
    scalings = [config.scaling_for(n) if s else 0.0 for n, s in zip(cand.names, selected)]
    key = jax.random.fold_in(root_key, index)
    built.append((cand, layer, kind.build(layer, key, ranks, scalings, config, targets=targets)))
  return built


def _names(pattern: str, name: str) -> bool:
  """Whether a ``modules_to_save`` entry names module ``name`` (PEFT: equal, or a dotted suffix)."""
  return name == pattern or name.endswith("." + pattern)


def untie_output_head(model: nnx.Module, embedding: str | None = None) -> bool:
  """Give a model whose output head is its input embedding (tied) a head module of its own.

  A model says its head is tied by ``tied_output_head`` (the embedding's
  module name) and unties it with ``untie_output_head()`` (a head that is a
  copy of the base embedding: outputs unchanged). Needed where the head must
  differ from the embedding: a ``modules_to_save`` copy of the head (PEFT
  copies the tied ``lm_head``), or merging LoRA into that embedding (the head
  keeps the base table, as in the adapted model). With ``embedding`` given,
  only when the head is tied to that module. Returns whether it untied.
  """
  tied = getattr(model, "tied_output_head", None)
  if not tied or (embedding is not None and embedding != tied) or not hasattr(model, "untie_output_head"):
    return False
  model.untie_output_head()
  return True


def _modules_to_save(model, config, cands: list[Candidate], lora_targets) -> list:
  """``(candidate, ModulesToSaveWrapper, ModuleCopy)`` for each module in ``config.modules_to_save``."""
  if not getattr(config, "modules_to_save", None):
    return []
  wanted = lambda name: any(_names(m, name) for m in config.modules_to_save)
  built = []
  for cand in cands:
    if not any(wanted(n) for n in cand.names):
      continue
    if any(cand is t for t in lora_targets) or isinstance(cand.module, LoraLayer):
      raise ValueError(
          f"{cand.names[0]} is both a LoRA target and in modules_to_save; a module is either "
          "adapted or fully trained, so remove it from one of target_modules / modules_to_save.")
    layer = cand.module if isinstance(cand.module, ModulesToSaveWrapper) else ModulesToSaveWrapper(
        cand.module, cand.names)
    built.append((cand, layer, ModuleCopy(layer.base_layer)))
  if not built:
    raise ValueError(
        f"modules_to_save={list(config.modules_to_save)} matches no module of the model. Modules "
        "that can be saved in full:\n  " + describe(cands))
  return built


def delete_adapter(model: nnx.Module, adapter_name: str) -> None:
  """Remove an adapter everywhere; layers left without adapters are unwrapped.

  All or nothing: a merged adapter is refused before anything is touched. If
  the deleted adapter was active, the other active adapters stay active; with
  none left, the first remaining adapter in name order becomes active (PEFT's
  ``delete_adapter`` picks ``sorted(remaining)[0]``).
  """
  configs = _require(model, [adapter_name])
  merged = [layer.module_names[0] for _, layer in lora_layers(model) if adapter_name in layer.merged_adapters]
  if merged:
    raise ValueError(f"Adapter {adapter_name!r} is merged; unmerge it before deleting it "
                     f"(jlora.unmerge_adapter(model, [{adapter_name!r}])); it is merged into {merged[0]}.")
  was_active = active_adapters(model)
  for path, layer in _holders(model):
    if adapter_name in layer.adapters:
      layer.remove(adapter_name)
    if not layer.adapters:
      replace_module(model, path, layer.base_layer)
  del configs[adapter_name]
  _set_configs(model, configs)
  if adapter_name in was_active and configs:
    still = tuple(n for n in was_active if n != adapter_name)
    set_adapter(model, still or sorted(configs)[0])


def replace_module(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
  """Put ``new`` at ``path`` (attribute names and list indices from ``nnx.iter_graph``) in ``model``."""
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
  """Activate one adapter or several at once (their deltas add).

  A ``modules_to_save`` module runs one copy, so two adapters that both copy
  the same module cannot be active together (as in PEFT).
  """
  names = (adapter_names,) if isinstance(adapter_names, str) else tuple(adapter_names)
  if not names:
    raise ValueError("set_adapter needs at least one adapter name.")
  _require(model, names)
  for _, wrapper in module_copies(model):
    owners = [n for n in names if n in wrapper.adapters]
    if len(owners) > 1:
      raise ValueError(
          f"Only one adapter can be set at a time for the modules_to_save copy of {wrapper.module_names[0]}, "
          f"and adapters {owners} each have one. Activate only one of them, or give the module to one "
          "adapter's modules_to_save only.")
  for _, layer in _holders(model):
    layer.active_adapters = tuple(n for n in names if n in layer.adapters)


def active_adapters(model: nnx.Module) -> tuple[str, ...]:
  """Names active in at least one layer, in configuration order."""
  live = {n for _, layer in _holders(model) for n in layer.active_adapters}
  return tuple(n for n in peft_config(model) if n in live)


@contextlib.contextmanager
def disable_adapters(model: nnx.Module):
  """Within the block the model computes its base output only.

  Merged adapters are unmerged first (and stay unmerged, as in PEFT): the
  base output needs the base kernels back.
  """
  layers = [layer for _, layer in _holders(model)]
  previous = [layer.disabled for layer in layers]
  for _, layer in lora_layers(model):
    layer.unmerge()
  for layer in layers:
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
  copies = [wrapper.module_names[0] for _, wrapper in module_copies(model) if wrapper.adapters]
  if copies:
    raise ValueError(f"per_sample_adapters cannot route modules_to_save copies (the model has them at "
                     f"{copies}); run one adapter per batch instead.")
  layers = [layer for _, layer in lora_layers(model)]
  for layer in layers:
    hooked = sorted({kind_of(layer.adapters[n]).name for n in routes
                     if n in layer.adapters and layer.adapters[n].output_hook})
    if hooked:
      raise ValueError(f"per_sample_adapters cannot route {' or '.join(hooked)} adapters, which act on the "
                       "layer's whole output (PEFT: \"Cannot pass `adapter_names` when DoRA is enabled\"); "
                       "run one adapter per batch instead.")
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

"""Which modules of a model an adapter config selects, PEFT's rules.

Module names are dotted paths (``model.layers.3.self_attn.q_proj``). Layers
stacked for ``nnx.scan`` hold every layer in one module; a model marks such a
container with ``mark_stacked`` and each stacked layer then gets its own name
with the index inserted after the container, exactly as PEFT would name it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterator

from flax import nnx

from jlora.nn._layer import LoraLayer
from jlora.nn._modules_to_save import ModulesToSaveWrapper
from jlora.nn._registry import lora_layer_type

STACK_ATTR = "jlora_stack_size"
OUTPUT_HEAD_ATTR = "jlora_output_head"


def mark_stacked(module: nnx.Module, num_layers: int) -> nnx.Module:
  """Declare that ``module`` holds ``num_layers`` layers stacked on axis 0.

  Call it on the container a model scans over (e.g. ``model.layers`` built
  with ``nnx.vmap``), so adapter targeting and checkpoint keys can name each
  layer as ``layers.<i>``.
  """
  setattr(module, STACK_ATTR, int(num_layers))
  return module


WRAPPERS = (LoraLayer, ModulesToSaveWrapper)
"""What jlora puts around a base module (the module itself is its ``base_layer``)."""


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A module that can carry an adapter.

  Attributes:
    path: key path from the model root.
    module: the base module, or an existing ``LoraLayer`` / ``ModulesToSaveWrapper`` around it.
    names: PEFT-style name of each stacked layer (one if not stacked).
  """

  path: tuple
  module: nnx.Module
  names: tuple[str, ...]

  @property
  def base(self) -> nnx.Module:
    return self.module.base_layer if isinstance(self.module, WRAPPERS) else self.module


def dotted(path: tuple) -> str:
  return ".".join(str(key) for key in path)


def candidates(model: nnx.Module) -> Iterator[Candidate]:
  """Every registered-type module (or existing LoRA layer), in graph order."""
  nodes = dict(nnx.iter_graph(model))
  inside_lora = [path for path, node in nodes.items() if isinstance(node, WRAPPERS)]
  for path, node in nodes.items():
    if not isinstance(node, nnx.Module):
      continue
    if isinstance(node, WRAPPERS):
      yield Candidate(path, node, node.module_names)
      continue
    if lora_layer_type(node) is None:
      continue
    if any(path[: len(p)] == p and len(path) > len(p) for p in inside_lora):
      continue
    yield Candidate(path, node, _stacked_names(nodes, path, node))


def _stacked_names(nodes: dict, path: tuple, module: nnx.Module) -> tuple[str, ...]:
  stack_shape = lora_layer_type(module).stack_shape_of(module)
  size = math.prod(stack_shape)
  for depth in range(len(path), -1, -1):
    container = nodes.get(path[:depth])
    count = getattr(container, STACK_ATTR, None) if container is not None else None
    if count is None:
      continue
    if count != size:
      raise ValueError(
          f"{dotted(path[:depth])} is marked as {count} stacked layers but "
          f"{dotted(path)} has a stack of shape {stack_shape}."
      )
    head, tail = dotted(path[:depth]), dotted(path[depth:])
    return tuple(".".join(p for p in (head, str(i), tail) if p) for i in range(count))
  return (dotted(path),) * max(1, size)


def name_matches(patterns, name: str) -> bool:
  """PEFT's ``target_modules`` rule: full regex match, or suffix on a dot."""
  if patterns is None:
    return False
  if isinstance(patterns, str):
    return re.fullmatch(patterns, name) is not None
  return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str, layers_pattern) -> int | None:
  """The layer index PEFT reads from a module name, or None.

  As PEFT: the *first* numbered segment (``layers.1.experts.0.w`` is layer 1),
  after one of ``layers_pattern`` when given.
  """
  patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
  regexes = ([r".*?\.[^.]*\.(\d+)\."] if not patterns
             else [rf"(?:^|.*?\.){p}\.(\d+)\." for p in patterns])
  for regex in regexes:
    found = re.match(regex, name)
    if found:
      return int(found.group(1))
  return None


def is_selected(config, name: str, candidate: Candidate, output_head: str) -> bool:
  """Whether ``config`` puts an adapter on the module (or stacked layer) ``name``."""
  targets = config.target_modules
  if targets == "all-linear":
    wrapper = lora_layer_type(candidate.base)
    selected = bool(wrapper and wrapper.linear_like) and not name_matches((output_head,), name)
  else:
    selected = name_matches(targets, name)
  if selected and name_matches(getattr(config, "exclude_modules", None), name):
    selected = False
  layers = getattr(config, "layers_to_transform", None)
  if selected and layers is not None:
    selected = layer_index(name, getattr(config, "layers_pattern", None)) in layers
  return selected


def output_head_name(model: nnx.Module) -> str:
  """The output head that ``"all-linear"`` leaves out (``lm_head`` unless the model says)."""
  return getattr(model, OUTPUT_HEAD_ATTR, "lm_head")


def describe(cands: list[Candidate]) -> str:
  """A short list of adaptable module names for error messages."""
  names = []
  for cand in cands:
    label = cand.names[0] if len(cand.names) == 1 else f"{cand.names[0]} … {cand.names[-1]}"
    names.append(f"{label} ({type(cand.base).__name__})")
  return "\n  ".join(names) if names else "(none: the model has no layer of a registered type)"

"""The family registry: how a model family is read, built, named, sharded and exported.

A family registers itself with ``register_family(Family(...))``, in its own
module: the ``model_type`` values it reads from ``config.json``, how a
transformers config becomes its config (and which options it refuses), its
model class (a ``LanguageModel``), how its parameters are named in HF
checkpoints, its sharding rules and its PEFT quirks. The Llama family
(llama, mistral, qwen2, qwen3) and GPT-2 are registered through the same
call; loading (``jlora.io``), sharding and PEFT export ask the registry,
never a ``model_type`` string.

A minimal registration::

    register_family(Family(
        name="toy", model_types=("toy",), from_hf=toy_config_from_hf, model_class=ToyLM,
        sharding_rules=((r"(^|\\.)(wq|wk|wv)$", ("embed", "heads")),)))
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

from jlora.models._config import FamilyConfig
from jlora.models._language_model import LanguageModel

LOGICAL_AXES = ("embed", "heads", "mlp", "vocab")


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family, as the registry knows it.

  Attributes:
    name: the family's name (``"llama"``, ``"gpt2"``).
    model_types: the ``config.json`` ``model_type`` values it reads.
    from_hf: a transformers config → the family's ``FamilyConfig``; raises
      ValueError naming an option the family does not implement.
    model_class: a ``LanguageModel`` subclass, built as
      ``model_class(config, dtype=..., param_dtype=..., rngs=...)``.
    transpose_kernels: checkpoint kernels are ``nn.Linear``'s ``[out, in]``
      (transposed to Flax's ``[in, out]`` on load); False for GPT-2's ``Conv1D``.
    checkpoint_names: renames a checkpoint's tensors (``{name: tensor}``)
      into the model's parameter names before matching, e.g. GPT-2
      checkpoints saved without the ``transformer.`` prefix, or per-expert
      tensors stacked into one; None: as stored.
    export_names: the reverse of ``checkpoint_names`` for ``save_pretrained``:
      the model's tensors (``{HF name: array}`` in checkpoint layout) into
      the tensors the checkpoint holds; None: written as named.
    ignored_tensors: regexes of checkpoint tensors the model does not need
      (buffers, rotary caches); loading skips them instead of refusing.
    sharding_rules: ``(regex, (in, out))`` pairs: a module path matching the
      regex has a kernel whose dims are these logical axes (``LOGICAL_AXES``;
      see ``jlora.models._sharding``).
    fan_in_fan_out: PEFT adapters of this family store ``[in, out]`` kernels
      (PEFT's ``fan_in_fan_out``, GPT-2).
  """

  name: str
  model_types: tuple[str, ...]
  from_hf: Callable[[Any], FamilyConfig]
  model_class: type
  transpose_kernels: bool = True
  checkpoint_names: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
  export_names: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
  ignored_tensors: tuple[str, ...] = ()
  sharding_rules: tuple[tuple[str, tuple[str, str]], ...] = ()
  fan_in_fan_out: bool = False

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"Family name={self.name!r} must be a non-empty string.")
    types = self.model_types
    if isinstance(types, str) or not types or not all(isinstance(t, str) and t for t in types):
      raise ValueError(f"Family {self.name!r}: model_types={types!r} must be a non-empty tuple of model_type "
                       "strings, e.g. ('llama',).")
    object.__setattr__(self, "model_types", tuple(types))
    if not callable(self.from_hf):
      raise ValueError(f"Family {self.name!r}: from_hf must map a transformers config to the family's config.")
    if not (isinstance(self.model_class, type) and issubclass(self.model_class, LanguageModel)):
      raise ValueError(f"Family {self.name!r}: model_class={self.model_class!r} must be a subclass of "
                       "jlora.models.LanguageModel (the protocol jlora.train relies on).")
    for pattern, axes in self.sharding_rules:
      re.compile(pattern)
      if len(axes) != 2 or not set(axes) <= set(LOGICAL_AXES):
        raise ValueError(f"Family {self.name!r}: sharding rule {pattern!r} has axes {axes!r}; give the kernel's "
                         f"(in, out) logical axes from {', '.join(LOGICAL_AXES)}.")
    for pattern in self.ignored_tensors:
      re.compile(pattern)

  def read_checkpoint_names(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """``tensors`` under the model's parameter names (``checkpoint_names`` applied)."""
    return dict(tensors) if self.checkpoint_names is None else self.checkpoint_names(tensors)

  def write_checkpoint_names(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """The model's ``tensors`` as the checkpoint stores them (``export_names`` applied)."""
    return dict(tensors) if self.export_names is None else self.export_names(tensors)

  def ignores(self, tensor_name: str) -> bool:
    """Whether the checkpoint tensor ``tensor_name`` is one the model does not need."""
    return any(re.fullmatch(p, tensor_name) for p in self.ignored_tensors)


_BY_TYPE: dict[str, Family] = {}


def register_family(family: Family) -> Family:
  """Make ``jlora.from_pretrained`` (and the rest) read ``family.model_types`` as ``family``.

  Registering a family again under its name replaces it; a ``model_type``
  another family already reads is refused. Returns ``family``.
  """
  if not isinstance(family, Family):
    raise ValueError(f"register_family takes a jlora.models.Family, got {type(family).__name__}.")
  taken = {t: f.name for t, f in _BY_TYPE.items() if t in family.model_types and f.name != family.name}
  if taken:
    raise ValueError(f"model_type(s) {', '.join(f'{t!r} ({n})' for t, n in taken.items())} already belong to "
                     "another family; pick other model_types or register that family under this name.")
  for t in [t for t, f in _BY_TYPE.items() if f.name == family.name]:
    del _BY_TYPE[t]
  _BY_TYPE.update(dict.fromkeys(family.model_types, family))
  return family


def families() -> tuple[Family, ...]:
  """The registered families, in registration order."""
  return tuple(dict.fromkeys(_BY_TYPE.values()))


def supported_model_types() -> tuple[str, ...]:
  """Every ``model_type`` a registered family reads."""
  return tuple(_BY_TYPE)


def family_for(model_type: str | None) -> Family:
  """The family that reads ``model_type``; ValueError listing the supported ones if none does."""
  if model_type not in _BY_TYPE:
    raise ValueError(f"config.json has model_type={model_type!r}, which jlora does not implement; supported "
                     f"model types: {', '.join(_BY_TYPE)}.")
  return _BY_TYPE[model_type]


def family_of(model: Any) -> Family | None:
  """The family of a ``LanguageModel`` (by its config's ``model_type``); None for other models."""
  if not isinstance(model, LanguageModel):
    return None
  return _BY_TYPE.get(model.config.model_type)


def from_hf_config(hf) -> FamilyConfig:
  """The family config of a ``transformers`` config object (its family's ``from_hf``).

  Raises:
    ValueError: unknown ``model_type`` (lists the supported ones) or an
      option the family does not implement.
  """
  return family_for(getattr(hf, "model_type", None)).from_hf(hf)


def model_class(config: FamilyConfig) -> type:
  """The ``LanguageModel`` class of ``config.model_type``'s family."""
  return family_for(config.model_type).model_class


def sharding_rules() -> tuple[tuple[str, tuple[str, str]], ...]:
  """Every registered family's sharding rules, in registration order."""
  return tuple(dict.fromkeys(rule for family in families() for rule in family.sharding_rules))

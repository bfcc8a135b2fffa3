"""The registry of adapter kinds: LoRA, MoSLoRA, DoRA, WLoRA and any a user adds.

A kind is a config class, an adapter module class and what jlora needs to
know about them; built-in kinds register through the same public call a user
makes::

    jlora.register_adapter_kind(
        "MyKind", MyConfig, MyAdapter, build=new_my_adapter,
        roles={"my_A": "A", "my_B": "B", "my_gate": "vector"},
        peft=jlora.nn.PeftFormat("MYKIND", config_to_peft, config_from_peft,
                                 tensors={"my_gate": "my_gate"}))

The adapter class carries the math (``jlora.nn.AdapterModule``: its delta,
its plain-LoRA factors if it has them, an output hook, merge and unmerge);
the registration says how it is built on a layer, the *role* of each of its
parameters (which LoRA+ groups, optimizer masks and sharding read instead of
names) and its PEFT checkpoint format. Outside a kind's own module nothing
asks which class an adapter is: code looks the kind up here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

ROLES = {
    "A": "the down factor [.., *in, r] (sharded like the kernel's in side; LoRA+ group A)",
    "B": "the up factor [.., r, *out] (sharded like the kernel's out side; LoRA+ group B)",
    "mixer": "an [r, r] matrix between the factors (replicated; LoRA+ group A)",
    "magnitude": "one value per output feature [.., out] (sharded like out; LoRA+ group B)",
    "vector": "a small trainable vector (replicated; LoRA+ group B, as PEFT's 1-d params)",
    "logits": "combination weights over other adapters (replicated; LoRA+ group A)",
    "upstream": "frozen adapters this one combines (never trained)",
    "projection": "a frozen random projection (never trained; sharded like A or B by shape)",
}
"""Every parameter role a kind may declare, and what it implies."""
LORAPLUS_B_ROLES = frozenset({"B", "magnitude", "vector"})
"""Roles LoRA+ trains at B's learning rate (PEFT: ``lora_B`` and every 1-d parameter)."""
FROZEN_ROLES = frozenset({"upstream", "projection"})
"""Roles an optimizer never changes."""


@dataclasses.dataclass(frozen=True)
class PeftFormat:
  """How a kind reads and writes PEFT adapter directories.

  Attributes:
    peft_type: ``adapter_config.json``'s ``peft_type`` (``"LORA"``, ``"VERA"``, ...).
    config_to_peft: ``(config, target_modules, ranks, fan_in_fan_out) -> dict``:
      the ``adapter_config.json`` fields; ``target_modules`` lists every
      adapted module (full PEFT names) and ``ranks`` maps each to
      ``(rank, scaling)`` as saved.
    config_from_peft: ``raw dict -> config``; raise ``ValueError`` naming a
      field that jlora cannot honour (the caller adds the file name).
    tensors: adapter attribute -> PEFT tensor name after ``<module>.``
      (``"lora_magnitude_vector"``); ``None`` for the layer layout's own name
      of the role (``lora_A.weight`` / ``lora_embedding_A`` for an ``A``).
      Read and written per module, converted by the attribute's role.
    saves_lora_factors: the adapter is written as plain LoRA factors
      (``AdapterModule.export_factors``) plus its tensors whose role is not
      ``A``, ``B`` or ``mixer`` (PEFT has no tensor for what was folded).
    matches: ``raw dict -> bool``: whether a config of ``peft_type`` is this
      kind's (e.g. the MoSLoRA fork's ``lora_use_mixer``); None for every one.
    shared_to_peft: ``(adapters [(layer, adapter)], config) -> {key: array}``:
      model-level tensors (full keys), e.g. VeRA's shared projections; None if none.
    shared_from_peft: ``(adapters [(layer, adapter)], tensors, config) -> [(variable, value)]``:
      the inverse, consuming the keys it reads from ``tensors``; None if none.
    stock_peft: whether released ``peft`` reads this format as written (False for a fork's,
      e.g. MoSLoRA's ``lora_AB`` mixers, which stock PEFT ignores).
  """

  peft_type: str
  config_to_peft: Callable[..., dict]
  config_from_peft: Callable[[dict], Any]
  tensors: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
  saves_lora_factors: bool = False
  matches: Callable[[dict], bool] | None = None
  shared_to_peft: Callable[..., dict] | None = None
  shared_from_peft: Callable[..., list] | None = None
  stock_peft: bool = True


@dataclasses.dataclass(frozen=True)
class AdapterKind:
  """One registered kind (see ``register_adapter_kind`` for the fields)."""

  name: str
  config_type: type
  adapter_type: type
  build: Callable[..., Any] | None
  inject: Callable[..., list] | None
  roles: Mapping[str, str]
  selects: Callable[[Any], bool] | None
  after_add: Callable[..., None] | None
  peft: PeftFormat | None


_KINDS: dict[str, AdapterKind] = {}


def register_adapter_kind(
    name: str,
    config_type: type,
    adapter_type: type,
    *,
    build: Callable[..., Any] | None = None,
    inject: Callable[..., list] | None = None,
    roles: Mapping[str, str],
    selects: Callable[[Any], bool] | None = None,
    after_add: Callable[..., None] | None = None,
    peft: PeftFormat | None = None,
    override: bool = False,
) -> AdapterKind:
  """Register an adapter kind; ``jlora.add_adapter`` then accepts its configs.

  Args:
    name: the kind's name as messages print it (``"LoRA"``, ``"DoRA"``, ...).
    config_type: the frozen dataclass users pass to ``add_adapter``.
    adapter_type: the ``AdapterModule`` subclass living in each ``LoraLayer``.
    build: for kinds that target modules (their config has ``target_modules``,
      ``exclude_modules``, ``layers_to_transform``, ``layers_pattern``,
      ``seed``, ``rank_for(name)`` and ``scaling_for(name)`` as ``LoraConfig``):
      ``build(layer, key, ranks, scalings, config, *, targets) -> adapter``
      for one ``LoraLayer``, where ``ranks`` / ``scalings`` hold one entry per
      stacked layer (0 leaves a layer out) and ``targets`` are all the layers
      this config adapts (VeRA sizes its shared projections by them).
    inject: instead of ``build``, for kinds built from a model's other
      adapters (WLoRA): ``inject(model, adapter_name, config) ->
      [(layer, adapter)]``; it must not change the model.
    roles: adapter attribute -> a role of ``jlora.nn.ROLES``, for every
      attribute that holds a parameter or a nested adapter.
    selects: for several kinds sharing one config class, ``config -> bool``
      (DoRA takes ``LoraConfig``s with ``use_dora=True``); a kind with
      ``selects`` is asked before one without.
    after_add: ``after_add(layer, name, adapter, config)``, run once the
      adapter is in ``layer`` (PiSSA moves its init out of the base kernel).
    peft: its PEFT checkpoint format, or None (not savable as PEFT).
    override: replace an existing kind of this name.
  """
  if not isinstance(name, str) or not name:
    raise TypeError(f"An adapter kind needs a non-empty name, got {name!r}.")
  if not isinstance(config_type, type) or not dataclasses.is_dataclass(config_type):
    raise TypeError(f"{config_type!r} must be a (frozen) dataclass config class.")
  if not isinstance(adapter_type, type) or not all(
      callable(getattr(adapter_type, m, None)) for m in ("delta", "merge", "unmerge")):
    raise TypeError(f"{adapter_type!r} must be a jlora.nn.AdapterModule subclass (delta, merge, unmerge).")
  if (build is None) == (inject is None):
    raise TypeError(f"Adapter kind {name!r}: pass exactly one of build= (per layer) or inject= (per model).")
  unknown = {attr: role for attr, role in roles.items() if role not in ROLES}
  if unknown:
    raise ValueError(f"Adapter kind {name!r}: unknown roles {unknown}; use one of {sorted(ROLES)}.")
  if name in _KINDS and not override:
    raise ValueError(f"An adapter kind named {name!r} is registered already; pass override=True to replace it.")
  for other in _KINDS.values():
    if other.name == name:
      continue
    clash = {a: (r, other.roles[a]) for a, r in roles.items() if a in other.roles and other.roles[a] != r}
    if clash:
      raise ValueError(f"Adapter kind {name!r} gives attributes {sorted(clash)} other roles than kind "
                       f"{other.name!r} does; roles are read by attribute name, so rename them.")
    if other.adapter_type is adapter_type:
      raise ValueError(f"{adapter_type.__name__} is kind {other.name!r}'s adapter class already; "
                       "give each kind its own class (a subclass will do).")
  kind = AdapterKind(name, config_type, adapter_type, build, inject, dict(roles), selects, after_add, peft)
  _KINDS[name] = kind
  return kind


def unregister_adapter_kind(name: str) -> None:
  """Remove kind ``name`` (no error if absent)."""
  _KINDS.pop(name, None)


def registered_kinds() -> dict[str, AdapterKind]:
  """A copy of the registry: name -> kind."""
  return dict(_KINDS)


def kind_for_config(config: Any) -> AdapterKind:
  """The kind that builds adapters for ``config`` (most specific config class first)."""
  for klass in type(config).__mro__:
    mine = [k for k in _KINDS.values() if k.config_type is klass]
    for kind in sorted(mine, key=lambda k: k.selects is None):
      if kind.selects is None or kind.selects(config):
        return kind
  names = list(dict.fromkeys(k.config_type.__name__ for k in _KINDS.values()))
  listed = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
  raise TypeError(f"Expected a {listed}, got {type(config).__name__} (other kinds register with "
                  "jlora.register_adapter_kind).")


def kind_of(adapter: Any) -> AdapterKind:
  """The kind of an adapter module (its class or the nearest registered base class)."""
  for klass in type(adapter).__mro__:
    for kind in _KINDS.values():
      if kind.adapter_type is klass:
        return kind
  raise TypeError(f"{type(adapter).__name__} is not a registered adapter kind's class; register it with "
                  "jlora.register_adapter_kind.")


def roles_along(keys) -> list[str]:
  """The roles met along an adapter state path (outermost first; empty outside adapters).

  The attributes after ``adapters/<name>`` are looked up among every kind's
  roles: ``adapters/w/upstreams/0/lora_B`` gives ``["upstream", "B"]``.
  """
  keys = [str(k) for k in keys]
  if "adapters" not in keys:
    return []
  by_attr = {attr: role for kind in _KINDS.values() for attr, role in kind.roles.items()}
  return [by_attr[k] for k in keys[keys.index("adapters") + 2:] if k in by_attr]


def role_of(keys) -> str | None:
  """The role of the adapter parameter at state path ``keys`` (innermost), None outside adapters."""
  roles = roles_along(keys)
  return roles[-1] if roles else None


def is_frozen(keys) -> bool:
  """Whether the parameter at ``keys`` is, or sits in, something of a frozen role."""
  return any(role in FROZEN_ROLES for role in roles_along(keys))


def roles_of(adapter: Any) -> dict[str, str]:
  """Attribute -> role of one adapter module."""
  return dict(kind_of(adapter).roles)

"""Typed configs from nested mappings: YAML files, ``"a.b=value"`` overrides, checked against annotations.

``from_dict`` builds a frozen config dataclass (sections nested as
dataclasses) from plain values, coercing each against its field's type hint
(int -> float widening, list -> tuple, ``Literal`` choices, unions, mappings)
and raising ``ConfigError`` naming the first unknown key or ill-typed value.
A field whose metadata holds ``"parse"`` is read by that function instead
(the adapter section, whose class depends on its ``kind``).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import yaml


class ConfigError(ValueError):
  """A config key that does not exist or a value of the wrong type."""


def from_dict(values: Mapping[str, Any], cls: type, prefix: str = ""):
  """Build the config dataclass ``cls`` from a nested mapping, checking every key and type."""
  if not isinstance(values, Mapping):
    raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(values).__name__}.")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ConfigError(
        f"Unknown config key {(prefix + unknown[0])!r}; valid keys under "
        f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}.")
  kwargs = {}
  for name, value in values.items():
    hint = hints[name]
    key = prefix + name
    if "parse" in fields[name].metadata:
      kwargs[name] = fields[name].metadata["parse"](value, key + ".")
    elif dataclasses.is_dataclass(hint):
      kwargs[name] = from_dict(value, hint, key + ".")
    else:
      kwargs[name] = _coerce(value, hint, key)
  return cls(**kwargs)


def read_mapping(path: str | Path) -> dict:
  """The mapping of keys in the YAML file at ``path`` (empty file: ``{}``)."""
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f"Config file {str(path)!r} does not exist.")
  try:
    values = yaml.safe_load(path.read_text()) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {e}") from e
  if not isinstance(values, dict):
    raise ConfigError(f"Config file {str(path)!r} must hold a mapping of keys, got {type(values).__name__}.")
  return values


def parse_overrides(overrides: Sequence[str]) -> dict:
  """``"a.b=value"`` strings as ``{"a.b": value}``, each value parsed as a YAML scalar."""
  flat = {}
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
      raise ConfigError(f"Override {item!r} must look like key=value (e.g. optim.learning_rate=1e-3).")
    flat[key.strip()] = _parse_scalar(raw)
  return flat


def to_plain(x):
  """``x`` with its dicts copied and its tuples and lists made lists, at every depth (YAML/JSON-ready)."""
  if isinstance(x, Mapping):
    return {k: to_plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_plain(v) for v in x]
  return x


def _parse_scalar(raw: str):
  try:
    return yaml.safe_load(raw) if raw.strip() else ""
  except yaml.YAMLError:
    return raw


def merge_overrides(base: dict, updates: Mapping[str, Any], flat: bool) -> dict:
  """A copy of nested ``base`` with ``updates`` set; ``flat``: their keys are dotted paths (``"optim.b1"``)."""
  out = to_plain(dict(base))
  for key, value in updates.items():
    parts = key.split(".") if flat else [key]
    node = out
    for i, part in enumerate(parts[:-1]):
      child = node.setdefault(part, {})
      if not isinstance(child, dict):
        raise ConfigError(f"Unknown config key {key!r}: {'.'.join(parts[:i + 1])} is not a section.")
      node = child
    node[parts[-1]] = value
  return out


def _coerce(value, hint, key: str):
  """``value`` checked against ``hint`` (int->float widening, list->tuple); ConfigError if it does not fit."""
  origin = typing.get_origin(hint)
  if origin in (Union, types.UnionType):
    for option in typing.get_args(hint):
      try:
        return _coerce(value, option, key)
      except ConfigError:
        pass
    raise ConfigError(f"{key} must be {_describe(hint)}, got {value!r}.")
  if origin is Literal:
    if value in typing.get_args(hint) and type(value) is type(typing.get_args(hint)[0]):
      return value
    raise ConfigError(f"{key} must be one of {list(typing.get_args(hint))}, got {value!r}.")
  if origin in (tuple, collections.abc.Sequence):
    if isinstance(value, (list, tuple)):
      (item,) = [a for a in typing.get_args(hint) if a is not Ellipsis]
      return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    raise ConfigError(f"{key} must be {_describe(hint)}, got {value!r}.")
  if origin is collections.abc.Mapping:
    if isinstance(value, Mapping):
      key_hint, item = typing.get_args(hint)
      return {_coerce(k, key_hint, key): _coerce(v, item, f"{key}[{k!r}]") for k, v in value.items()}
    raise ConfigError(f"{key} must be {_describe(hint)}, got {value!r}.")
  if hint is type(None):
    if value is None:
      return None
  elif hint is bool:
    if isinstance(value, bool):
      return value
  elif hint is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  elif hint is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
      try:
        return float(value)
      except ValueError:
        pass
  elif hint is str:
    if isinstance(value, str):
      return value
  raise ConfigError(f"{key} must be {_describe(hint)}, got {value!r} ({type(value).__name__}).")


def _describe(hint) -> str:
  origin = typing.get_origin(hint)
  if origin in (Union, types.UnionType):
    return " or ".join(_describe(a) for a in typing.get_args(hint))
  if origin in (tuple, collections.abc.Sequence):
    return f"a list of {_describe(typing.get_args(hint)[0])}"
  if origin is collections.abc.Mapping:
    return f"a mapping of {_describe(typing.get_args(hint)[0])} to {_describe(typing.get_args(hint)[1])}"
  if origin is Literal:
    return f"one of {list(typing.get_args(hint))}"
  return {type(None): "null", bool: "a bool", int: "an int", float: "a number", str: "a string"}.get(hint, str(hint))

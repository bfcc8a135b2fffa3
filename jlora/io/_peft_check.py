"""What an adapter directory's files must agree on before any model is involved.

``read_adapter`` (hence ``load_peft`` and ``jlora inspect``) runs this on the
config and the tensor names and shapes: every tensor must be one the config's
kind declares (``PeftFormat.tensors``, the layer layouts' LoRA factor names,
``modules_to_save`` copies, saved embedding layers, a kind's shared tensors), and every LoRA factor's
rank must be the rank ``r`` / ``rank_pattern`` gives its module.
"""

from __future__ import annotations

from pathlib import Path

from jlora.io._peft_layout import PREFIX
from jlora.nn import AdapterKind, kind_for_config

# PEFT's LoRA factor names -> (role, the axis of the rank in PEFT's layout).
FACTOR_SUFFIXES = {"lora_A.weight": ("A", 0), "lora_embedding_A": ("A", 0),
                   "lora_B.weight": ("B", 1), "lora_embedding_B": ("B", 1)}
LORA_FACTOR_SUFFIXES = tuple(FACTOR_SUFFIXES)
"""The names PEFT gives LoRA factors after ``<module>.``."""

EMBEDDING_LAYERS = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")  # PEFT saves these whole


def declared_suffixes(kind: AdapterKind) -> set[str]:
  """The per-module tensor names (after ``<module>.``) a kind's PEFT format reads."""
  fmt = kind.peft
  names = set()
  for attr, name in fmt.tensors.items():
    role = kind.roles.get(attr)
    if name is None and role in ("A", "B"):
      names |= {s for s, (r, _) in FACTOR_SUFFIXES.items() if r == role}
    elif name is not None:
      names.add(name)
  if fmt.saves_lora_factors:
    names |= set(FACTOR_SUFFIXES)
  return names


def _split(key: str, suffixes: set[str]) -> tuple[str, str] | None:
  """``(module, suffix)`` of a per-module key, or None."""
  if not key.startswith(PREFIX):
    return None
  rest = key[len(PREFIX):]
  for suffix in suffixes:
    if rest.endswith("." + suffix):
      return rest[:-len(suffix) - 1], suffix
  return None


def _is_base_weight(key: str) -> bool:
  """A base weight PEFT saves with the adapter (``save_embedding_layers``: ``load_peft`` places it)."""
  return key.startswith(PREFIX) and key.endswith(".weight") and (
      key.endswith(".base_layer.weight") or key[:-len(".weight")].rsplit(".", 1)[-1] in EMBEDDING_LAYERS)


def _is_copy(key: str, modules_to_save) -> bool:
  rest = key[len(PREFIX):] if key.startswith(PREFIX) else None
  return rest is not None and any(rest.startswith(m + ".") or f".{m}." in rest for m in modules_to_save or ())


def check_tensors(config, tensors: dict, file: Path) -> None:
  """Raise a ValueError naming the tensor if the weights do not match the config.

  ``tensors``: key -> array (only ``.shape`` is read).
  """
  kind = kind_for_config(config)
  if kind.peft is None:
    return
  suffixes = declared_suffixes(kind)
  foreign = []
  for key in sorted(tensors):
    if _is_copy(key, getattr(config, "modules_to_save", None)) or _is_base_weight(key):
      continue
    parts = _split(key, suffixes)
    if parts is None:
      if not key.startswith(PREFIX) and kind.peft.shared_from_peft is not None:
        continue  # model-level tensors (VeRA's projections): the kind's reader checks them
      foreign.append(key)
      continue
    module, suffix = parts
    if suffix in FACTOR_SUFFIXES and hasattr(config, "rank_for"):
      _, axis = FACTOR_SUFFIXES[suffix]
      shape = tuple(tensors[key].shape)
      want = config.rank_for(module)
      if len(shape) <= axis or shape[axis] != want:
        need = shape[:axis] + (want,) + shape[axis + 1:] if len(shape) > axis else "?"
        raise ValueError(
            f"{file}: tensor {key!r} has shape {shape}, but adapter_config.json's r/rank_pattern gives "
            f"{module} rank {want}, i.e. {need}: the config does not match the weights (fix r / "
            "rank_pattern, or re-save the adapter).")
  if foreign:
    raise ValueError(
        f"{file} has {len(foreign)} tensor(s) that a {kind.name} adapter (peft_type "
        f"{kind.peft.peft_type!r} in adapter_config.json) does not have, e.g. {', '.join(foreign[:3])}; "
        "the config does not describe these weights (a wrong peft_type or a fork's format).")

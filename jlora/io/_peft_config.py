"""``adapter_config.json`` <-> a registered kind's config.

Which kind reads a config is decided by its ``peft_type`` (and the kind's
``PeftFormat.matches``); the field mapping itself is the kind's own
(``jlora.nn.PeftFormat``: LoRA's maps PEFT's ``LoraConfig`` 1:1 onto
``jlora.LoraConfig`` and refuses fields it cannot honour).
"""

from __future__ import annotations

import json
from pathlib import Path

from jlora.nn import PeftFormat, registered_kinds

CONFIG_NAME = "adapter_config.json"


def read_json(path: Path) -> dict:
  """The parsed ``adapter_config.json``; ValueError naming the file and the fix."""
  if not path.is_file():
    raise ValueError(
        f"{path.parent} has no {CONFIG_NAME}; a PEFT adapter directory holds {CONFIG_NAME} and "
        "adapter_model.safetensors (write them with PeftModel.save_pretrained or jlora.save_peft)."
    )
  try:
    raw = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}); fix the file or re-save the adapter.") from None
  if not isinstance(raw, dict):
    raise ValueError(f"{path} must hold a JSON object of LoRA settings, got {type(raw).__name__}.")
  return raw


def peft_format_for(raw: dict, path: Path) -> PeftFormat:
  """The format of the registered kind that reads this config dict (most specific ``matches`` first)."""
  peft_type = raw.get("peft_type", "LORA")
  formats = [k.peft for k in registered_kinds().values() if k.peft is not None and k.peft.peft_type == peft_type]
  for fmt in sorted(formats, key=lambda f: f.matches is None):
    if fmt.matches is None or fmt.matches(raw):
      return fmt
  loadable = {}
  for kind in registered_kinds().values():
    if kind.peft is not None:
      loadable.setdefault(kind.peft.peft_type, []).append(kind.name)
  known = "; ".join(f"{t!r} ({', '.join(names)})" for t, names in loadable.items())
  raise ValueError(
      f"{path}: peft_type={peft_type!r}, but jlora loads only the PEFT types of its registered adapter "
      f"kinds: {known}; register a kind for it with jlora.register_adapter_kind.")


def from_peft_dict(raw: dict, path: Path):
  """The jlora config for a PEFT config dict (``path`` is named in errors)."""
  fmt = peft_format_for(raw, path)
  try:
    return fmt.config_from_peft(raw)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from None

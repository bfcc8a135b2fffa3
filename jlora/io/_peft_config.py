"""``adapter_config.json`` <-> ``jlora.LoraConfig``, field for field.

PEFT's LoRA fields map 1:1 onto ``LoraConfig`` (same names). Fields that only
describe where the adapter came from are ignored; every other field must
hold PEFT's default, because jlora does not implement it and ignoring it
would give a different model (LoRA biases, LoftQ/CorDA base rewrites, ...).
PiSSA / OLoRA adapters (``init_lora_weights="pissa"`` / ``"olora"``) load as
PEFT loads them: the init runs on the given base (rewriting it to the
residual), then the saved factors replace the initial ones. The MoSLoRA
authors' PEFT fork marks its adapters with ``lora_use_mixer: true``; those
become ``MoSLoraConfig``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from jlora.nn import LoraConfig, MoSLoraConfig

CONFIG_NAME = "adapter_config.json"

# Copied onto LoraConfig as they are.
MAPPED = ("r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout", "use_rslora",
          "init_lora_weights", "rank_pattern", "alpha_pattern", "layers_to_transform",
          "layers_pattern", "fan_in_fan_out", "bias", "use_dora", "modules_to_save")
# Provenance and bookkeeping that do not change the adapted model.
IGNORED = ("peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode",
           "auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "lora_use_mixer",
           "merge_weights", "enable_lora")
# Fields that change the model, with the fix to suggest when one is set.
UNSUPPORTED = {
    "lora_bias": "LoRA bias terms are not implemented; retrain without lora_bias",
    "target_parameters": "LoRA on raw nn.Parameters (e.g. MoE experts) is not supported",
    "layer_replication": "layer replication is not supported",
    "trainable_token_indices": "trainable tokens are not supported; merge them with PEFT first",
    "use_qalora": "QA-LoRA is not supported",
    "use_bdlora": "BD-LoRA is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "ensure_weight_tying": "tied-adapter weights are not supported",
    "megatron_config": "Megatron layers are not supported",
    "loftq_config": "LoftQ rewrites the base weights and is not supported; merge with PEFT first",
    "eva_config": "EVA initialisation is not supported",
    "corda_config": "CorDA rewrites the base weights and is not supported; merge with PEFT first",
    "arrow_config": "Arrow routing is not supported",
    "lora_ga_config": "LoRA-GA is not supported",
    "kasa_config": "KaSA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "velora_config": "VeLoRA is not supported",
}
_DEFAULT_LIKE = (None, False, {}, [], "none")


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


def from_peft_dict(raw: dict, path: Path) -> LoraConfig:
  """The jlora config for a PEFT LoRA config dict (``path`` is named in errors)."""
  peft_type = raw.get("peft_type", "LORA")
  if peft_type != "LORA":
    raise ValueError(
        f"{path}: peft_type={peft_type!r}, but jlora loads LoRA adapters only (peft_type 'LORA')."
    )
  for key, value in raw.items():
    if key in MAPPED or key in IGNORED:
      continue
    if key in UNSUPPORTED:
      if value not in _DEFAULT_LIKE:
        raise ValueError(f"{path}: {key}={value!r} is set, but {UNSUPPORTED[key]}.")
    elif value not in _DEFAULT_LIKE:
      raise ValueError(
          f"{path}: unknown field {key}={value!r}; jlora cannot tell what it changes, so it refuses "
          "to ignore it. Remove it if it is inert."
      )
  init = raw.get("init_lora_weights", True)
  if not (init in (True, False, "gaussian", "pissa", "olora", "orthogonal")
          or (isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init))):
    raise ValueError(
        f"{path}: init_lora_weights={init!r} is not supported ({init!r} initialisation changes the "
        "base weights or is not implemented); merge the adapter with PEFT and load the merged model."
    )
  if raw.get("bias", "none") != "none":
    raise ValueError(f"{path}: bias={raw['bias']!r} trains base biases, which jlora does not load; "
                     "merge the adapter with PEFT first.")
  kwargs = {key: raw[key] for key in MAPPED if key in raw and raw[key] is not None}
  if kwargs.get("lora_dropout") is None:
    kwargs.pop("lora_dropout", None)
  if isinstance(kwargs.get("target_modules"), list):
    kwargs["target_modules"] = tuple(sorted(kwargs["target_modules"]))
  if kwargs.get("target_modules") is None:
    raise ValueError(f"{path}: target_modules is missing; the config must name the adapted modules.")
  cls = MoSLoraConfig if raw.get("lora_use_mixer") else LoraConfig
  if cls is MoSLoraConfig:
    kwargs["mixer_init"] = "kaiming"  # the fork's init; irrelevant once weights are loaded
  if kwargs.get("lora_alpha") is None:
    kwargs["lora_alpha"] = 8 if "r" not in kwargs else kwargs["r"]
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from None


def to_peft_dict(config: LoraConfig, target_modules: list[str], rank_pattern: dict,
                 alpha_pattern: dict, fan_in_fan_out: bool) -> dict:
  """A PEFT ``LoraConfig`` dict (PEFT's defaults for every field jlora does not use)."""
  return {
      "peft_type": "LORA",
      "task_type": None,
      "base_model_name_or_path": None,
      "revision": None,
      "inference_mode": True,
      "r": int(config.r),
      "lora_alpha": _number(config.lora_alpha),
      "lora_dropout": float(config.lora_dropout),
      "use_rslora": bool(config.use_rslora),
      "init_lora_weights": config.init_lora_weights,
      "target_modules": sorted(target_modules),
      "exclude_modules": None,
      "rank_pattern": {k: int(v) for k, v in rank_pattern.items()},
      "alpha_pattern": {k: _number(v) for k, v in alpha_pattern.items()},
      "layers_to_transform": None,
      "layers_pattern": None,
      "fan_in_fan_out": bool(fan_in_fan_out),
      "bias": "none",
      "use_dora": bool(getattr(config, "use_dora", False)),
      "lora_bias": False,
      "modules_to_save": list(config.modules_to_save) if getattr(config, "modules_to_save", None) else None,
  }


def _number(value):
  value = float(value)
  return int(value) if value.is_integer() else value

"""LoRA, DoRA and MoSLoRA as registered adapter kinds, with their PEFT ``adapter_config.json`` mapping.

PEFT's LoRA fields map 1:1 onto ``LoraConfig`` (same names). Fields that only
describe where the adapter came from are ignored; every other field must
hold PEFT's default, because jlora does not implement it and ignoring it
would give a different model (LoRA biases, LoftQ/CorDA base rewrites, ...).
PiSSA / OLoRA adapters (``init_lora_weights="pissa"`` / ``"olora"``) load as
PEFT loads them: the init runs on the given base (rewriting it to the
residual), then the saved factors replace the initial ones. The MoSLoRA
authors' PEFT fork marks its adapters with ``lora_use_mixer: true``; those
become ``MoSLoraConfig``. Every one of these kinds saves as plain PEFT LoRA
(MoSLoRA with its mixer folded into the factors; DoRA with its magnitudes).
"""

from __future__ import annotations

import math
import re

import numpy as np

from jlora.nn._adapters import LoraAdapter, MoSLoraAdapter
from jlora.nn._config import LoraConfig, MoSLoraConfig
from jlora.nn._dora import DoraAdapter
from jlora.nn._init import rewrites_base
from jlora.nn._kinds import PeftFormat, register_adapter_kind
from jlora.nn._new_adapters import new_lora_adapter

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
DEFAULT_LIKE = (None, False, {}, [], "none")


def check_peft_fields(raw: dict, mapped, ignored, unsupported: dict) -> None:
  """Raise for a field jlora cannot honour: unsupported and set, or unknown and not default-like."""
  for key, value in raw.items():
    if key in mapped or key in ignored:
      continue
    if key in unsupported:
      if value not in DEFAULT_LIKE:
        raise ValueError(f"{key}={value!r} is set, but {unsupported[key]}.")
    elif value not in DEFAULT_LIKE:
      raise ValueError(
          f"unknown field {key}={value!r}; jlora cannot tell what it changes, so it refuses "
          "to ignore it. Remove it if it is inert.")


def lora_config_from_peft(raw: dict) -> LoraConfig:
  """The jlora config for a PEFT LoRA config dict."""
  check_peft_fields(raw, MAPPED, IGNORED, UNSUPPORTED)
  init = raw.get("init_lora_weights", True)
  if not (init in (True, False, "gaussian", "pissa", "olora", "orthogonal")
          or (isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init))):
    raise ValueError(
        f"init_lora_weights={init!r} is not supported ({init!r} initialisation changes the "
        "base weights or is not implemented); merge the adapter with PEFT and load the merged model."
    )
  if raw.get("bias", "none") != "none":
    raise ValueError(f"bias={raw['bias']!r} trains base biases, which jlora does not load; "
                     "merge the adapter with PEFT first.")
  kwargs = {key: raw[key] for key in MAPPED if key in raw and raw[key] is not None}
  if isinstance(kwargs.get("target_modules"), list):
    kwargs["target_modules"] = tuple(sorted(kwargs["target_modules"]))
  if kwargs.get("target_modules") is None:
    raise ValueError("target_modules is missing; the config must name the adapted modules.")
  cls = MoSLoraConfig if raw.get("lora_use_mixer") else LoraConfig
  if cls is MoSLoraConfig:
    kwargs["mixer_init"] = "kaiming"  # the fork's init; irrelevant once weights are loaded
  if kwargs.get("lora_alpha") is None:
    kwargs["lora_alpha"] = 8 if "r" not in kwargs else kwargs["r"]
  return cls(**kwargs)


def lora_config_to_peft(config, target_modules: list[str], ranks: dict, fan_in_fan_out: bool) -> dict:
  """A PEFT ``LoraConfig`` dict for the adapted ``target_modules`` (module -> ``(rank, scaling)``
  in ``ranks``): ``rank_pattern`` / ``alpha_pattern`` name every module whose rank or scaling
  differs from ``config``'s, so PEFT rebuilds exactly these modules."""
  rank_pattern, alpha_pattern = {}, {}
  for module in sorted(target_modules):
    rank, scaling = ranks[module]
    if rank == config.rank_for(module) and np.isclose(scaling, config.scaling_for(module), rtol=1e-6):
      alpha = config.alpha_for(module)
    else:
      alpha = scaling * (math.sqrt(rank) if config.use_rslora else rank)
    if rank != config.r:
      rank_pattern[re.escape(module)] = rank
    if alpha != config.lora_alpha:
      alpha_pattern[re.escape(module)] = alpha
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
      "use_dora": bool(config.use_dora),
      "lora_bias": False,
      "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
  }


def folded_lora_to_peft(config, target_modules: list[str], ranks: dict, fan_in_fan_out: bool) -> dict:
  """PEFT LoRA for an adapter saved with its scaling folded into the factors (``lora_alpha = r``)."""
  rank = max(r for r, _ in ranks.values())
  return lora_config_to_peft(LoraConfig(r=rank, lora_alpha=rank), target_modules, ranks, fan_in_fan_out)


def _number(value):
  value = float(value)
  return int(value) if value.is_integer() else value


def build_lora(layer, key, ranks, scalings, config: LoraConfig, *, targets=()):
  """A fresh LoRA / MoSLoRA / DoRA adapter for one layer from its config."""
  return new_lora_adapter(
      layer, key, ranks, scalings, init_lora_weights=config.init_lora_weights,
      mixer_init=getattr(config, "mixer_init", None), use_dora=config.use_dora, dropout=config.lora_dropout)


def move_init_out_of_base(layer, name: str, adapter, config: LoraConfig) -> None:
  """PiSSA / OLoRA: the base keeps the residual ``W - s·A·B``, so the output starts unchanged."""
  if rewrites_base(config.init_lora_weights):
    kernel = layer.kernel()
    kernel[...] = (kernel[...] - layer.delta_weight(name)).astype(kernel.dtype)


_FACTORS = {"lora_A": None, "lora_B": None}
LORA_ROLES = {"lora_A": "A", "lora_B": "B"}
_lora_peft = dict(peft_type="LORA", config_to_peft=lora_config_to_peft, config_from_peft=lora_config_from_peft,
                  saves_lora_factors=True)

register_adapter_kind(
    "LoRA", LoraConfig, LoraAdapter, build=build_lora, roles=LORA_ROLES, after_add=move_init_out_of_base,
    peft=PeftFormat(**_lora_peft, tensors=_FACTORS))
register_adapter_kind(
    "DoRA", LoraConfig, DoraAdapter, build=build_lora, selects=lambda config: config.use_dora,
    roles={**LORA_ROLES, "lora_magnitude_vector": "magnitude"}, after_add=move_init_out_of_base,
    peft=PeftFormat(**_lora_peft, tensors={**_FACTORS, "lora_magnitude_vector": "lora_magnitude_vector"}))
register_adapter_kind(
    "MoSLoRA", MoSLoraConfig, MoSLoraAdapter, build=build_lora, roles={**LORA_ROLES, "lora_mixer": "mixer"},
    after_add=move_init_out_of_base,
    peft=PeftFormat(**_lora_peft, tensors={**_FACTORS, "lora_mixer": "lora_AB.weight"},
                    matches=lambda raw: bool(raw.get("lora_use_mixer")), stock_peft=False))

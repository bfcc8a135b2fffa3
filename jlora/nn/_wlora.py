"""WLoRA as a registered adapter kind: a learned mix of frozen upstream LoRA adapters already in the model.

It is built per model (``inject``), not per targeted module: every layer
that all upstreams adapt gets a ``WLoraAdapter`` over frozen copies of them.
It saves as plain PEFT LoRA by PEFT's ``cat`` construction (exact; rank =
the sum of the upstream ranks, ``lora_alpha = r``); a PEFT directory loads
back as LoRA, since PEFT has no WLoRA.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jlora.nn._adapters import LoraAdapter, WLoraAdapter
from jlora.nn._config import WLoraConfig
from jlora.nn._inject import lora_layers, peft_config
from jlora.nn._kinds import PeftFormat, kind_of, register_adapter_kind
from jlora.nn._lora_kinds import folded_lora_to_peft
from jlora.nn._targets import name_matches
from jlora.nn._variables import LoraParam, UpstreamLoraParam


UPSTREAM_KINDS = ("LoRA", "MoSLoRA")


def inject_wlora(model: nnx.Module, adapter_name: str, config: WLoraConfig) -> list:
  """``(layer, WLoraAdapter)`` for every layer all of ``config.upstream_loras`` adapt (model unchanged)."""
  configs = peft_config(model)
  missing = [u for u in config.upstream_loras if u not in configs]
  if missing:
    raise ValueError(
        f"WLoRA upstream adapters {missing} are not in the model (it has {list(configs)}). "
        "Load them first (jlora.load_peft) or pass PEFT directories to jlora.get_peft_model."
    )
  plans = []  # validate every layer before building any
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
      if kind_of(adapter).name not in UPSTREAM_KINDS:
        raise ValueError(f"WLoRA upstream {name!r} must be a LoRA/MoSLoRA adapter, not WLoRA or DoRA.")
      upstreams.append(adapter)
    plans.append((layer, upstreams, keep))
  if not plans:
    raise ValueError(
        f"WLoRA adapter {adapter_name!r} selects no layer: target_modules="
        f"{config.target_modules!r} matches none of the upstreams' layers."
    )
  built = []
  for layer, upstreams, keep in plans:
    frozen = [frozen_upstream(adapter, UpstreamLoraParam) for adapter in upstreams]
    if not all(keep):  # stacked layers the targets leave out get no update
      mask = jnp.asarray(keep, jnp.float32).reshape(layer.stack_shape)
      for upstream in frozen:
        upstream.scaling[...] = upstream.scaling[...] * mask
    built.append((layer, new_wlora_adapter(layer, frozen)))
  return built


def new_wlora_adapter(layer, upstreams: list[LoraAdapter]) -> WLoraAdapter:
  """A WLoRA adapter over ``upstreams`` with equal initial weights."""
  logits = jnp.zeros(tuple(layer.stack_shape) + (len(upstreams),), jnp.float32)
  return WLoraAdapter(upstreams, logits)


def frozen_upstream(adapter: LoraAdapter, param_type: type[nnx.Variable]) -> LoraAdapter:
  """A copy of ``adapter``'s factors (mixer folded in as its own) whose variable type is ``param_type``."""
  return LoraAdapter(
      adapter.lora_A[...], adapter.lora_B[...], adapter.scaling[...],
      rank_mask=adapter.rank_mask[...] if adapter.rank_mask is not None else None,
      mixer=adapter.lora_mixer[...] if adapter.lora_mixer is not None else None,
      param_type=param_type)


def _not_loadable(raw: dict):
  raise ValueError("PEFT has no WLoRA adapters; a saved WLoRA adapter loads as plain LoRA.")


register_adapter_kind(
    "WLoRA", WLoraConfig, WLoraAdapter, inject=inject_wlora, roles={"upstreams": "upstream", "logits": "logits"},
    peft=PeftFormat("LORA", folded_lora_to_peft, _not_loadable, saves_lora_factors=True,
                    matches=lambda raw: False))

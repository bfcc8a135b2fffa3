"""The Mixtral family (``mixtral``): Mistral attention, every layer's feed-forward a sparse mixture of experts.

The model is ``MoeForCausalLM`` (the Qwen3-MoE block: router ``mlp.gate``,
experts ``mlp.experts.{gate_up_proj,down_proj}``, as transformers 5 names
them); Mixtral always renormalises the top-k routing weights and keeps them
in float32. Checkpoints name the block ``block_sparse_moe`` and the experts'
projections ``w1`` (gate), ``w3`` (up), ``w2`` (down), one tensor per expert;
loading renames and stacks them, saving splits and renames them back.
``router_jitter_noise`` (training-time input noise) is refused.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from jlora.models._decoder import LLAMA, llama_config_from_hf
from jlora.models._family import Family, register_family
from jlora.models._qwen3_moe import MoeConfig, MoeForCausalLM, split_experts, stack_experts


@dataclasses.dataclass(frozen=True)
class MixtralConfig(MoeConfig):
  """Mixtral's config: top-k weights always renormalised, kept in float32."""

  norm_topk_prob: bool = True
  weights_in_input_dtype: bool = False


def mixtral_config_from_hf(hf) -> MixtralConfig:
  """The ``MixtralConfig`` of a transformers ``MixtralConfig``; ValueError for ``router_jitter_noise`` > 0."""
  if getattr(hf, "router_jitter_noise", 0.0):
    raise ValueError(f"mixtral with router_jitter_noise={hf.router_jitter_noise} is not supported; set it to 0.0 "
                     "in config.json (it only adds noise to the router's input during training).")
  base = llama_config_from_hf(hf)
  fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
  fields["sliding_window"] = getattr(hf, "sliding_window", None)
  experts = getattr(hf, "num_local_experts", None) or hf.num_experts
  return MixtralConfig(**fields, num_experts=experts, num_experts_per_tok=hf.num_experts_per_tok,
                       moe_intermediate_size=hf.intermediate_size)


_TO_MODEL = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_TO_CHECKPOINT = {v: k for k, v in _TO_MODEL.items()}
_CHECKPOINT_EXPERT = re.compile(r"(.*)\.block_sparse_moe\.(.*?)(?:\.(w1|w2|w3))?\.weight")
_MODEL_EXPERT = re.compile(r"(.*)\.mlp\.(.*?)(?:\.(gate_proj|up_proj|down_proj))?\.weight")


def _rename(tensors: Mapping[str, Any], pattern: re.Pattern, block: str, projections: dict) -> dict[str, Any]:
  out = {}
  for name, value in tensors.items():
    m = pattern.fullmatch(name)
    if m is not None:
      proj = "" if m[3] is None else "." + projections[m[3]]
      name = f"{m[1]}.{block}.{m[2]}{proj}.weight"
    out[name] = value
  return out


def mixtral_checkpoint_names(tensors: Mapping[str, Any]) -> dict[str, Any]:
  """``block_sparse_moe.experts.{e}.w1/w3/w2`` tensors as the model's stacked ``mlp.experts`` kernels."""
  return stack_experts(_rename(tensors, _CHECKPOINT_EXPERT, "mlp", _TO_MODEL))


def mixtral_export_names(tensors: Mapping[str, Any]) -> dict[str, Any]:
  """The reverse of ``mixtral_checkpoint_names``: per-expert ``block_sparse_moe`` tensors."""
  return _rename(split_experts(tensors), _MODEL_EXPERT, "block_sparse_moe", _TO_CHECKPOINT)


MIXTRAL = register_family(Family(
    name="mixtral", model_types=("mixtral",), from_hf=mixtral_config_from_hf, model_class=MoeForCausalLM,
    checkpoint_names=mixtral_checkpoint_names, export_names=mixtral_export_names,
    ignored_tensors=LLAMA.ignored_tensors, sharding_rules=LLAMA.sharding_rules))

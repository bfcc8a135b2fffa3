"""The Qwen3-MoE family (``qwen3_moe``): Qwen3 attention, every layer's feed-forward a sparse mixture of experts.

Names mirror transformers' ``Qwen3MoeForCausalLM``: ``model.layers.N.mlp.gate``
(the router, an ordinary linear ``[H, E]``, so LoRA on it is ordinary LoRA)
and ``model.layers.N.mlp.experts.{gate_up_proj,down_proj}``, the experts
stacked on a leading axis (``[E, H, 2I]`` and ``[E, I, H]``, jlora's
``x @ W`` layout) and run dropless by grouped matmuls (``jlora.models._moe``).

Checkpoints store one tensor per expert
(``model.layers.N.mlp.experts.{e}.{gate,up,down}_proj.weight``, what
``save_pretrained`` writes and the hub holds); loading stacks them (fused
``experts.gate_up_proj [E, 2I, H]`` tensors are read too) and saving splits
them again. Layers whose feed-forward is dense (``mlp_only_layers``,
``decoder_sparse_step`` > 1) are refused.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from jlora.models._attention import activation
from jlora.models._config import LlamaConfig, hf_get
from jlora.models._decoder import LLAMA, CausalLM, linear, llama_config_from_hf
from jlora.models._family import Family, register_family
from jlora.models._moe import MoeSpec, experts_forward, top_k_routing


@dataclasses.dataclass(frozen=True)
class MoeConfig(LlamaConfig):
  """A sparse-MoE decoder's config: the Llama family's switches plus the experts.

  ``num_experts`` experts of width ``moe_intermediate_size``, of which
  ``num_experts_per_tok`` run per token; ``norm_topk_prob`` renormalises
  their routing weights to sum to 1; ``weights_in_input_dtype`` casts them to
  the compute dtype before they scale the experts (Qwen; Mixtral keeps float32).
  """

  num_experts: int = 8
  num_experts_per_tok: int = 2
  moe_intermediate_size: int = 64
  norm_topk_prob: bool = False
  weights_in_input_dtype: bool = True

  def moe_spec(self) -> MoeSpec:
    return MoeSpec(self.num_experts, self.num_experts_per_tok, self.norm_topk_prob, self.weights_in_input_dtype)


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig(MoeConfig):
  """Qwen3-MoE's config (Qwen3 attention: q/k RMSNorm)."""

  qk_norm: bool = True


class Experts(nnx.Module):
  """``num_experts`` gated MLPs stacked: ``gate_up_proj [E, H, 2I]`` (``[gate | up]``), ``down_proj [E, I, H]``."""

  def __init__(self, c: MoeConfig, dtypes: dict, rngs: nnx.Rngs):
    init, e, h, i = nnx.initializers.normal(0.02), c.num_experts, c.hidden_size, c.moe_intermediate_size
    dtype = dtypes["param_dtype"]
    self.gate_up_proj = nnx.Param(init(rngs.params(), (e, h, 2 * i), dtype))
    self.down_proj = nnx.Param(init(rngs.params(), (e, i, h), dtype))


class SparseMoeBlock(nnx.Module):
  """Router ``gate`` then the routed ``experts``: ``h [B, T, H]`` → ``[B, T, H]``."""

  def __init__(self, c: MoeConfig, dtypes: dict, rngs: nnx.Rngs):
    self.gate = linear(c.hidden_size, c.num_experts, False, dtypes, rngs)
    self.experts = Experts(c, dtypes, rngs)
    self.spec = c.moe_spec()
    self.act = c.hidden_act
    self.dtype = dtypes["dtype"]

  def __call__(self, h):
    flat = h.reshape(-1, h.shape[-1])
    routing = top_k_routing(self.gate(flat), self.spec)
    out = experts_forward(flat.astype(self.dtype), routing, self.experts.gate_up_proj[...],
                          self.experts.down_proj[...], act=activation(self.act))
    return out.reshape(h.shape)


class MoeForCausalLM(CausalLM):
  """A sparse-MoE causal LM (``CausalLM`` with ``SparseMoeBlock`` feed-forwards): Qwen3-MoE, Mixtral."""

  mlp_class = SparseMoeBlock



def sparse_layers(hf) -> tuple[bool, ...]:
  """Which layers transformers builds sparse: not in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``."""
  dense = set(getattr(hf, "mlp_only_layers", None) or ())
  step = hf_get(hf, "decoder_sparse_step", default=1)
  experts = hf_get(hf, "num_experts", default=0)
  return tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(hf.num_hidden_layers))


def qwen3_moe_config_from_hf(hf) -> Qwen3MoeConfig:
  """The ``Qwen3MoeConfig`` of a transformers ``Qwen3MoeConfig``.

  Raises ValueError when a layer would be dense (``mlp_only_layers``,
  ``decoder_sparse_step``, ``num_experts=0``) or for options the Llama family
  refuses (sliding window, rope types).
  """
  sparse = sparse_layers(hf)
  if not all(sparse):
    dense = [i for i, s in enumerate(sparse) if not s]
    raise ValueError(
        f"qwen3_moe with dense feed-forward layers {dense} (mlp_only_layers={getattr(hf, 'mlp_only_layers', None)}, "
        f"decoder_sparse_step={getattr(hf, 'decoder_sparse_step', None)}, num_experts="
        f"{getattr(hf, 'num_experts', None)}) is not supported; jlora runs qwen3_moe models whose every layer is "
        "sparse (mlp_only_layers=[], decoder_sparse_step=1, num_experts > 0).")
  base = llama_config_from_hf(hf)
  fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
  fields["qk_norm"] = True
  return Qwen3MoeConfig(**fields, num_experts=hf.num_experts, num_experts_per_tok=hf.num_experts_per_tok,
                        moe_intermediate_size=hf.moe_intermediate_size,
                        norm_topk_prob=bool(getattr(hf, "norm_topk_prob", False)))


_PER_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_FUSED = re.compile(r".*\.experts\.(gate_up_proj|down_proj)")


def stack_experts(tensors: Mapping[str, Any]) -> dict[str, Any]:
  """Per-expert ``[out, in]`` tensors stacked into the model's ``[E, in, out]`` expert kernels.

  ``experts.{e}.gate_proj``/``up_proj`` become ``experts.gate_up_proj``
  (``[gate | up]`` columns), ``experts.{e}.down_proj`` ``experts.down_proj``;
  fused transformers-5 tensors (``experts.gate_up_proj [E, 2I, H]``) are
  transposed to the same layout. Other tensors pass through.
  """
  out, groups = {}, {}
  for name, value in tensors.items():
    if m := _PER_EXPERT.fullmatch(name):
      groups.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = value
    elif _FUSED.fullmatch(name):
      out[name] = np.swapaxes(np.asarray(value), -1, -2)
    else:
      out[name] = value
  for prefix, projections in groups.items():
    stacks = {}
    for proj, by_expert in projections.items():
      if sorted(by_expert) != list(range(len(by_expert))):
        raise ValueError(f"The checkpoint's {prefix}.N.{proj}.weight tensors are numbered "
                         f"{sorted(by_expert)}; expected experts 0..{len(by_expert) - 1} with none missing.")
      stacks[proj] = np.stack([np.swapaxes(np.asarray(by_expert[e]), -1, -2) for e in range(len(by_expert))])
    if "gate_proj" in stacks and "up_proj" in stacks:
      out[f"{prefix}.gate_up_proj"] = np.concatenate([stacks.pop("gate_proj"), stacks.pop("up_proj")], axis=-1)
    if "down_proj" in stacks:
      out[f"{prefix}.down_proj"] = stacks.pop("down_proj")
    for proj, stack in stacks.items():  # gate without up (or the reverse): left for the loader to report
      for e in range(stack.shape[0]):
        out[f"{prefix}.{e}.{proj}.weight"] = np.swapaxes(stack[e], -1, -2)
  return out


def split_experts(tensors: Mapping[str, Any]) -> dict[str, Any]:
  """The reverse of ``stack_experts``: the model's expert kernels as per-expert ``[out, in]`` tensors."""
  out = {}
  for name, value in tensors.items():
    m = _FUSED.fullmatch(name)
    if m is None:
      out[name] = value
      continue
    prefix = name[: -len(m[1]) - 1]
    if m[1] == "down_proj":
      parts = {"down_proj": value}
    else:
      gate, up = np.split(value, 2, axis=-1)
      parts = {"gate_proj": gate, "up_proj": up}
    for proj, stack in parts.items():
      for e in range(stack.shape[0]):
        out[f"{prefix}.{e}.{proj}.weight"] = np.ascontiguousarray(np.swapaxes(stack[e], -1, -2))
  return out


QWEN3_MOE = register_family(Family(
    name="qwen3_moe", model_types=("qwen3_moe",), from_hf=qwen3_moe_config_from_hf,
    model_class=MoeForCausalLM, checkpoint_names=stack_experts, export_names=split_experts,
    ignored_tensors=LLAMA.ignored_tensors, sharding_rules=LLAMA.sharding_rules))

"""Mixture of experts: the grouped-matmul math against transformers' sparse blocks, and the Qwen3-MoE family.

Tiny random transformers models (8 experts, top-2, 2 layers) are the oracle
(torch CPU, float32).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jlora.models import _moe as moe
from tests import hf_doubles

E, K, H, I, T = 8, 2, 32, 16, 12
TOL = dict(rtol=1e-5, atol=1e-5)
FAMILIES = ["qwen3_moe", "mixtral"]


def tiny(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
  """A 2-layer ``*ForCausalLM`` with ``E`` experts of width ``I``, weights ~ N(0, 0.3²)."""
  common = dict(vocab_size=hf_doubles.VOCAB, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_experts_per_tok=K, max_position_embeddings=64)
  common.update(overrides)
  if family == "mixtral":
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**common, intermediate_size=I,
                                                                       num_local_experts=E))
  else:
    common.setdefault("norm_topk_prob", True)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **common, intermediate_size=24, moe_intermediate_size=I, num_experts=E, head_dim=8,
        tie_word_embeddings=False))
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))
  return model.eval()


def j(t: torch.Tensor) -> jax.Array:
  return jnp.asarray(t.detach().numpy())


def spec(block, family: str) -> moe.MoeSpec:
  return moe.MoeSpec(num_experts=block.gate.num_experts, top_k=block.gate.top_k,
                     norm_topk_prob=getattr(block.gate, "norm_topk_prob", True),
                     weights_in_input_dtype=family != "mixtral")


def kernels(block) -> tuple[jax.Array, jax.Array, jax.Array]:
  """transformers' router and ``[E, out, in]`` expert tensors as ``[H, E]`` and ``[E, in, out]`` kernels."""
  return (j(block.gate.weight).T, j(block.experts.gate_up_proj).transpose(0, 2, 1),
          j(block.experts.down_proj).transpose(0, 2, 1))


def tokens(seed: int = 1) -> torch.Tensor:
  return torch.randn(2, T // 2, H, generator=torch.Generator().manual_seed(seed))


# --- the math ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_router_matches_transformers(family):
  block = tiny(family).model.layers[0].mlp
  x = tokens().reshape(-1, H)
  with torch.no_grad():
    logits, weights, experts = block.gate(x)
  got = moe.route(j(x), kernels(block)[0], spec(block, family))
  np.testing.assert_allclose(got.logits, logits.numpy(), **TOL)
  np.testing.assert_allclose(got.weights, weights.numpy(), **TOL)
  np.testing.assert_array_equal(got.experts, experts.numpy())


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_block_matches_transformers(family, impl):
  model = tiny(family)
  model.set_experts_implementation(impl)
  block = model.model.layers[0].mlp
  x = tokens()
  with torch.no_grad():
    want = block(x)
  got, logits = moe.sparse_block(j(x), *kernels(block), spec(block, family))
  assert got.shape == want.shape and logits.shape == (T, E)
  np.testing.assert_allclose(got, want.numpy(), **TOL)


def test_norm_topk_prob_off_keeps_the_softmax_mass():
  """Without ``norm_topk_prob`` the k weights are the raw softmax probabilities (sum < 1)."""
  x = jax.random.normal(jax.random.key(0), (T, H))
  router = jax.random.normal(jax.random.key(1), (H, E))
  raw = moe.route(x, router, moe.MoeSpec(E, K, norm_topk_prob=False))
  normed = moe.route(x, router, moe.MoeSpec(E, K, norm_topk_prob=True))
  assert bool(jnp.all(jnp.sum(raw.weights, -1) < 1.0))
  np.testing.assert_allclose(normed.weights, raw.weights / jnp.sum(raw.weights, -1, keepdims=True), rtol=1e-6)


def test_experts_forward_is_dropless_with_idle_experts():
  """Experts no token picks get an empty group; every (token, expert) pair is still computed (no capacity)."""
  keys = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(keys[0], (T, H))
  gate_up = jax.random.normal(keys[1], (E, H, 2 * I)) * 0.3
  down = jax.random.normal(keys[2], (E, I, H)) * 0.3
  experts = jnp.stack([jnp.full((T,), 5), jnp.arange(T) % 2], axis=1).astype(jnp.int32)  # 2..4, 6, 7 idle
  weights = jnp.full((T, K), 0.5)
  got = moe.experts_forward(x, moe.Routing(None, weights, experts), gate_up, down)

  def one(t, e):
    g, u = jnp.split(x[t] @ gate_up[e], 2)
    return (jax.nn.silu(g) * u) @ down[e]
  want = jnp.stack([sum(0.5 * one(t, int(experts[t, c])) for c in range(K)) for t in range(T)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(moe.group_by_expert(experts, E).sizes, [6, 6, 0, 0, 0, T, 0, 0])


def test_top_k_above_the_expert_count_is_refused():
  with pytest.raises(ValueError, match="num_experts_per_tok=9"):
    moe.MoeSpec(num_experts=8, top_k=9)

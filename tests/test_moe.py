"""Mixture of experts: the grouped-matmul math against transformers' sparse blocks, and the Qwen3-MoE family.

Tiny random transformers models (8 experts, top-2, 2 layers) are the oracle
(torch CPU, float32).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

import jlora
from jlora import models
from jlora.models import _moe as moe
from tests import hf_doubles, train_doubles

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


# --- the qwen3_moe and mixtral families --------------------------------------------------------------

EXPERT_KEY = {"qwen3_moe": "model.layers.0.mlp.experts.{e}.up_proj.weight",
              "mixtral": "model.layers.0.block_sparse_moe.experts.{e}.w3.weight"}


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
  """``(transformers model, its checkpoint dir)``: per-expert keys, as ``save_pretrained`` writes them.

  Mixtral gets a sliding window of 3 (Mistral attention).
  """
  path = tmp_path_factory.mktemp(request.param)
  ref = tiny(request.param, **(dict(sliding_window=3) if request.param == "mixtral" else {}))
  ref.save_pretrained(str(path))
  return ref, path


def test_checkpoint_holds_per_expert_tensors(saved):
  """The oracle's own format, which the loader must stack (guards the test's premise)."""
  ref, path = saved
  names = safetensors.numpy.load_file(str(path / "model.safetensors"))
  assert EXPERT_KEY[ref.config.model_type].format(e=E - 1) in names
  assert not any(n.endswith("experts.gate_up_proj") for n in names)


def test_logits_match_transformers(saved):
  ref, path = saved
  model = jlora.from_pretrained(path, dtype=jnp.float32)
  assert isinstance(model, models.MoeForCausalLM)
  ids, _ = hf_doubles.batch()
  np.testing.assert_allclose(model(jnp.asarray(ids)), hf_doubles.logits(ref, ids), atol=1e-4, rtol=0)


def test_padded_batch_matches_transformers_on_real_tokens(saved):
  ref, path = saved
  model = jlora.from_pretrained(path, dtype=jnp.float32)
  ids, mask = hf_doubles.batch()
  ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], hf_doubles.logits(ref, ids, mask)[real], atol=1e-4, rtol=0)


def test_greedy_generation_equals_transformers(saved):
  ref, path = saved
  model = jlora.from_pretrained(path, dtype=jnp.float32)
  ids, _ = hf_doubles.batch()
  ref.generation_config.eos_token_id = None
  with torch.no_grad():
    want = ref.generate(torch.as_tensor(ids, dtype=torch.long), do_sample=False, max_new_tokens=5,
                        pad_token_id=0, attention_mask=torch.ones(ids.shape, dtype=torch.long)).numpy()
  np.testing.assert_array_equal(jlora.generate(model, ids, 5), want)


def test_save_pretrained_writes_per_expert_tensors_transformers_loads(saved, tmp_path):
  ref, path = saved
  jlora.save_pretrained(jlora.from_pretrained(path, dtype=jnp.float32), tmp_path / "out")
  written = safetensors.numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
  original = safetensors.numpy.load_file(str(path / "model.safetensors"))
  assert sorted(written) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(written[name], value, err_msg=name)
  again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  ids, _ = hf_doubles.batch()
  np.testing.assert_allclose(hf_doubles.logits(again, ids), hf_doubles.logits(ref, ids), atol=1e-6, rtol=0)


def test_fused_expert_tensors_load_too(saved, tmp_path):
  """A checkpoint holding transformers-5's fused ``experts.gate_up_proj [E, 2I, H]`` loads the same model."""
  ref, path = saved
  fused = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  safetensors.numpy.save_file(fused, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  assert "model.layers.0.mlp.experts.gate_up_proj" in fused
  ids, _ = hf_doubles.batch()
  model = jlora.from_pretrained(tmp_path, dtype=jnp.float32)
  np.testing.assert_allclose(model(jnp.asarray(ids)), hf_doubles.logits(ref, ids), atol=1e-4, rtol=0)


def test_a_missing_expert_is_refused(saved, tmp_path):
  ref, path = saved
  tensors = safetensors.numpy.load_file(str(path / "model.safetensors"))
  del tensors[EXPERT_KEY[ref.config.model_type].format(e=3)]
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  with pytest.raises(ValueError, match=r"experts\.N\.up_proj.*numbered"):
    jlora.from_pretrained(tmp_path, dtype=jnp.float32)


@pytest.mark.parametrize("option", [dict(mlp_only_layers=[0]), dict(decoder_sparse_step=2)])
def test_dense_layers_are_refused_naming_the_option(option):
  hf = transformers.Qwen3MoeConfig(num_hidden_layers=2, **option)
  with pytest.raises(ValueError, match=f"dense feed-forward layers \\[0\\].*{next(iter(option))}"):
    models.from_hf_config(hf)


def test_mixtral_router_jitter_noise_is_refused():
  with pytest.raises(ValueError, match="router_jitter_noise=0.1"):
    models.from_hf_config(transformers.MixtralConfig(router_jitter_noise=0.1))


def test_expert_sizes_and_routing_come_from_config(saved):
  ref, _ = saved
  config = models.from_hf_config(ref.config)
  assert isinstance(config, models.MoeConfig)
  assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (E, K, I)
  assert config.norm_topk_prob
  assert json.loads(config.hf_json)["model_type"] == ref.config.model_type
  if ref.config.model_type == "qwen3_moe":
    assert config.qk_norm and config.weights_in_input_dtype
  else:
    assert not config.qk_norm and not config.weights_in_input_dtype and config.sliding_window == 3


def test_lora_targets_the_router_like_any_linear(saved):
  """The router is an ordinary linear: LoRA targets it like any projection; an adapter at init changes nothing."""
  _, path = saved
  model = jlora.from_pretrained(path, dtype=jnp.float32)
  ids, _ = hf_doubles.batch()
  before = model(jnp.asarray(ids))
  adapted = jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=("q_proj", "v_proj", "gate")))
  wrapped = [".".join(map(str, p)) for p, n in nnx.iter_graph(adapted) if isinstance(n, jlora.LoraLayer)]
  assert any(w.endswith("mlp.gate") for w in wrapped)
  np.testing.assert_allclose(adapted(jnp.asarray(ids)), before, atol=1e-5, rtol=0)


def test_lora_training_steps_lower_the_loss_through_the_experts(saved):
  """Gradients flow through the grouped experts (``ragged_dot``) to LoRA on attention and the router."""
  _, path = saved
  model = jlora.get_peft_model(jlora.from_pretrained(path, dtype=jnp.float32),
                               jlora.LoraConfig(r=2, target_modules="all-linear"))
  _, losses = train_doubles.lora_train_steps(model, jnp.asarray(hf_doubles.batch()[0]))
  assert losses[-1] < losses[0]

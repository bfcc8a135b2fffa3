"""The fused LoRA matmul (merged on the fly, low-rank backward) and shared-input fusion equal the plain path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from jlora import testing
from jlora.models import CausalLM, ModelConfig
from jlora.nn import lora_matmul, lora_projections, set_lora_matmul

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(remat: str = "none", attention_bias: bool = False) -> CausalLM:
  config = ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=24,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                       max_position_embeddings=64, attention_bias=attention_bias)
  return CausalLM(config, rngs=nnx.Rngs(0), remat=remat)


def adapted(config=None, **kwargs) -> CausalLM:
  model = tiny_llama(**kwargs)
  jlora.get_peft_model(model, config or jlora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
  testing.randomize_adapters(model)
  return model


def loss_and_grads(model, mode, shared=True, ids=None):
  set_lora_matmul(model, mode, shared_input=shared)
  ids = testing.token_ids(2, 12, vocab=32) if ids is None else ids
  graphdef, params, rest = nnx.split(model, jlora.LoraParam, ...)

  @jax.jit
  def loss(params):
    logits = nnx.merge(graphdef, params, rest, copy=True)(ids)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * jnp.arange(logits.shape[1]))

  return jax.value_and_grad(loss)(params)


def assert_same(got, want, tol=1e-4):
  """Equal up to float32 rounding, relative to each array's largest entry (attention amplifies it)."""
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=0, atol=tol * float(np.abs(w).max() + 1)),
               got, want)


@pytest.mark.parametrize("mode", ["auto", "fused"])
def test_lora_matmul_matches_plain_math_and_autodiff(mode):
  k = jax.random.split(jax.random.key(0), 7)
  x = jax.random.normal(k[0], (3, 5, 8))
  kernels = [jax.random.normal(k[1], (8, 6)), jax.random.normal(k[2], (8, 4))]
  factors = [(jax.random.normal(k[3], (8, 3)), jax.random.normal(k[4], (3, 6))),
             (jax.random.normal(k[5], (8, 2)), jax.random.normal(k[6], (2, 4)))]

  def loss(fn):
    return lambda *a: sum(jnp.sum(y * jnp.cos(jnp.arange(y.size)).reshape(y.shape)) for y in fn(*a))

  plain = lambda x, ws, fs: [x @ w + (x @ a) @ b for w, (a, b) in zip(ws, fs)]
  fused = lambda x, ws, fs: lora_matmul(x, ws, fs, mode=mode)
  assert_same(list(fused(x, kernels, factors)), plain(x, kernels, factors), 1e-5)
  grads = jax.grad(loss(fused), argnums=(0, 1, 2))(x, kernels, factors)
  assert_same(grads, jax.grad(loss(plain), argnums=(0, 1, 2))(x, kernels, factors), 1e-4)


def test_frozen_kernel_gets_no_gradient_matmul():
  x, w = jnp.ones((1024, 64)), jnp.ones((64, 64))
  factors = [(jnp.ones((64, 2)), jnp.ones((2, 64)))]
  loss = lambda f, w: lora_matmul(x, [w], f, mode="fused")[0].sum()
  flops = lambda fn: jax.jit(fn).lower(factors, w).compile().cost_analysis()["flops"]
  frozen = flops(jax.grad(loss))
  trained = flops(jax.grad(loss, argnums=(0, 1)))
  # x^T·dy for the kernel is 2·1024·64·64 FLOPs: present only when the kernel is differentiated.
  assert trained - frozen >= 2 * 1024 * 64 * 64 * 0.9


@pytest.mark.parametrize("projections", [1, 2])
def test_merged_kernel_is_one_dot_plus_kernel_in_the_compute_dtype(projections):
  # add(dot(A', B), W) with the dot in bf16 and read by the add alone: the form XLA's GPU gemm
  # rewriter folds into the cuBLAS epilogue (W' = A'·B + 1·W), no float32 [in, out] delta.
  import re
  x = jnp.ones((64, 16), jnp.bfloat16)
  kernels = [jnp.ones((16, 24), jnp.bfloat16)] * projections
  factors = [(jnp.ones((16, 2)), jnp.ones((2, 24)))] * projections
  hlo = jax.jit(lambda x, ws, fs: lora_matmul(x, ws, fs, mode="fused")).lower(x, kernels, factors).as_text(
      dialect="hlo")
  merged = f"bf16[16,{24 * projections}]"
  dots = re.findall(rf"(\S+) = {re.escape(merged)}\S* dot\(", hlo)
  assert len(dots) == 1 and f"f32[16,{24 * projections}]" not in hlo
  users = [line for line in hlo.splitlines() if re.search(rf"[(,] ?{re.escape(dots[0])}[,)]", line)]
  assert len(users) == 1 and re.search(rf"= {re.escape(merged)}\S* add\(", users[0])


@pytest.mark.parametrize("mode", ["auto", "fused"])
@pytest.mark.parametrize("shared", [True, False])
def test_llama_loss_and_grads_equal_plain(mode, shared):
  want = loss_and_grads(adapted(), "plain")
  assert_same(loss_and_grads(adapted(), mode, shared), want)


@pytest.mark.parametrize("remat", ["matmuls", "full"])
def test_fused_path_works_under_remat_policies(remat):
  want = loss_and_grads(adapted(remat="none"), "plain")
  assert_same(loss_and_grads(adapted(remat=remat), "fused"), want)


def test_moslora_fused_equals_plain():
  # The mixer is folded into A before the merge, so the two paths round in a different order; this
  # model's loss amplifies float32 rounding to ~1e-4 of the largest gradient.
  config = jlora.MoSLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
  assert_same(loss_and_grads(adapted(config), "fused"), loss_and_grads(adapted(config), "plain"), tol=3e-4)


def test_rank_pattern_fused_equals_plain():
  config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"q_proj": 2},
                            layers_to_transform=[1])
  assert_same(loss_and_grads(adapted(config), "fused"), loss_and_grads(adapted(config), "plain"))


def test_qkv_bias_fused_equals_plain():
  assert_same(loss_and_grads(adapted(attention_bias=True), "fused"),
              loss_and_grads(adapted(attention_bias=True), "plain"))


def test_partial_targets_fuse_with_plain_linear_siblings():
  config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
  assert_same(loss_and_grads(adapted(config), "fused"), loss_and_grads(adapted(config), "plain"))


def wlora_model():
  model = tiny_llama()
  for name, seed in (("one", 1), ("two", 2)):
    jlora.add_adapter(model, name, jlora.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    testing.randomize_adapters(model, seed=seed)
  jlora.add_adapter(model, "mix", jlora.WLoraConfig(upstream_loras=["one", "two"]))
  jlora.set_adapter(model, "mix")
  return model


def test_wlora_fused_equals_plain():
  assert_same(loss_and_grads(wlora_model(), "fused"), loss_and_grads(wlora_model(), "plain"))


def test_two_active_adapters_fused_equal_plain():
  def model():
    m = adapted()
    jlora.add_adapter(m, "other", jlora.LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS))
    testing.randomize_adapters(m, seed=3)
    jlora.set_adapter(m, ["default", "other"])
    return m
  assert_same(loss_and_grads(model(), "fused"), loss_and_grads(model(), "plain"))


def test_dropout_falls_back_to_the_plain_path():
  config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.5)
  # Same dropout keys in both models: equal only if the fused setting really runs the dropout path.
  assert_same(loss_and_grads(adapted(config), "fused"), loss_and_grads(adapted(config), "plain"))


def test_lora_projections_equals_separate_calls_for_plain_layers():
  layers = [nnx.Linear(8, 4, rngs=nnx.Rngs(i)) for i in range(2)]
  x = jnp.ones((2, 8))
  for got, layer in zip(lora_projections(layers, x), layers):
    np.testing.assert_array_equal(got, layer(x))


def test_unknown_mode_is_rejected_with_the_choices():
  with pytest.raises(ValueError, match="auto, fused, plain"):
    set_lora_matmul(adapted(), "merged")

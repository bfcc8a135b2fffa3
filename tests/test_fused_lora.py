"""The fused LoRA matmul (stacked or merged on the fly, low-rank backward) and shared-input fusion equal the plain path."""

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


@pytest.mark.parametrize("mode", ["exact", "auto", "fused"])
@pytest.mark.parametrize("tokens", [5, 40])  # at 40 tokens "exact" stacks, at 5 it runs unmerged
def test_lora_matmul_matches_plain_math_and_autodiff(mode, tokens):
  k = jax.random.split(jax.random.key(0), 7)
  x = jax.random.normal(k[0], (3, tokens, 8))
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


@pytest.mark.parametrize("mode", ["exact", "auto", "fused"])
@pytest.mark.parametrize("shared", [True, False])
def test_llama_loss_and_grads_equal_plain(mode, shared):
  want = loss_and_grads(adapted(), "plain")
  assert_same(loss_and_grads(adapted(), mode, shared), want)


@pytest.mark.parametrize("mode", ["exact", "fused"])
@pytest.mark.parametrize("remat", ["matmuls", "full"])
def test_fused_path_works_under_remat_policies(remat, mode):
  want = loss_and_grads(adapted(remat="none"), "plain")
  assert_same(loss_and_grads(adapted(remat=remat), mode), want)


@pytest.mark.parametrize("mode", ["exact", "fused"])
def test_moslora_fused_equals_plain(mode):
  # The mixer is folded into A before the merge, so the two paths round in a different order; this
  # model's loss amplifies float32 rounding to ~1e-4 of the largest gradient.
  config = jlora.MoSLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
  assert_same(loss_and_grads(adapted(config), mode), loss_and_grads(adapted(config), "plain"), tol=3e-4)


@pytest.mark.parametrize("mode", ["exact", "fused"])
def test_rank_pattern_fused_equals_plain(mode):
  config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"q_proj": 2},
                            layers_to_transform=[1])
  assert_same(loss_and_grads(adapted(config), mode), loss_and_grads(adapted(config), "plain"))


def test_qkv_bias_fused_equals_plain():
  assert_same(loss_and_grads(adapted(attention_bias=True), "fused"),
              loss_and_grads(adapted(attention_bias=True), "plain"))


@pytest.mark.parametrize("mode", ["exact", "fused"])
def test_partial_targets_fuse_with_plain_linear_siblings(mode):
  config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
  assert_same(loss_and_grads(adapted(config), mode), loss_and_grads(adapted(config), "plain"))


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


@pytest.mark.parametrize("mode", ["exact", "fused"])
def test_two_active_adapters_fused_equal_plain(mode):
  def model():
    m = adapted()
    jlora.add_adapter(m, "other", jlora.LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS))
    testing.randomize_adapters(m, seed=3)
    jlora.set_adapter(m, ["default", "other"])
    return m
  assert_same(loss_and_grads(model(), mode), loss_and_grads(model(), "plain"))


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
  with pytest.raises(ValueError, match="auto, fused, plain, exact"):
    set_lora_matmul(adapted(), "merged")


def bf16_case(tokens=4096, d_in=256, d_out=128, rank=8, b_scale=1.0):
  """bf16 input and kernel, float32 factors; the float32 reference of the same (rounded) inputs."""
  k = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(k[0], (tokens, d_in)).astype(jnp.bfloat16)
  w = (jax.random.normal(k[1], (d_in, d_out)) * 0.05).astype(jnp.bfloat16)
  a = jax.random.normal(k[2], (d_in, rank)) * 0.05
  b = jax.random.normal(k[3], (rank, d_out)) * b_scale
  return x, w, a, b


def bf16_plain(x, w, a, b):
  """What ``"plain"`` computes in bf16: every matmul and the sum rounded to bf16."""
  return x @ w + (x @ a.astype(jnp.bfloat16)) @ b.astype(jnp.bfloat16)


def f32(u):
  return u.astype(jnp.float32)


def test_exact_is_as_close_to_float32_as_plain_in_bf16():
  # Tolerance: the largest error plain makes against the float32 sum of the same bf16 inputs.
  x, w, a, b = bf16_case(tokens=512)
  want = f32(x) @ f32(w) + (f32(x) @ a) @ b
  (got,) = lora_matmul(x, [w], [(a, b)], mode="exact")
  assert got.dtype == jnp.bfloat16
  plain_error = float(jnp.max(jnp.abs(f32(bf16_plain(x, w, a, b)) - want)))
  assert float(jnp.max(jnp.abs(f32(got) - want))) <= plain_error


def test_exact_gradients_are_as_close_to_float32_as_plain_in_bf16():
  x, w, a, b = bf16_case(tokens=512)
  cot = jax.random.normal(jax.random.key(2), (512, 128)).astype(jnp.bfloat16)
  loss = lambda fn: lambda x, a, b: jnp.sum(f32(fn(x, a, b)) * f32(cot))
  exact = jax.grad(loss(lambda x, a, b: lora_matmul(x, [w], [(a, b)], mode="exact")[0]), argnums=(0, 1, 2))(x, a, b)
  plain = jax.grad(loss(lambda x, a, b: bf16_plain(x, w, a, b)), argnums=(0, 1, 2))(x, a, b)
  ref = jax.grad(loss(lambda x, a, b: f32(x) @ f32(w) + (f32(x) @ a) @ b), argnums=(0, 1, 2))(f32(x), a, b)
  for got, by_plain, want in zip(exact, plain, ref):
    scale = float(jnp.max(jnp.abs(want)))
    # plain rounds dh, dx's two terms and their sum; exact rounds dh and dx once: within plain's error
    # plus one bf16 rounding of the result.
    bound = float(jnp.max(jnp.abs(f32(by_plain) - want))) + 2.0 ** -8 * scale
    assert float(jnp.max(jnp.abs(f32(got) - want))) <= bound


def delta_seen(y, x, w, a, b):
  """How much of the adapter's delta ``y`` carries, by least squares (1 = all of it, 0 = none)."""
  delta = (f32(x) @ a) @ b
  return float(jnp.vdot(f32(y) - f32(x) @ f32(w), delta) / jnp.vdot(delta, delta))


def test_exact_keeps_an_adapter_delta_below_the_kernels_bf16_spacing():
  # B small enough that W + A·B rounds back to W in bf16: merging loses the update, exact keeps it (plain's
  # final bf16 add loses it too: see bench/NOTES.md, entry 24).
  x, w, a, b = bf16_case(b_scale=1e-4)
  assert float(jnp.max(jnp.abs(f32((a @ b).astype(jnp.bfloat16) + w) - f32(w)))) > 0  # not all lost...
  assert float(jnp.mean((f32(w) + a @ b).astype(jnp.bfloat16) == w)) > 0.9  # ...but most of it
  assert abs(delta_seen(lora_matmul(x, [w], [(a, b)], mode="exact")[0], x, w, a, b) - 1) < 0.05
  assert delta_seen(lora_matmul(x, [w], [(a, b)], mode="auto")[0], x, w, a, b) < 0.5
  assert delta_seen(bf16_plain(x, w, a, b), x, w, a, b) < 0.5


def test_exact_stacks_the_adapter_into_the_frozen_matmul():
  # Above the threshold one [T, in + R] x [in + R, out] dot forward, one [T, out + R] x [in, out + R] dot
  # for dx backward; R = the rank padded to 8 columns.
  x, w, a, b = bf16_case(tokens=64, d_in=32, d_out=16, rank=2)
  fwd = jax.jit(lambda x, a, b: lora_matmul(x, [w], [(a, b)], mode="exact")).lower(x, a, b).as_text(dialect="hlo")
  assert "bf16[64,40]" in fwd and "bf16[40,16]" in fwd
  bwd = jax.jit(jax.grad(lambda x, a, b: jnp.sum(f32(lora_matmul(x, [w], [(a, b)], mode="exact")[0])))).lower(x, a, b)
  assert "bf16[64,24]" in bwd.as_text(dialect="hlo") and "bf16[32,24]" in bwd.as_text(dialect="hlo")


@pytest.mark.parametrize("mode, mesh, want", [("exact", (1, 1, 1), "exact"), ("exact", (2, 4, 1), "exact"),
                                              ("exact", (1, 1, 2), "plain"), ("auto", (1, 1, 2), "auto")])
def test_a_job_stacks_except_under_tensor_parallelism(mode, mesh, want):
  from jlora.train._train import _lora_matmul
  assert _lora_matmul(mode, mesh) == want

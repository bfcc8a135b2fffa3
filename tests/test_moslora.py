"""MoSLoRA: a trainable r×r mixer between A and B."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from jlora import testing
from jlora.testing import module_at

Q0 = "model.layers.0.self_attn.q_proj"


def moslora_lm(mixer_init="kaiming", r=4, scanned=False, **config):
  config.setdefault("target_modules", ["q_proj", "v_proj"])
  model = testing.TinyLM(scanned=scanned)
  return jlora.get_peft_model(model, jlora.MoSLoraConfig(r=r, mixer_init=mixer_init, **config))


def mixer(model, path=Q0):
  return np.asarray(module_at(model, path).adapters["default"].lora_mixer[...])


@pytest.mark.parametrize("mixer_init", ["kaiming", "orthogonal"])
def test_default_init_output_equals_the_base_output(ids, mixer_init):
  base = testing.TinyLM()(ids)
  np.testing.assert_array_equal(moslora_lm(mixer_init)(ids), base)


def test_orthogonal_mixer_has_orthonormal_columns():
  m = mixer(moslora_lm("orthogonal", r=4))
  np.testing.assert_allclose(m.T @ m, np.eye(4), atol=1e-5)


def test_orthogonal_mixers_of_a_stack_are_each_orthogonal():
  m = mixer(moslora_lm("orthogonal", r=3, scanned=True), "model.layers.self_attn.q_proj")
  assert m.shape == (testing.NUM_LAYERS, 3, 3)
  np.testing.assert_allclose(np.einsum("lji,ljk->lik", m, m), np.broadcast_to(np.eye(3), m.shape), atol=1e-5)


def test_kaiming_mixer_lies_within_one_over_sqrt_r():
  m = mixer(moslora_lm("kaiming", r=4))
  assert np.all(np.abs(m) <= 1 / math.sqrt(4)) and np.std(m) > 0.1


def test_mixer_adds_r_squared_params_per_layer():
  count = lambda model: sum(x.size for x in jax.tree.leaves(jlora.split_adapter(model)[1]))
  lora = jlora.get_peft_model(testing.TinyLM(), jlora.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
  layers = 2 * testing.NUM_LAYERS
  assert count(moslora_lm(r=4)) - count(lora) == layers * 4 * 4


def test_delta_is_x_a_mixer_b_times_scaling():
  model = moslora_lm(r=2, lora_alpha=4)
  testing.randomize_adapters(model)
  layer = module_at(model, Q0)
  adapter = layer.adapters["default"]
  x = jax.random.normal(jax.random.key(0), (3, testing.HIDDEN))
  delta = x @ adapter.lora_A[...] @ adapter.lora_mixer[...] @ adapter.lora_B[...] * 2.0
  np.testing.assert_allclose(layer(x), layer.base_layer(x) + delta, rtol=1e-5, atol=1e-5)


def test_mixer_gets_a_nonzero_gradient(ids):
  model = moslora_lm(r=2)
  testing.randomize_adapters(model)
  graphdef, params, rest = jlora.split_adapter(model)
  grads = jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(ids) ** 2))(params)
  g = grads["model"]["layers"][0]["self_attn"]["q_proj"]["adapters"]["default"]["lora_mixer"]
  assert float(jnp.abs(g[...]).max()) > 0


def test_mixer_is_folded_exactly_into_plain_lora_factors():
  model = moslora_lm(r=2)
  testing.randomize_adapters(model)
  layer = module_at(model, Q0)
  adapter = layer.adapters["default"]
  a, b, _ = adapter.lora_factors(layer)
  np.testing.assert_allclose(a @ b, adapter.lora_A[...] @ adapter.lora_mixer[...] @ adapter.lora_B[...],
                             rtol=1e-5, atol=1e-6)


def test_merge_and_unload_keeps_the_moslora_output(ids):
  model = moslora_lm(r=2, scanned=True)
  testing.randomize_adapters(model, scale=0.2)
  before = model(ids)
  jlora.merge_and_unload(model)
  np.testing.assert_allclose(model(ids), before, rtol=1e-5, atol=1e-5)


def test_from_default_init_the_mixer_trains_after_the_first_step(ids):
  model = moslora_lm(r=2)
  graphdef, params, rest = jlora.split_adapter(model)
  tx = jlora.adapter_optimizer(model, optax.adam(1e-2))
  loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(ids) ** 2)
  mixer_grad = lambda g: g["model"]["layers"][0]["self_attn"]["q_proj"]["adapters"]["default"]["lora_mixer"][...]
  grads = jax.grad(loss)(params)
  assert float(jnp.abs(mixer_grad(grads)).max()) == 0.0  # B = 0 at init, as for A in plain LoRA
  updates, _ = tx.update(grads, tx.init(params), params)
  grads = jax.grad(loss)(optax.apply_updates(params, updates))
  assert float(jnp.abs(mixer_grad(grads)).max()) > 0

"""Scanned (stacked) layers: adapters carry the layer axis and run inside ``nnx.scan``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from jlora import testing
from jlora.testing import module_at

L = testing.NUM_LAYERS
STACKED_Q = "model.layers.self_attn.q_proj"


def scanned_lm(**config):
  config.setdefault("target_modules", ["q_proj", "v_proj", "down_proj"])
  config.setdefault("r", 2)
  return jlora.get_peft_model(testing.TinyScannedLM(), jlora.LoraConfig(**config))


def copy_adapters_to_list_model(scanned, flat):
  """Give ``flat`` (a list-of-blocks copy, same config injected) the scanned model's adapter values."""
  for _, layer in jlora.lora_layers(scanned):
    for name, adapter in layer.adapters.items():
      for i, module_name in enumerate(layer.module_names):
        target = module_at(flat, module_name)
        if not isinstance(target, jlora.LoraLayer):
          continue  # left out by layers_to_transform
        mine = target.adapters[name]
        mine.lora_A[...] = adapter.lora_A[...][i][..., :mine.rank]  # live rank slots come first
        mine.lora_B[...] = adapter.lora_B[...][i][:mine.rank]


def test_adapters_carry_the_layer_axis():
  adapter = module_at(scanned_lm(r=3), STACKED_Q).adapters["default"]
  assert adapter.lora_A.shape == (L, testing.HIDDEN, 3)
  assert adapter.lora_B.shape == (L, 3, testing.HIDDEN)
  assert adapter.scaling.shape == (L,)


def test_layers_of_a_stack_get_different_initial_a():
  a = np.asarray(module_at(scanned_lm(), STACKED_Q).adapters["default"].lora_A[...])
  assert not np.allclose(a[0], a[1]) and not np.allclose(a[1], a[2])


def test_fresh_scanned_adapter_leaves_output_unchanged(ids):
  base = testing.TinyScannedLM()(ids)
  np.testing.assert_array_equal(scanned_lm()(ids), base)


@pytest.mark.parametrize("config", [
    dict(),
    dict(rank_pattern={r"layers\.1\.self_attn\.q_proj": 4, "down_proj": 3}),
    dict(alpha_pattern={r"layers\.2\.self_attn\.v_proj": 7.0}, use_rslora=True),
    dict(layers_to_transform=[0, 2]),
], ids=["plain", "rank_pattern", "alpha_pattern", "layers_to_transform"])
def test_scanned_forward_equals_the_unstacked_model(ids, config):
  base = testing.TinyScannedLM()
  flat = testing.unstacked_copy(base)
  config = jlora.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "down_proj"], **config)
  scanned = jlora.get_peft_model(base, config)
  jlora.get_peft_model(flat, config)
  testing.randomize_adapters(scanned, scale=0.3)
  copy_adapters_to_list_model(scanned, flat)
  np.testing.assert_allclose(scanned(ids), flat(ids), rtol=1e-5, atol=1e-5)


def test_rank_pattern_per_stacked_layer_masks_the_rank():
  model = scanned_lm(r=2, lora_alpha=8, rank_pattern={r"layers\.1\.self_attn\.q_proj": 4})
  adapter = module_at(model, STACKED_Q).adapters["default"]
  assert adapter.lora_A.shape == (L, testing.HIDDEN, 4)
  np.testing.assert_array_equal(adapter.rank_mask[...], [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
  np.testing.assert_allclose(adapter.scaling[...], [4.0, 2.0, 4.0])


def test_alpha_pattern_per_stacked_layer_sets_its_scaling():
  model = scanned_lm(r=2, lora_alpha=2, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 6})
  adapter = module_at(model, STACKED_Q).adapters["default"]
  np.testing.assert_allclose(adapter.scaling[...], [3.0, 1.0, 1.0])
  assert adapter.rank_mask is None


def test_masked_rank_slots_never_reach_the_output():
  model = scanned_lm(r=1, rank_pattern={r"layers\.1\.self_attn\.q_proj": 3})
  testing.randomize_adapters(model)
  layer = module_at(model, STACKED_Q)
  delta = layer.delta_weight("default")
  assert np.linalg.matrix_rank(np.asarray(delta[0])) == 1
  assert np.linalg.matrix_rank(np.asarray(delta[1])) == 3


def test_merge_on_stacked_kernels_keeps_the_output_and_unmerge_restores_them(ids):
  model = scanned_lm(rank_pattern={"down_proj": 3}, layers_to_transform=[1, 2])
  testing.randomize_adapters(model, scale=0.2)
  before = model(ids)
  kernels = {p: np.asarray(l.kernel()[...]) for p, l in jlora.lora_layers(model)}
  jlora.merge_adapter(model)
  np.testing.assert_allclose(model(ids), before, rtol=1e-5, atol=1e-5)
  layer = module_at(model, STACKED_Q)
  q_path = ("model", "layers", "self_attn", "q_proj")
  np.testing.assert_array_equal(layer.kernel()[...][0], kernels[q_path][0])  # layer 0 left out
  jlora.unmerge_adapter(model)
  for path, layer in jlora.lora_layers(model):
    np.testing.assert_allclose(layer.kernel()[...], kernels[path], atol=1e-6)


def test_merge_and_unload_on_a_scanned_model(ids):
  model = scanned_lm()
  testing.randomize_adapters(model, scale=0.2)
  before = model(ids)
  jlora.merge_and_unload(model)
  assert isinstance(module_at(model, STACKED_Q), nnx.Linear)
  np.testing.assert_allclose(model(ids), before, rtol=1e-5, atol=1e-5)


def test_grad_through_the_scan_reaches_every_stacked_layer(ids):
  model = scanned_lm()
  testing.randomize_adapters(model, scale=0.2)
  graphdef, params, rest = jlora.split_adapter(model)
  loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest, copy=True)(ids) ** 2)
  for g in jax.tree.leaves(jax.jit(jax.grad(loss))(params)):
    assert all(float(jnp.abs(g[i]).max()) > 0 for i in range(L))


def dropout_lm(rate=0.5, seed=0):
  model = scanned_lm(lora_dropout=rate, target_modules=["q_proj", "up_proj"])
  testing.randomize_adapters(model, seed=seed, scale=0.3)
  return model


def test_dropout_counter_advances_once_per_call_inside_scan(ids):
  model = dropout_lm()
  adapter = module_at(model, "model.layers.mlp.up_proj").adapters["default"]
  np.testing.assert_array_equal(adapter.dropout_count[...], [0] * L)
  model(ids)
  model(ids)
  np.testing.assert_array_equal(adapter.dropout_count[...], [2] * L)


def test_dropout_counter_advances_under_nnx_jit(ids):
  model = dropout_lm()
  forward = nnx.jit(lambda m, x: m(x))
  first, second = forward(model, ids), forward(model, ids)
  adapter = module_at(model, "model.layers.mlp.up_proj").adapters["default"]
  np.testing.assert_array_equal(adapter.dropout_count[...], [2] * L)
  assert not np.allclose(first, second)


def test_dropout_masks_differ_across_steps(ids):
  model = dropout_lm()
  assert not np.allclose(model(ids), model(ids))


def test_dropout_keys_differ_across_stacked_layers():
  keys = np.asarray(module_at(dropout_lm(), STACKED_Q).adapters["default"].dropout_key[...])
  assert len({k.tobytes() for k in keys}) == L


def test_dropout_changes_the_training_output(ids):
  assert not np.allclose(dropout_lm(rate=0.5)(ids), dropout_lm(rate=0.0)(ids))


def test_eval_makes_dropout_deterministic_and_equal_to_no_dropout(ids):
  model = dropout_lm(rate=0.5)
  model.eval()
  first, second = model(ids), model(ids)
  np.testing.assert_array_equal(first, second)
  np.testing.assert_allclose(first, dropout_lm(rate=0.0)(ids), rtol=1e-6, atol=1e-6)


def test_train_turns_dropout_back_on(ids):
  model = dropout_lm(rate=0.5)
  model.eval()
  model.train()
  assert not np.allclose(model(ids), model(ids))


def test_gaussian_init_uses_each_stacked_layers_own_rank():
  model = jlora.get_peft_model(testing.TinyScannedLM(hidden=64), jlora.LoraConfig(
      r=2, target_modules=["q_proj"], init_lora_weights="gaussian",
      rank_pattern={r"layers\.1\.self_attn\.q_proj": 8}))
  a = np.asarray(module_at(model, STACKED_Q).adapters["default"].lora_A[...])
  assert np.std(a[0, :, :2]) == pytest.approx(1 / 2, rel=0.15)
  assert np.std(a[1]) == pytest.approx(1 / 8, rel=0.15)


def test_pure_merge_of_stacked_kernels_under_jit(ids):
  model = scanned_lm()
  testing.randomize_adapters(model, scale=0.2)
  before = model(ids)
  graphdef, adapter, base = nnx.split(model, jlora.LoraParam, ...)
  merged = jax.jit(lambda b, a: jlora.merge(graphdef, b, a))(base, adapter)
  merged_model = nnx.merge(graphdef, adapter, merged)
  with jlora.disable_adapters(merged_model):
    np.testing.assert_allclose(merged_model(ids), before, rtol=1e-5, atol=1e-5)


def test_stacked_adapter_state_loads_into_a_fresh_model(ids):
  trained = dropout_lm(seed=3)
  trained.eval()
  fresh = dropout_lm(seed=4)
  fresh.eval()
  jlora.load_adapter_state(fresh, jlora.adapter_state(trained))
  np.testing.assert_array_equal(fresh(ids), trained(ids))


def test_a_pure_train_step_carries_the_dropout_counter_through_the_rest_state(ids):
  model = dropout_lm()
  graphdef, params, rest = jlora.split_adapter(model)

  @jax.jit
  def step(p, r):
    def loss(p):
      m = nnx.merge(graphdef, p, r, copy=True)
      return jnp.mean(m(ids) ** 2), nnx.state(m, jlora.nn.LoraRngKey)

    (value, rng_state), _ = jax.value_and_grad(loss, has_aux=True)(p)
    return value, nnx.merge_state(r, rng_state)

  first, carried = step(params, rest)
  again, _ = step(params, rest)
  second, _ = step(params, carried)
  assert first == again  # same counter, same masks
  assert first != second  # the carried counter draws new masks

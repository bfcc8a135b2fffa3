"""WLoRA: trainable softmax weights over frozen upstream LoRAs."""

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
TARGETS = ["q_proj", "v_proj"]


def with_upstreams(names=("u1", "u2", "u3"), scanned=False, targets=TARGETS):
  """A TinyLM holding random LoRA adapters ``names`` (none active)."""
  model = testing.TinyLM(scanned=scanned)
  for seed, name in enumerate(names):
    config = jlora.LoraConfig(r=2 + seed, lora_alpha=4, target_modules=targets, seed=seed)
    jlora.add_adapter(model, name, config)
  testing.randomize_adapters(model, scale=0.3)
  return model


def wlora_lm(scanned=False, **config):
  model = with_upstreams(scanned=scanned)
  config.setdefault("upstream_loras", ["u1", "u2", "u3"])
  return jlora.get_peft_model(model, jlora.WLoraConfig(**config), "w")


def test_weights_start_equal_and_sum_to_one():
  weights = module_at(wlora_lm(), Q0).adapters["w"].weights()
  np.testing.assert_allclose(weights, np.full(3, 1 / 3), rtol=1e-6)


def test_weights_are_the_softmax_of_the_logits_per_stacked_layer():
  adapter = module_at(wlora_lm(scanned=True), "model.layers.self_attn.q_proj").adapters["w"]
  adapter.logits[...] = jax.random.normal(jax.random.key(0), adapter.logits.shape)
  weights = adapter.weights()
  assert weights.shape == (testing.NUM_LAYERS, 3)
  np.testing.assert_allclose(weights.sum(-1), np.ones(testing.NUM_LAYERS), rtol=1e-6)
  np.testing.assert_allclose(weights, jax.nn.softmax(adapter.logits[...], -1), rtol=1e-6)


def test_logits_are_the_only_trainable_params():
  model = wlora_lm()
  _, params, _ = jlora.split_adapter(model)
  mask = jlora.trainable_mask(model, params)
  trainable = {path[-1] for path, on in nnx.to_flat_state(mask) if on}
  assert trainable == {"logits"}


def test_delta_is_the_weighted_sum_of_upstream_deltas():
  model = wlora_lm()
  layer = module_at(model, Q0)
  x = jax.random.normal(jax.random.key(0), (2, testing.HIDDEN))
  base = layer.base_layer(x)
  deltas = []
  for name in ("u1", "u2", "u3"):
    jlora.set_adapter(model, name)
    deltas.append(layer(x) - base)
  jlora.set_adapter(model, "w")
  np.testing.assert_allclose(layer(x) - base, sum(deltas) / 3, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scanned", [False, True], ids=["list", "scanned"])
def test_training_moves_logits_and_leaves_upstreams_bit_identical(ids, scanned):
  model = wlora_lm(scanned=scanned)
  graphdef, params, rest = jlora.split_adapter(model)
  tx = jlora.adapter_optimizer(model, optax.adamw(0.1, weight_decay=0.5))
  opt_state = tx.init(params)

  @jax.jit
  def step(p, s):
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest, copy=True)(ids) ** 2)
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  new = params
  for _ in range(3):
    new, opt_state = step(new, opt_state)
  for (path, before), (_, after) in zip(nnx.to_flat_state(params), nnx.to_flat_state(new)):
    if path[-1] == "logits":
      assert np.any(np.asarray(before[...]) != np.asarray(after[...])), path
    else:
      np.testing.assert_array_equal(after[...], before[...], err_msg=str(path))


def test_merge_and_unload_keeps_the_wlora_output(ids):
  model = wlora_lm(scanned=True)
  adapter = module_at(model, "model.layers.self_attn.q_proj").adapters["w"]
  adapter.logits[...] = jax.random.normal(jax.random.key(0), adapter.logits.shape)
  before = model(ids)
  jlora.merge_and_unload(model, ["w"])
  np.testing.assert_allclose(model(ids), before, rtol=1e-5, atol=1e-5)


def test_target_modules_restricts_the_wlora_layers():
  model = wlora_lm(target_modules=["v_proj"])
  assert "w" in module_at(model, "model.layers.0.self_attn.v_proj").adapters
  assert "w" not in module_at(model, Q0).adapters


def test_upstreams_are_copies_unaffected_by_later_changes_to_the_originals():
  model = wlora_lm()
  layer = module_at(model, Q0)
  kept = np.asarray(layer.adapters["w"].upstreams[0].lora_A[...])
  layer.adapters["u1"].lora_A[...] = jnp.zeros_like(layer.adapters["u1"].lora_A[...])
  np.testing.assert_array_equal(layer.adapters["w"].upstreams[0].lora_A[...], kept)


def test_zero_upstreams_is_an_error():
  with pytest.raises(ValueError, match="at least one upstream"):
    jlora.WLoraConfig(upstream_loras=[])


def test_one_upstream_name_may_be_given_as_a_string():
  assert jlora.WLoraConfig(upstream_loras="u1").upstream_loras == ("u1",)


def test_duplicate_upstreams_is_an_error():
  with pytest.raises(ValueError, match="duplicates"):
    jlora.WLoraConfig(upstream_loras=["u1", "u1"])


def test_unknown_upstream_is_an_error():
  model = with_upstreams(("u1",))
  with pytest.raises(ValueError, match=r"'nope' is neither an adapter of the model"):
    jlora.get_peft_model(model, jlora.WLoraConfig(upstream_loras=["u1", "nope"]), "w")


def test_upstreams_on_different_modules_are_an_error():
  model = testing.TinyLM()
  jlora.add_adapter(model, "u1", jlora.LoraConfig(r=2, target_modules=["q_proj"]))
  jlora.add_adapter(model, "u2", jlora.LoraConfig(r=2, target_modules=["v_proj"]))
  with pytest.raises(ValueError, match="must adapt the same modules"):
    jlora.get_peft_model(model, jlora.WLoraConfig(upstream_loras=["u1", "u2"]), "w")


def test_a_wlora_upstream_of_a_wlora_is_an_error():
  model = wlora_lm()
  with pytest.raises(ValueError, match="not WLoRA"):
    jlora.add_adapter(model, "w2", jlora.WLoraConfig(upstream_loras=["u1", "w"]))


def test_targets_outside_the_upstreams_are_an_error():
  model = with_upstreams()
  with pytest.raises(ValueError, match="selects no layer"):
    jlora.add_adapter(model, "w", jlora.WLoraConfig(upstream_loras=["u1", "u2"], target_modules=["o_proj"]))


def test_target_modules_can_restrict_single_layers_of_a_stack():
  model = wlora_lm(scanned=True, target_modules=r"model\.layers\.1\.self_attn\.q_proj")
  layer = module_at(model, "model.layers.self_attn.q_proj")
  delta = np.asarray(layer.delta_weight("w"))
  assert np.all(delta[0] == 0) and np.all(delta[2] == 0) and np.any(delta[1] != 0)
  assert "w" not in module_at(model, "model.layers.self_attn.v_proj").adapters


def test_an_nnx_trainer_selecting_lora_params_keeps_the_upstreams_frozen():
  model = wlora_lm()
  adapter = module_at(model, Q0).adapters["w"]
  upstream = np.asarray(adapter.upstreams[0].lora_B[...]).copy()
  logits = np.asarray(adapter.logits[...]).copy()
  optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.LoRAParam)  # tunix's PeftTrainer does this
  loss = lambda m: jnp.mean(m(testing.token_ids()) ** 2)
  grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  optimizer.update(model, grads)
  np.testing.assert_array_equal(np.asarray(adapter.upstreams[0].lora_B[...]), upstream)
  assert np.abs(np.asarray(adapter.logits[...]) - logits).max() > 0

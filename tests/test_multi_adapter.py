"""Several adapters in one model: activation, joint training, disabling, deleting, routing."""

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


def three_adapters(targets=("q_proj", "v_proj"), scanned=False):
  """A TinyLM with random adapters "a", "b", "c" ("a" active)."""
  model = testing.TinyLM(scanned=scanned)
  for seed, name in enumerate("abc"):
    jlora.add_adapter(model, name, jlora.LoraConfig(r=2, target_modules=list(targets), seed=seed))
  testing.randomize_adapters(model, scale=0.3)
  jlora.set_adapter(model, "a")
  return model


def output_with(model, names, ids):
  jlora.set_adapter(model, names)
  return model(ids)


def test_add_adapter_does_not_activate_it(ids):
  model = three_adapters()
  a_only = model(ids)
  assert jlora.active_adapters(model) == ("a",)
  jlora.add_adapter(model, "d", jlora.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
  np.testing.assert_array_equal(model(ids), a_only)


def test_set_adapter_switches_the_output(ids):
  model = three_adapters()
  assert not np.allclose(output_with(model, "a", ids), output_with(model, "b", ids))


def test_two_active_adapters_add_their_deltas(ids):
  model = three_adapters(targets=["lm_head"])  # the last layer: deltas add in the logits
  with jlora.disable_adapters(model):
    base = model(ids)
  a, b = output_with(model, "a", ids), output_with(model, "b", ids)
  both = output_with(model, ["a", "b"], ids)
  np.testing.assert_allclose(both - base, (a - base) + (b - base), rtol=1e-5, atol=1e-5)
  assert jlora.active_adapters(model) == ("a", "b")


@pytest.mark.parametrize("scanned", [False, True], ids=["list", "scanned"])
def test_joint_training_updates_both_active_adapters_only(ids, scanned):
  model = three_adapters(scanned=scanned)
  jlora.set_adapter(model, ["a", "b"])
  graphdef, params, rest = jlora.split_adapter(model)
  tx = jlora.adapter_optimizer(model, optax.adamw(1e-2, weight_decay=0.1))
  opt_state = tx.init(params)

  def loss(p):
    # copy=True: the rebuilt model's variables must belong to grad's trace (nnx.scan checks).
    return jnp.mean(nnx.merge(graphdef, p, rest, copy=True)(ids) ** 2)

  updates, _ = tx.update(jax.jit(jax.grad(loss))(params), opt_state, params)
  new = dict(nnx.to_flat_state(optax.apply_updates(params, updates)))
  for path, before in nnx.to_flat_state(params):
    adapter = path[path.index("adapters") + 1]
    changed = bool(jnp.any(new[path][...] != before[...]))
    assert changed == (adapter in ("a", "b")), path


def test_disable_adapters_gives_the_base_output_and_then_restores(ids):
  base = testing.TinyLM()(ids)
  model = three_adapters()
  jlora.set_adapter(model, ["a", "b"])
  adapted = model(ids)
  with jlora.disable_adapters(model):
    np.testing.assert_array_equal(model(ids), base)
  np.testing.assert_array_equal(model(ids), adapted)


def test_disable_adapters_restores_even_after_an_error(ids):
  model = three_adapters()
  with pytest.raises(RuntimeError):
    with jlora.disable_adapters(model):
      raise RuntimeError("boom")
  assert not module_at(model, Q0).disabled


def test_delete_adapter_removes_it_everywhere(ids):
  model = three_adapters()
  b_out = output_with(model, "b", ids)
  jlora.delete_adapter(model, "a")
  assert "a" not in jlora.peft_config(model)
  assert all("a" not in layer.adapters for _, layer in jlora.lora_layers(model))
  np.testing.assert_array_equal(output_with(model, "b", ids), b_out)


def test_deleting_the_last_adapter_unwraps_the_layers(ids):
  base = testing.TinyLM()(ids)
  model = three_adapters()
  for name in "abc":
    jlora.delete_adapter(model, name)
  assert list(jlora.lora_layers(model)) == []
  assert isinstance(module_at(model, Q0), nnx.Linear)
  np.testing.assert_array_equal(model(ids), base)


def test_deleting_an_active_adapter_deactivates_it(ids):
  model = three_adapters()
  jlora.set_adapter(model, ["a", "b"])
  jlora.delete_adapter(model, "a")
  assert jlora.active_adapters(model) == ("b",)


def test_adapters_on_different_modules_unwrap_only_their_own():
  model = testing.TinyLM()
  jlora.add_adapter(model, "q", jlora.LoraConfig(r=2, target_modules=["q_proj"]))
  jlora.add_adapter(model, "qv", jlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
  jlora.delete_adapter(model, "qv")
  assert isinstance(module_at(model, Q0), jlora.LoraLayer)
  assert isinstance(module_at(model, "model.layers.0.self_attn.v_proj"), nnx.Linear)


@pytest.mark.parametrize("scanned", [False, True], ids=["list", "scanned"])
def test_per_sample_adapters_route_each_row(ids, scanned):
  model = three_adapters(scanned=scanned)
  expected = {name: output_with(model, name, ids) for name in "ab"}
  with jlora.disable_adapters(model):
    expected["__base__"] = model(ids)
  routes = ["b", "__base__"], ["a", "b"], ["__base__", "a"]
  for names in routes:
    with jlora.per_sample_adapters(model, names):
      out = model(ids)
    for row, name in enumerate(names):
      np.testing.assert_allclose(out[row], expected[name][row], rtol=1e-5, atol=1e-5)


def test_per_sample_adapters_ignore_the_active_set_and_then_restore_it(ids):
  model = three_adapters()
  a_out = output_with(model, "a", ids)
  with jlora.per_sample_adapters(model, ["b", "b"]):
    b_out = model(ids)
  np.testing.assert_allclose(b_out, output_with(model, "b", ids), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(output_with(model, "a", ids), a_out)


def test_per_sample_adapters_work_under_jit(ids):
  model = three_adapters()
  expected = output_with(model, "b", ids)
  with jlora.per_sample_adapters(model, ["b", "b"]):
    out = nnx.jit(lambda m, x: m(x))(model, ids)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_disable_adapters_unmerges_merged_adapters_first(ids):
  base = testing.TinyLM()(ids)
  model = three_adapters()
  adapted = model(ids)
  jlora.merge_adapter(model)
  with jlora.disable_adapters(model):
    np.testing.assert_allclose(model(ids), base, rtol=1e-5, atol=1e-5)
  assert module_at(model, Q0).merged_adapters == ()
  np.testing.assert_allclose(model(ids), adapted, rtol=1e-5, atol=1e-5)

"""Plain LoRA on Flax layers: forward math, scaling, init, merging, unloading."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from jlora import testing
from jlora.testing import module_at

Q0 = "model.layers.0.self_attn.q_proj"


def adapted_lm(**config):
  model = testing.TinyLM()
  config.setdefault("target_modules", ["q_proj", "v_proj"])
  return jlora.get_peft_model(model, jlora.LoraConfig(**config))


def test_fresh_adapter_leaves_output_unchanged(ids):
  base = testing.TinyLM()(ids)
  np.testing.assert_array_equal(adapted_lm(r=4)(ids), base)


def test_linear_delta_is_x_a_b_times_scaling():
  model = adapted_lm(r=2, lora_alpha=6)
  testing.randomize_adapters(model)
  layer = module_at(model, Q0)
  adapter = layer.adapters["default"]
  x = jax.random.normal(jax.random.key(0), (3, testing.HIDDEN))
  expected = layer.base_layer(x) + x @ adapter.lora_A[...] @ adapter.lora_B[...] * 3.0
  np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_factor_shapes_follow_flax_kernel_layout():
  adapter = module_at(adapted_lm(r=3), Q0).adapters["default"]
  assert adapter.lora_A.shape == (testing.HIDDEN, 3)
  assert adapter.lora_B.shape == (3, testing.HIDDEN)


def test_scaling_is_alpha_over_r():
  adapter = module_at(adapted_lm(r=4, lora_alpha=16), Q0).adapters["default"]
  assert float(adapter.scaling[...]) == pytest.approx(4.0)


def test_rslora_scaling_is_alpha_over_sqrt_r():
  adapter = module_at(adapted_lm(r=4, lora_alpha=16, use_rslora=True), Q0).adapters["default"]
  assert float(adapter.scaling[...]) == pytest.approx(16 / math.sqrt(4))


def test_rank_pattern_overrides_rank_per_module():
  model = adapted_lm(r=2, rank_pattern={"v_proj": 5, r"layers\.1\.self_attn\.q_proj": 3})
  assert module_at(model, Q0).adapters["default"].rank == 2
  assert module_at(model, "model.layers.1.self_attn.q_proj").adapters["default"].rank == 3
  assert module_at(model, "model.layers.2.self_attn.v_proj").adapters["default"].rank == 5


def test_rank_pattern_keys_match_like_peft_a_whole_regex_after_a_dot():
  config = jlora.LoraConfig(r=2, rank_pattern={"q_proj|v_proj": 4, "proj": 3})
  assert config.rank_for("model.layers.0.self_attn.q_proj") == 4
  assert config.rank_for("model.layers.0.self_attn.v_proj") == 4
  assert config.rank_for("model.layers.0.self_attn.k_proj") == 2  # "proj" must follow a dot
  assert config.rank_for("model.q_proj.inner") == 2


def test_rank_pattern_changes_scaling_with_the_rank():
  model = adapted_lm(r=2, lora_alpha=8, rank_pattern={"v_proj": 4})
  v = module_at(model, "model.layers.0.self_attn.v_proj").adapters["default"]
  assert float(v.scaling[...]) == pytest.approx(8 / 4)


def test_alpha_pattern_overrides_alpha_per_module():
  model = adapted_lm(r=2, lora_alpha=4, alpha_pattern={"v_proj": 10})
  q = module_at(model, Q0).adapters["default"]
  v = module_at(model, "model.layers.0.self_attn.v_proj").adapters["default"]
  assert float(q.scaling[...]) == pytest.approx(2.0)
  assert float(v.scaling[...]) == pytest.approx(5.0)


def test_default_init_is_kaiming_uniform_a_and_zero_b():
  adapter = module_at(adapted_lm(r=4), Q0).adapters["default"]
  a = np.asarray(adapter.lora_A[...])
  assert np.all(np.abs(a) <= 1 / math.sqrt(testing.HIDDEN)) and np.any(a != 0)
  np.testing.assert_array_equal(adapter.lora_B[...], 0)


def test_gaussian_init_draws_a_with_std_one_over_r():
  model = testing.TinyLM(hidden=64)
  config = jlora.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian")
  adapter = module_at(jlora.get_peft_model(model, config), Q0).adapters["default"]
  assert float(jnp.std(adapter.lora_A[...])) == pytest.approx(1 / 4, rel=0.15)
  np.testing.assert_array_equal(adapter.lora_B[...], 0)


def test_init_false_changes_the_output(ids):
  base = testing.TinyLM()(ids)
  assert not np.allclose(adapted_lm(init_lora_weights=False)(ids), base)


def test_embedding_init_is_zero_a_and_normal_b():
  model = jlora.get_peft_model(testing.TinyLM(), jlora.LoraConfig(r=3, target_modules=["embed_tokens"]))
  adapter = module_at(model, "model.embed_tokens").adapters["default"]
  assert adapter.lora_A.shape == (testing.VOCAB, 3)
  np.testing.assert_array_equal(adapter.lora_A[...], 0)
  assert np.any(np.asarray(adapter.lora_B[...]) != 0)


def test_embedding_delta_looks_up_rows_of_a(ids):
  config = jlora.LoraConfig(r=3, lora_alpha=6, target_modules=["embed_tokens"])
  model = jlora.get_peft_model(testing.TinyLM(), config)
  testing.randomize_adapters(model)
  layer = module_at(model, "model.embed_tokens")
  adapter = layer.adapters["default"]
  expected = layer.base_layer(ids) + adapter.lora_A[...][ids] @ adapter.lora_B[...] * 2.0
  np.testing.assert_allclose(layer(ids), expected, rtol=1e-5, atol=1e-6)


def test_conv_adapter_equals_convolution_with_the_merged_kernel(images):
  config = jlora.LoraConfig(r=2, target_modules=["conv1", "conv2"])
  model = jlora.get_peft_model(testing.TinyConvNet(), config)
  testing.randomize_adapters(model)
  before = model(images)
  jlora.merge_adapter(model)
  np.testing.assert_allclose(model(images), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [["q_proj", "up_proj"], ["embed_tokens"], ["lm_head"]])
def test_merged_model_gives_the_unmerged_output(ids, targets):
  model = adapted_lm(r=2, target_modules=targets)
  testing.randomize_adapters(model, scale=0.2)
  before = model(ids)
  jlora.merge_adapter(model)
  np.testing.assert_allclose(model(ids), before, rtol=1e-5, atol=1e-5)


def test_unmerge_restores_base_kernels():
  model = adapted_lm(r=2)
  testing.randomize_adapters(model)
  kernel = np.asarray(module_at(model, Q0).base_layer.kernel[...])
  jlora.merge_adapter(model)
  assert not np.allclose(module_at(model, Q0).base_layer.kernel[...], kernel)
  jlora.unmerge_adapter(model)
  np.testing.assert_allclose(module_at(model, Q0).base_layer.kernel[...], kernel, atol=1e-6)
  assert module_at(model, Q0).merged_adapters == ()


def test_merging_twice_does_not_add_the_delta_twice(ids):
  model = adapted_lm(r=2)
  testing.randomize_adapters(model, scale=0.2)
  before = model(ids)
  jlora.merge_adapter(model)
  jlora.merge_adapter(model)
  np.testing.assert_allclose(model(ids), before, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_returns_a_plain_model_with_the_adapted_output(ids):
  model = adapted_lm(r=2)
  testing.randomize_adapters(model, scale=0.2)
  before = model(ids)
  jlora.merge_and_unload(model)
  assert list(jlora.lora_layers(model)) == []
  assert isinstance(module_at(model, Q0), nnx.Linear)
  assert jlora.peft_config(model) == {}
  np.testing.assert_allclose(model(ids), before, rtol=1e-5, atol=1e-5)


def test_unload_gives_back_the_base_model(ids):
  base = testing.TinyLM()(ids)
  model = adapted_lm(r=2)
  testing.randomize_adapters(model)
  jlora.merge_adapter(model)
  jlora.unload(model)
  assert list(jlora.lora_layers(model)) == []
  np.testing.assert_allclose(model(ids), base, rtol=1e-5, atol=1e-5)


def test_pure_merge_under_jit_equals_in_place_merge(ids):
  model = adapted_lm(r=2)
  testing.randomize_adapters(model, scale=0.2)
  before = model(ids)
  graphdef, adapter, base = nnx.split(model, jlora.LoraParam, ...)
  merged = jax.jit(lambda b, a: jlora.merge(graphdef, b, a))(base, adapter)
  merged_model = nnx.merge(graphdef, adapter, merged)
  with jlora.disable_adapters(merged_model):
    np.testing.assert_allclose(merged_model(ids), before, rtol=1e-5, atol=1e-5)


def test_pure_unmerge_inverts_pure_merge():
  model = adapted_lm(r=2)
  testing.randomize_adapters(model)
  graphdef, adapter, base = nnx.split(model, jlora.LoraParam, ...)
  roundtrip = jlora.unmerge(graphdef, jlora.merge(graphdef, base, adapter), adapter)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), roundtrip, base)


def test_pure_merge_leaves_the_model_untouched():
  model = adapted_lm(r=2)
  testing.randomize_adapters(model)
  kernel = np.asarray(module_at(model, Q0).base_layer.kernel[...])
  graphdef, adapter, base = nnx.split(model, jlora.LoraParam, ...)
  jlora.merge(graphdef, base, adapter)
  np.testing.assert_array_equal(module_at(model, Q0).base_layer.kernel[...], kernel)
  assert module_at(model, Q0).merged_adapters == ()


def test_split_adapter_holds_only_lora_params():
  model = adapted_lm(r=2)
  _, params, rest = jlora.split_adapter(model)
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert leaves and all(isinstance(v, jlora.LoraParam) for v in leaves)
  assert not any(isinstance(v, jlora.LoraParam) for v in
                 jax.tree.leaves(rest, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def test_every_adapter_param_gets_a_gradient(ids):
  model = adapted_lm(r=2)
  testing.randomize_adapters(model)
  graphdef, params, rest = jlora.split_adapter(model)

  def loss(p):
    return jnp.mean(nnx.merge(graphdef, p, rest)(ids) ** 2)

  grads = jax.grad(loss)(params)
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


def test_load_adapter_state_keeps_the_models_dtypes(ids):
  trained, fresh = adapted_lm(r=2), adapted_lm(r=2)
  testing.randomize_adapters(trained)
  as_bf16 = jax.tree.map(lambda v: np.asarray(v.astype(jnp.bfloat16)), jlora.adapter_state(trained))
  jlora.load_adapter_state(fresh, as_bf16)
  adapter = module_at(fresh, Q0).adapters["default"]
  assert adapter.lora_A[...].dtype == jnp.float32 and isinstance(adapter.lora_A[...], jax.Array)
  rounded = module_at(trained, Q0).adapters["default"].lora_A[...].astype(jnp.bfloat16)
  np.testing.assert_array_equal(adapter.lora_A[...], rounded.astype(jnp.float32))


class HeadsNet(nnx.Module):
  """LinearGeneral and Einsum in the layouts attention uses: [B, T, D] -> heads -> [B, T, D]."""

  def __init__(self):
    rngs = nnx.Rngs(0)
    self.qkv = nnx.LinearGeneral(6, (2, 3), rngs=rngs)  # D -> (heads, head_dim)
    self.per_head = nnx.Einsum("btnh,nhk->btnk", (2, 3, 4), rngs=rngs)  # heads shared
    self.out = nnx.Einsum("btnk,nkd->btd", (2, 4, 6), rngs=rngs)  # heads contracted
    self.merge_heads = nnx.LinearGeneral((2, 4), 6, axis=(-2, -1), rngs=rngs)

  def __call__(self, x):
    h = self.per_head(self.qkv(x))
    return self.out(h) + self.merge_heads(h)


@pytest.mark.parametrize("target", ["qkv", "per_head", "out", "merge_heads"])
def test_general_layers_forward_equals_their_merged_kernel(target):
  x = jax.random.normal(jax.random.key(0), (2, 3, 6))
  model = jlora.get_peft_model(HeadsNet(), jlora.LoraConfig(r=2, target_modules=[target]))
  testing.randomize_adapters(model)
  with jlora.disable_adapters(model):
    base = model(x)
  before = model(x)
  assert not np.allclose(before, base)
  jlora.merge_adapter(model)
  np.testing.assert_allclose(model(x), before, rtol=1e-5, atol=1e-5)

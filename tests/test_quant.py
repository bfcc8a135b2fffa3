"""Quantized frozen base (``jlora.quant``): formats, layers, adapters on top, loading, merging, bad input.

Tolerances, stated once:
- round trip: per element, nf4 <= 0.1519 x block absmax (half the widest
  codebook gap; + half a scale step with double quantization), int8 <=
  column absmax / 254, fp8 <= 2**-4 relative (+ 2**-10 x absmax/448 for subnormals);
- a quantized tiny Llama with a PEFT adapter against the full-precision PEFT
  model: RMS logit error <= 0.2 (nf4, block 8), 0.03 (int8), 0.15 (fp8) of
  the logits' standard deviation (the base weights here are N(0, 0.25), hidden 16);
- adapters over a quantized base equal the same adapters over its dequantized
  kernels to 1e-4 (nf4, int8: same weights, same math).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from scipy.stats import norm

import jlora
from jlora.quant import (NF4_CODEBOOK, QuantizedLinear, QuantizedLoraLinear, QuantizedWeight, QuantSpec,
                         dequantize_arrays, quantize_array, quantized_matmul)
from jlora.quant._formats import nbytes
from jlora.train import ConfigError, TrainConfig, param_spec
from tests import hf_doubles
from tests.test_peft_io_models import LLAMA_LINEAR, peft_adapter
from tests.test_train_sharding import MESH, path

IDS, _ = hf_doubles.batch()
NF4 = {"block_size": 8}  # hf_doubles' hidden size is 16
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """``(checkpoint dir, PEFT adapter dir, PEFT logits on IDS)`` for a tiny transformers Llama."""
  root = tmp_path_factory.mktemp("quant")
  base = hf_doubles.save("llama", root / "model")
  peft_model = peft_adapter(base, root / "adapter", r=2, lora_alpha=4, target_modules=LLAMA_LINEAR)
  return root / "model", root / "adapter", hf_doubles.logits(peft_model, IDS)


def load(model_dir, fmt=None, **options):
  options = dict(NF4 if fmt == "nf4" else {}, **options)
  return jlora.from_pretrained(model_dir, dtype=jnp.float32, quantize=fmt, quantize_options=options)


def logits(model):
  return np.asarray(model(IDS))


def kernel(shape=(2, 64, 24), seed=0):
  return jax.random.normal(jax.random.key(seed), shape) * 0.05


# ---------------------------------------------------------------- formats


def test_nf4_codebook_is_the_published_table():
  np.testing.assert_array_equal(NF4_CODEBOOK, np.asarray(PUBLISHED_NF4, np.float32))


def test_nf4_codebook_is_the_papers_normal_quantile_construction():
  offset = 0.9677083  # QLoRA: quantiles of N(0, 1) for 8 positive and 7 negative halves, plus 0
  positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
  negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
  values = np.sort(np.concatenate([positive, [0.0], negative]))
  np.testing.assert_allclose(NF4_CODEBOOK, values / values.max(), atol=1e-6)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_round_trip_error_is_under_half_a_codebook_gap(double_quant):
  w = kernel()
  spec = QuantSpec("nf4", 64, 24, block_size=16, double_quant=double_quant)
  err = np.abs(np.asarray(dequantize_arrays(quantize_array(w, spec), spec) - w))
  absmax = np.abs(np.asarray(w)).reshape(2, 4, 16, 24).max(axis=2, keepdims=True)
  scale_slack = absmax.max(axis=1, keepdims=True) / 254 if double_quant else 0.0
  bound = np.diff(NF4_CODEBOOK).max() / 2 * absmax + scale_slack + 1e-7
  assert (err.reshape(2, 4, 16, 24) <= bound).all()


def test_int8_round_trip_error_is_under_half_a_step_per_column():
  w = kernel()
  spec = QuantSpec("int8", 64, 24)
  err = np.abs(np.asarray(dequantize_arrays(quantize_array(w, spec), spec) - w))
  assert (err <= np.abs(np.asarray(w)).max(axis=-2, keepdims=True) / 254 + 1e-7).all()


def test_fp8_round_trip_error_is_under_e4m3_rounding():
  w = kernel()
  spec = QuantSpec("fp8", 64, 24)
  err = np.abs(np.asarray(dequantize_arrays(quantize_array(w, spec), spec) - w))
  step = np.abs(np.asarray(w)).max(axis=-2, keepdims=True) / 448
  assert (err <= 2.0 ** -4 * np.abs(np.asarray(w)) + 2.0 ** -10 * step + 1e-7).all()


def test_nf4_packs_two_codes_per_byte():
  arrays = quantize_array(kernel(), QuantSpec("nf4", 64, 24, block_size=16))
  assert arrays["qkernel"].dtype == jnp.uint8 and arrays["qkernel"].shape == (2, 32, 24)


@pytest.mark.parametrize("fmt, double_quant, bound", [
    ("nf4", False, 0.6), ("nf4", True, 0.53), ("int8", None, 1.05), ("fp8", None, 1.05)])
def test_weight_memory_per_param_is_within_its_bound(fmt, double_quant, bound):
  arrays = quantize_array(kernel((1024, 64)), QuantSpec(fmt, 1024, 64, 64, bool(double_quant)))
  assert nbytes(arrays) / (1024 * 64) <= bound


@pytest.mark.parametrize("fmt, tolerance", [("nf4", 1e-6), ("int8", 1e-6), ("fp8", 0.1)])
def test_matmul_and_its_input_gradient_follow_the_dequantized_kernel(fmt, tolerance):
  spec = QuantSpec(fmt, 64, 24, block_size=16)
  arrays = quantize_array(kernel((64, 24)), spec)
  w = dequantize_arrays(arrays, spec)
  x, probe = jax.random.normal(jax.random.key(1), (3, 64)), jax.random.normal(jax.random.key(2), (3, 24))
  y, pullback = jax.vjp(lambda x: quantized_matmul(x, arrays, spec, jnp.dtype(jnp.float32)), x)
  relative = lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max())
  assert relative(y, x @ w) <= tolerance  # fp8: e4m3 activations; its gradient: e5m2
  assert relative(pullback(probe)[0], probe @ w.T) <= tolerance


# ---------------------------------------------------------------- models and adapters


def test_quantize_swaps_the_linear_layers_but_not_the_output_head(llama):
  model = jlora.quantize(load(llama[0]), "nf4", **NF4)
  assert isinstance(model.model.layers.self_attn.q_proj, QuantizedLinear)
  assert isinstance(model.model.layers.mlp.down_proj, QuantizedLinear)
  assert isinstance(model.lm_head, nnx.Linear)
  assert not nnx.to_flat_state(nnx.state(model.model.layers, nnx.Param).filter(lambda p, _: "q_proj" in p))


def test_quantized_weights_are_frozen_variables_not_params(llama):
  model = load(llama[0], "nf4")
  quantized = nnx.to_flat_state(nnx.state(model, QuantizedWeight))
  assert quantized and all(not isinstance(v, nnx.Param) for _, v in quantized)


def test_loading_quantized_equals_quantizing_the_loaded_model(llama):
  loaded, quantized = load(llama[0], "nf4"), jlora.quantize(load(llama[0]), "nf4", **NF4)
  flat = lambda m: [np.asarray(v[...]) for _, v in nnx.to_flat_state(nnx.state(m, QuantizedWeight))]
  for a, b in zip(flat(loaded), flat(quantized), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fmt, tolerance", [("nf4", 0.2), ("int8", 0.03), ("fp8", 0.15)])
def test_quantized_llama_with_peft_adapter_is_close_to_the_full_model(llama, fmt, tolerance):
  model_dir, adapter_dir, want = llama
  got = logits(jlora.load_peft(load(model_dir, fmt), adapter_dir))
  assert np.sqrt(np.mean((got - want) ** 2)) <= tolerance * want.std()


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_peft_adapter_over_quantized_base_equals_it_over_the_dequantized_kernels(llama, fmt):
  model = jlora.load_peft(load(llama[0], fmt), llama[1])
  assert isinstance(model.model.layers.self_attn.q_proj, QuantizedLoraLinear)
  got = logits(model)
  np.testing.assert_allclose(got, logits(jlora.dequantize(model)), atol=1e-4)


def _adapters_case(model, kind, tmp):
  if kind == "moslora":
    jlora.get_peft_model(model, jlora.MoSLoraConfig(r=2, target_modules=["q_proj", "up_proj"],
                                                    init_lora_weights=False))
  elif kind == "several":
    jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False), "a")
    jlora.add_adapter(model, "b", jlora.LoraConfig(r=3, target_modules=["down_proj", "v_proj"],
                                                    init_lora_weights=False, seed=1))
    jlora.set_adapter(model, ["a", "b"])
  elif kind == "wlora":
    jlora.load_peft(model, tmp, adapter_name="up", activate=False)
    jlora.get_peft_model(model, jlora.WLoraConfig(upstream_loras=("up",)), "w")
  return model


@pytest.mark.parametrize("kind", ["moslora", "several", "wlora"])
def test_adapter_kinds_over_quantized_base_equal_them_over_the_dequantized_kernels(llama, kind):
  model = _adapters_case(load(llama[0], "nf4"), kind, llama[1])
  np.testing.assert_allclose(logits(model), logits(jlora.dequantize(model)), atol=1e-4)


def test_per_sample_adapters_over_quantized_base_route_each_row(llama):
  model = _adapters_case(load(llama[0], "nf4"), "several", llama[1])
  rows = {}
  for name in ("a", "b"):
    jlora.set_adapter(model, name)
    rows[name] = logits(model)
  with jlora.per_sample_adapters(model, ["b", "a"]):
    got = logits(model)
  np.testing.assert_allclose(got, np.stack([rows["b"][0], rows["a"][1]]), atol=1e-5)


def test_gradients_reach_only_the_adapter(llama):
  model = jlora.get_peft_model(load(llama[0], "nf4"), jlora.LoraConfig(
      r=2, target_modules=LLAMA_LINEAR, init_lora_weights=False))
  graphdef, adapter, scales, rest = nnx.split(
      model, jlora.LoraParam, lambda p, v: isinstance(v, QuantizedWeight) and v.dtype == jnp.float32, ...)

  def loss(adapter, scales):
    return jnp.sum(nnx.merge(graphdef, adapter, scales, rest, copy=True)(IDS) ** 2)

  g_adapter, g_scales = jax.grad(loss, argnums=(0, 1))(adapter, scales)
  assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(g_adapter))
  assert jax.tree.leaves(g_scales) and all(not np.asarray(g).any() for g in jax.tree.leaves(g_scales))


def test_training_step_keeps_no_dequantized_copy_of_the_kernels():
  from jlora.models import CausalLM, ModelConfig
  from jlora.train import make_optimizer, make_train_step, split_model
  config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=256, intermediate_size=512,
                       num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                       max_position_embeddings=64, tie_word_embeddings=True, rope=(("rope_theta", 1e4),))
  model = CausalLM(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  bf16_kernel_bytes = 2 * sum(l.kernel.size for _, l in nnx.iter_graph(model) if isinstance(l, nnx.Linear))
  jlora.get_peft_model(jlora.quantize(model, "nf4"), jlora.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
  parts = split_model(model)
  tx = make_optimizer(model, parts.params, learning_rate=1e-3, steps=2, warmup_steps=0, end_lr_ratio=1.0,
                             weight_decay=0.0, b1=0.9, b2=0.99, grad_clip=0.0, grad_accum=1)
  ids = jnp.ones((1, 8), jnp.int32)
  compiled = make_train_step(parts.graphdef, tx).lower(
      parts.params, tx.init(parts.params), parts.rng, parts.frozen,
      dict(tokens=ids, attention_mask=ids, loss_mask=ids)).compile()
  # one layer's dequantized kernels (1/8 of them) may exist at a time, never all of them
  assert compiled.memory_analysis().temp_size_in_bytes < bf16_kernel_bytes / 2


def test_adapter_trained_on_quantized_base_saves_and_loads_as_peft(llama, tmp_path):
  model = jlora.get_peft_model(load(llama[0], "nf4"), jlora.LoraConfig(
      r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
  jlora.save_peft(model, tmp_path / "adapter")
  assert (tmp_path / "adapter" / "adapter_config.json").is_file()
  reloaded = jlora.load_peft(load(llama[0], "nf4"), tmp_path / "adapter")
  np.testing.assert_allclose(logits(reloaded), logits(model), atol=1e-5)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_merge_and_unload_returns_a_full_precision_model_with_the_same_outputs(llama, fmt):
  model = jlora.load_peft(load(llama[0], fmt), llama[1])
  want = logits(model)
  merged = jlora.merge_and_unload(model)
  q_proj = merged.model.layers.self_attn.q_proj
  assert type(q_proj) is nnx.Linear and q_proj.kernel.dtype == jnp.float32
  np.testing.assert_allclose(logits(merged), want, atol=1e-4)


def test_merge_and_unload_can_quantize_again(llama):
  model = jlora.load_peft(load(llama[0], "int8"), llama[1])
  want = logits(model)
  merged = jlora.merge_and_unload(model, requantize=True)
  assert isinstance(merged.model.layers.self_attn.q_proj, QuantizedLinear)
  assert np.sqrt(np.mean((logits(merged) - want) ** 2)) <= 0.03 * want.std()


def test_bf16_base_dequantizes_back_to_bf16(llama):
  model = jlora.quantize(jlora.from_pretrained(llama[0], dtype=jnp.bfloat16), "nf4", **NF4)
  assert jlora.dequantize(model).model.layers.self_attn.q_proj.kernel.dtype == jnp.bfloat16


def test_quantized_kernel_arrays_are_sharded_like_the_kernel():
  for name in ("qkernel", "kernel_scale"):
    spec = param_spec(path("model", "layers", "mlp", "up_proj", name), (2, 16, 32), MESH)
    assert spec == P(None, "fsdp", "tensor")
  under_lora = path("model", "layers", "self_attn", "o_proj", "base_layer", "qkernel")
  assert param_spec(under_lora, (2, 32, 16), MESH) == P(None, ("tensor", "fsdp"), None)


# ---------------------------------------------------------------- bad input


def test_unknown_format_is_refused(llama):
  with pytest.raises(ValueError, match=r"Unknown quantization format 'int4'; use one of 'nf4', 'int8', 'fp8'"):
    jlora.quantize(load(llama[0]), "int4")
  with pytest.raises(ValueError, match=r"Unknown quantization format 'int4'"):
    jlora.from_pretrained(llama[0], quantize="int4")


def test_unknown_quantize_options_are_named_with_the_valid_ones(llama):
  with pytest.raises(ValueError, match=r"Unknown quantize_options \['bogus'\]; the options are "
                                       r"'block_size', 'double_quant', 'targets'"):
    jlora.from_pretrained(llama[0], quantize="nf4", quantize_options={"bogus": 1})


def test_quantize_options_without_a_format_are_refused(llama):
  with pytest.raises(ValueError, match=r"quantize_options need quantize=.*'nf4'"):
    jlora.from_pretrained(llama[0], quantize_options={"block_size": 16})


def test_block_size_that_does_not_divide_a_layer_is_refused_before_any_change(llama):
  model = load(llama[0])
  with pytest.raises(ValueError, match=r"down_proj: block_size=16 does not divide its input dimension 24; "
                                       r"pick a block_size that divides it \(e\.g\. 12\)"):
    jlora.quantize(model, "nf4", block_size=16)
  assert isinstance(model.model.layers.self_attn.q_proj, nnx.Linear)


def test_quantizing_a_model_with_merged_adapters_is_refused(llama):
  model = jlora.load_peft(load(llama[0]), llama[1])
  jlora.merge_adapter(model)
  with pytest.raises(ValueError, match=r"merged adapters .*jlora.unmerge_adapter"):
    jlora.quantize(model, "nf4", **NF4)


def test_merging_in_place_into_a_quantized_kernel_points_to_merge_and_unload(llama):
  model = jlora.load_peft(load(llama[0], "nf4"), llama[1])
  with pytest.raises(ValueError, match=r"quantized \(nf4\) base kernel.*jlora.merge_and_unload"):
    jlora.merge_adapter(model)


def test_double_quant_for_a_per_channel_format_is_refused(llama):
  with pytest.raises(ValueError, match=r"double_quant applies to nf4 only"):
    jlora.quantize(load(llama[0]), "int8", double_quant=True)


def test_quantizing_twice_says_to_dequantize_first(llama):
  with pytest.raises(ValueError, match=r"already quantized; call jlora.dequantize\(model\) first"):
    jlora.quantize(load(llama[0], "nf4"), "int8")


def test_train_config_refuses_an_unknown_quantize_format():
  with pytest.raises(ConfigError, match=r"model.quantize"):
    TrainConfig().replace(**{"model.quantize": "int4"})


def test_save_pretrained_of_a_quantized_model_says_to_dequantize(llama, tmp_path):
  with pytest.raises(ValueError, match=r"quantized; call jlora.dequantize\(model\)"):
    jlora.save_pretrained(load(llama[0], "nf4"), tmp_path / "out")
  assert not (tmp_path / "out" / "model.safetensors").exists()

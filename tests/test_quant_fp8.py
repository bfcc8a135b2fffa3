"""fp8 bases: one input cast for sibling projections, the backward choice, an fp8 output head.

Tolerances, stated once (relative = max abs error / max abs of the exact value):
- a group of kernels sharing one cast gives the same outputs as separate calls
  (same cast, same scales): 1e-6; its input gradient is within 0.1 of the
  exact ``sum_i dy_i @ W_iᵀ`` (e5m2: 2**-3 per product, one row scale for the
  group), the ``"upcast"`` backward within 1e-5 (only the kernel's own rounding,
  which the exact value here includes);
- a tiny Llama with the shared cast against separate casts: logits 1e-5,
  adapter gradients 0.1; with an fp8 output head against the
  full-precision PEFT model: RMS logit error <= 0.15 of the logits' std, as the
  other fp8 layers (``tests/test_quant.py``).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from jlora.models import CausalLM, ModelConfig
from jlora.quant import QuantizedLinear, QuantizedWeight, QuantSpec, fp8_matmuls, quantize_array, set_fp8_matmul
from jlora.quant import dequantize_arrays, quantized_matmul
from jlora.quant._fp8 import E5M2_MAX, to_fp8
from tests.test_peft_io_models import LLAMA_LINEAR
from tests.test_quant import llama, load, logits  # noqa: F401  (llama is a fixture)

WIDTHS = (24, 8, 8)
F32 = jnp.dtype(jnp.float32)


def relative(a, b):
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def group(seed=0, n_in=64):
  """Three fp8 kernels of one input: ``(arrays per kernel, dequantized kernels)``."""
  arrays, dense = [], []
  for i, width in enumerate(WIDTHS):
    spec = QuantSpec("fp8", n_in, width)
    a = quantize_array(jax.random.normal(jax.random.key(seed + i), (n_in, width)) * 0.05, spec)
    arrays.append(a)
    dense.append(dequantize_arrays(a, spec))
  return arrays, dense


def inputs(n_in=64):
  x = jax.random.normal(jax.random.key(10), (2, 3, n_in))
  probes = tuple(jax.random.normal(jax.random.key(11 + i), (2, 3, w)) for i, w in enumerate(WIDTHS))
  return x, probes


def tiny_llama(seed=0):
  config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=16, tie_word_embeddings=False, rope=(("rope_theta", 1e4),))
  return CausalLM(config, rngs=nnx.Rngs(seed))


def adapted_fp8_llama(shared=True, **quantize):
  model = jlora.quantize(tiny_llama(), "fp8", **quantize)
  jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=LLAMA_LINEAR, init_lora_weights=False))
  return set_fp8_matmul(model, shared_input=shared)


IDS = jax.random.randint(jax.random.key(3), (2, 8), 0, 64)


# ---------------------------------------------------------------- the matmul


def test_a_shared_cast_gives_the_outputs_of_separate_calls():
  arrays, _ = group()
  x, _ = inputs()
  together = fp8_matmuls(x, tuple((a["qkernel"], a["kernel_scale"]) for a in arrays), F32)
  for a, y, width in zip(arrays, together, WIDTHS):
    assert relative(y, quantized_matmul(x, a, QuantSpec("fp8", 64, width), F32)) <= 1e-6


@pytest.mark.parametrize("backward, tolerance", [("fp8", 0.1), ("upcast", 1e-5)])
def test_the_input_gradient_of_a_group_sums_every_kernels_part(backward, tolerance):
  arrays, dense = group()
  x, probes = inputs()
  kernels = tuple((a["qkernel"], a["kernel_scale"]) for a in arrays)
  _, pullback = jax.vjp(lambda x: fp8_matmuls(x, kernels, F32, backward), x)
  exact = sum(p @ w.T for p, w in zip(probes, dense))
  assert relative(pullback(probes)[0], exact) <= tolerance


def test_one_e5m2_row_scale_keeps_a_much_smaller_segment_to_its_relative_precision():
  # a group's gradient row [dy_q | dy_k]: dy_k 1e4 times smaller than dy_q, one scale for the row
  big, small = jax.random.normal(jax.random.key(0), (4, 32)), jax.random.normal(jax.random.key(1), (4, 8)) * 1e-4
  codes, scale = to_fp8(jnp.concatenate([big, small], -1), jnp.float8_e5m2, E5M2_MAX)
  back = codes.astype(jnp.float32)[:, 32:] * scale
  assert (jnp.abs(back - small) <= 2.0 ** -3 * jnp.abs(small)).all()


# ---------------------------------------------------------------- in a model


def _jaxpr(model) -> str:
  """The forward pass's jaxpr as text (the scanned layer body appears once)."""
  graphdef, state = nnx.split(model)
  return str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s, copy=True)(IDS))(state))


def _e4m3_casts(model) -> int:
  return len(re.findall(r"new_dtype=float8_e4m3fn", _jaxpr(model)))


def test_sibling_projections_cast_their_input_once():
  # per layer: q|k|v, o, gate|up, down share 4 casts; cast separately, 7
  assert _e4m3_casts(adapted_fp8_llama(shared=True)) == 4
  assert _e4m3_casts(adapted_fp8_llama(shared=False)) == 7


def test_shared_cast_logits_equal_separate_casts():
  np.testing.assert_allclose(np.asarray(adapted_fp8_llama(True)(IDS)), np.asarray(adapted_fp8_llama(False)(IDS)),
                             rtol=1e-5, atol=1e-5)


def _grads(model):
  graphdef, adapter, scales, rest = nnx.split(
      model, jlora.LoraParam, lambda p, v: isinstance(v, QuantizedWeight) and v.dtype == jnp.float32, ...)

  def loss(adapter, scales):
    return jnp.sum(nnx.merge(graphdef, adapter, scales, rest, copy=True)(IDS) ** 2)

  return jax.grad(loss, argnums=(0, 1))(adapter, scales)


def test_gradients_reach_only_the_adapter_through_a_shared_cast():
  (g_adapter, g_scales), (want, _) = _grads(adapted_fp8_llama(True)), _grads(adapted_fp8_llama(False))
  assert jax.tree.leaves(g_scales) and all(not np.asarray(g).any() for g in jax.tree.leaves(g_scales))
  for got, exact in zip(jax.tree.leaves(g_adapter), jax.tree.leaves(want), strict=True):
    assert np.abs(np.asarray(got)).max() > 0 and relative(got, exact) <= 0.1


def test_one_layer_without_shared_input_makes_its_group_cast_separately():
  model = adapted_fp8_llama(True)
  model.model.layers.self_attn.k_proj.base_layer.shared_input = False
  assert _e4m3_casts(model) == 6


def test_set_fp8_matmul_refuses_an_unknown_backward():
  with pytest.raises(ValueError, match=r"Unknown fp8 backward 'e4m3'; use 'fp8' .* or 'upcast'"):
    set_fp8_matmul(tiny_llama(), backward="e4m3")


# ---------------------------------------------------------------- an fp8 output head


def test_fp8_output_head_keeps_logits_close(llama):  # noqa: F811
  model_dir, adapter_dir, want = llama
  model = jlora.quantize(load(model_dir), "fp8", targets=LLAMA_LINEAR + ["lm_head"])
  assert isinstance(model.lm_head, QuantizedLinear)
  got = logits(jlora.load_peft(model, adapter_dir))
  assert np.sqrt(np.mean((got - want) ** 2)) <= 0.15 * want.std()


# ---------------------------------------------------------------- adapters inside the fp8 matmul


def _several(model):
  jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["v_proj", "gate_proj"], init_lora_weights=False),
                       "a")
  jlora.add_adapter(model, "b", jlora.MoSLoraConfig(r=3, target_modules=["v_proj", "down_proj"],
                                                    init_lora_weights=False, seed=1))
  jlora.set_adapter(model, ["a", "b"])
  return model


@pytest.mark.parametrize("adapters", ["lora", "several"])
def test_adapters_inside_the_fp8_matmul_match_plain_autodiff(adapters):
  def build(fused):
    if adapters == "lora":
      model = adapted_fp8_llama()
    else:  # LoRA and MoSLoRA on v_proj, one of them on gate_proj / down_proj; q, k, up bare
      model = _several(jlora.quantize(tiny_llama(), "fp8"))
    return set_fp8_matmul(model, fused_lora=fused)

  fused, plain = build(True), build(False)
  calls = 4 if adapters == "lora" else 3  # q|k|v, o (without an adapter in "several"), gate|up, down
  assert _jaxpr(fused).count("name=fp8_lora_matmuls") == calls and "fp8_lora_matmuls" not in _jaxpr(plain)
  np.testing.assert_allclose(np.asarray(fused(IDS)), np.asarray(plain(IDS)), rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(_grads(fused)[0]), jax.tree.leaves(_grads(plain)[0]), strict=True):
    assert relative(got, want) <= 1e-4


def test_disabled_adapters_inside_the_fp8_matmul_give_the_base_model():
  model = adapted_fp8_llama()
  with jlora.disable_adapters(model):
    got = np.asarray(model(IDS))
  base = set_fp8_matmul(jlora.quantize(tiny_llama(), "fp8"))
  np.testing.assert_allclose(got, np.asarray(base(IDS)), rtol=1e-5, atol=1e-5)

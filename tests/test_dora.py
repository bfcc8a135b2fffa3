"""DoRA (``use_dora=True``) with PEFT as the oracle: magnitudes at init, outputs, gradients,
merge / unmerge, checkpoints both ways, and the option combinations PEFT refuses."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from flax import nnx

import jlora
import torch_oracle as oracle
from jlora import testing
from tests import hf_doubles

MODULES = ("lin", "emb", "conv")
TOL = 1e-5
IDS, _ = hf_doubles.batch()
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dora_kwargs(**extra):
  return dict(r=2, lora_alpha=4, target_modules=list(MODULES), use_dora=True, **extra)


def copy_magnitudes(root, model, adapter="default"):
  for name in MODULES:
    m = oracle.to_np(root.get_submodule(name).lora_magnitude_vector[adapter].weight).reshape(-1)
    getattr(model, name).adapters[adapter].lora_magnitude_vector[...] = m


def twins(**extra):
  """PEFT and jlora with the same base, random factors and random magnitudes."""
  root, model = oracle.twins({"default": dora_kwargs(**extra)})
  copy_magnitudes(root, model)
  return root, model


@pytest.mark.parametrize("module", MODULES)
def test_magnitude_starts_at_peft_column_norms(module):
  torch_model = oracle.TorchTiny(0)
  model = oracle.NnxTiny.from_torch(torch_model)
  root = oracle.peft_model(torch_model, **dora_kwargs()).base_model
  jlora.get_peft_model(model, jlora.LoraConfig(**dora_kwargs()))
  want = oracle.to_np(root.get_submodule(module).lora_magnitude_vector["default"].weight).reshape(-1)
  got = getattr(model, module).adapters["default"].lora_magnitude_vector[...]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


@pytest.mark.parametrize("module", MODULES)
def test_outputs_match_peft(module):
  root, model = twins()
  expected, got = oracle.outputs(root, model, module)
  np.testing.assert_allclose(got, expected, atol=TOL)


def test_gradients_match_peft_with_the_norm_detached():
  root, model = twins()
  oracle.torch_squared_loss(root, MODULES).backward()
  graphdef, params, rest = nnx.split(model, jlora.LoraParam, ...)
  grads = jax.grad(lambda p: oracle.jax_squared_loss(nnx.merge(graphdef, p, rest, copy=True), MODULES))(params)
  for name in MODULES:
    layer = root.get_submodule(name)
    got = grads[name]["adapters"]["default"]
    want_m = oracle.to_np(layer.lora_magnitude_vector["default"].weight.grad).reshape(-1)
    np.testing.assert_allclose(np.asarray(got["lora_magnitude_vector"][...]), want_m, atol=1e-5)
    if name == "lin":
      want_b = oracle.to_np(layer.lora_B["default"].weight.grad).T
      np.testing.assert_allclose(np.asarray(got["lora_B"][...]), want_b, atol=1e-5)
      assert np.abs(want_m).max() > 1e-3  # the magnitude does get a gradient


def test_training_moves_the_magnitude():
  _, model = twins()
  before = np.asarray(model.lin.adapters["default"].lora_magnitude_vector[...])
  graphdef, params, rest = nnx.split(model, jlora.LoraParam, ...)
  tx = jlora.adapter_optimizer(model, optax.sgd(0.1))
  grads = jax.grad(lambda p: oracle.jax_squared_loss(nnx.merge(graphdef, p, rest, copy=True), MODULES))(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  nnx.update(model, optax.apply_updates(params, updates))
  assert np.abs(np.asarray(model.lin.adapters["default"].lora_magnitude_vector[...]) - before).max() > 1e-4


@pytest.mark.parametrize("module", MODULES)
def test_merged_kernel_matches_peft_merge(module):
  root, model = twins()
  root.get_submodule(module).merge(["default"])
  getattr(model, module).merge(["default"])
  want = oracle.to_np(root.get_submodule(module).base_layer.weight)
  want = {"lin": want.T, "emb": want, "conv": want.transpose(2, 3, 1, 0) if want.ndim == 4 else want}[module]
  np.testing.assert_allclose(np.asarray(getattr(model, module).kernel()[...]), want, atol=TOL)


@pytest.mark.parametrize("module", MODULES)
def test_merge_keeps_outputs_and_unmerge_restores_the_base(module):
  _, model = twins()
  x = {"lin": np.ones((2, oracle.IN), np.float32), "emb": np.array([[1, 2, 3]]),
       "conv": np.ones((1, 7, 7, oracle.CHANNELS), np.float32)}[module]
  layer = getattr(model, module)
  base = np.asarray(layer.kernel()[...])
  want = np.asarray(layer(x))
  jlora.merge_adapter(model)
  np.testing.assert_allclose(np.asarray(layer(x)), want, atol=TOL)
  jlora.unmerge_adapter(model)
  np.testing.assert_allclose(np.asarray(layer.kernel()[...]), base, atol=TOL)
  np.testing.assert_allclose(np.asarray(layer(x)), want, atol=TOL)


def test_lora_and_dora_adapters_merge_in_turn_and_unmerge_back():
  _, model = twins()
  jlora.add_adapter(model, "plain", jlora.LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
  x = np.ones((2, oracle.IN), np.float32)
  base = np.asarray(model.lin.kernel()[...])
  jlora.merge_adapter(model, ["plain", "default"])
  jlora.unmerge_adapter(model)
  np.testing.assert_allclose(np.asarray(model.lin.kernel()[...]), base, atol=TOL)


def test_pure_unmerge_of_dora_is_refused():
  _, model = twins()
  graphdef, adapter, base = nnx.split(model, jlora.LoraParam, ...)
  with pytest.raises(ValueError, match="pure unmerge cannot take a DoRA adapter out"):
    jlora.unmerge(graphdef, base, adapter)


# ---- checkpoints (PEFT's format: lora_magnitude_vector) on a real tiny model -----------------


def peft_dora(base, out):
  model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
      r=2, lora_alpha=4, target_modules=LLAMA_LINEAR + ["embed_tokens"], use_dora=True))
  oracle.randomize_peft(model, scale=0.2)
  with torch.no_grad():  # magnitudes near the column norms, as after training
    for name, p in model.named_parameters():
      if "lora_magnitude_vector" in name:
        p.abs_().add_(1.0)
  model.save_pretrained(out)
  return model.eval()


def test_peft_dora_adapter_loads_with_peft_logits(llama, tmp_path):
  path, base = llama
  peft_model = peft_dora(base, tmp_path / "a")
  model = jlora.load_peft(jlora.from_pretrained(path, dtype=jnp.float32), tmp_path / "a")
  np.testing.assert_allclose(np.asarray(model(IDS)), hf_doubles.logits(peft_model, IDS), atol=1e-4)


def test_dora_round_trips_through_peft(llama, tmp_path):
  path, base = llama
  peft_dora(base, tmp_path / "a")
  model = jlora.load_peft(jlora.from_pretrained(path, dtype=jnp.float32), tmp_path / "a")
  jlora.save_peft(model, tmp_path / "b")
  again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b")
  np.testing.assert_allclose(hf_doubles.logits(again, IDS), np.asarray(model(IDS)), atol=1e-4)


def test_dora_merge_and_unload_matches_peft(llama, tmp_path):
  path, base = llama
  peft_model = peft_dora(base, tmp_path / "a")
  model = jlora.load_peft(jlora.from_pretrained(path, dtype=jnp.float32), tmp_path / "a")
  merged = jlora.merge_and_unload(model)
  want = hf_doubles.logits(peft_model.merge_and_unload(), IDS)
  np.testing.assert_allclose(np.asarray(merged(IDS)), want, atol=1e-4)


# ---- option combinations PEFT refuses -------------------------------------------------------


def test_dora_with_moslora_is_refused():
  with pytest.raises(ValueError, match="MoSLoRA with use_dora=True is not supported"):
    jlora.MoSLoraConfig(r=2, target_modules=["lin"], use_dora=True)


def test_dora_on_a_layer_type_without_dora_is_refused():
  model = jlora.testing.TinyLM()
  model.lm_head = nnx.LinearGeneral(8, (2, 4), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="DoRA applies to Linear, Embed and Conv layers"):
    jlora.get_peft_model(model, jlora.LoraConfig(target_modules=["lm_head"], use_dora=True))


def test_per_sample_routing_of_dora_is_refused():
  _, model = twins()
  with pytest.raises(ValueError, match="cannot route DoRA adapters"):
    with jlora.per_sample_adapters(model, ["default", "__base__"]):
      pass


def test_weighted_combination_of_dora_is_refused():
  _, model = twins()
  with pytest.raises(ValueError, match="are DoRA adapters"):
    jlora.add_weighted_adapter(model, ["default"], [1.0], "mix", combination_type="cat")


def test_wlora_over_dora_upstreams_is_refused():
  _, model = twins()
  with pytest.raises(ValueError, match="not WLoRA or DoRA"):
    jlora.add_adapter(model, "w", jlora.WLoraConfig(upstream_loras=["default"]))


def test_train_config_builds_a_dora_adapter():
  from jlora.train import ConfigError, load_config
  assert load_config(None, ["adapter.use_dora=true"]).adapter.use_dora
  with pytest.raises(ConfigError, match="adapter \\(kind moslora\\): MoSLoRA with use_dora=True is not supported"):
    load_config(None, ["adapter.use_dora=true", "adapter.kind=moslora"])


@pytest.mark.parametrize("mode", ["auto", "fused"])
def test_fused_lora_matmul_modes_leave_dora_exact(mode):
  root, model = twins()
  jlora.nn.set_lora_matmul(model, mode)
  expected, got = oracle.outputs(root, model, "lin")
  np.testing.assert_allclose(got, expected, atol=TOL)


# ---- under a quantized base: the column norm is over the dequantized kernel, as in PEFT --------------

@pytest.mark.parametrize("fmt,options", [("int8", {}), ("fp8", {})])
def test_dora_on_a_quantized_base_matches_the_float_model_up_to_the_rounding(fmt, options):
  ids = testing.token_ids()
  model = testing.TinyLM()
  plain = np.asarray(model(ids))
  jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True))
  testing.randomize_adapters(model, scale=0.5)
  adapted = np.asarray(model(ids))
  rounding = np.abs(np.asarray(jlora.quantize(testing.TinyLM(), fmt, **options)(ids)) - plain).max()
  jlora.quantize(model, fmt, **options)
  quantized = np.asarray(model(ids))
  assert np.abs(adapted - plain).max() > 10 * rounding  # the DoRA effect is far above the rounding
  np.testing.assert_allclose(quantized, adapted, atol=3 * rounding + 1e-6)


@pytest.mark.parametrize("fmt,options", [("int8", {}), ("nf4", {"block_size": 4})])
def test_dora_on_a_quantized_base_equals_dora_on_its_dequantized_kernel(fmt, options):
  """PEFT's rule: the magnitude's column norm is taken over the dequantized weight.

  (int8 and nf4 dequantize inside the matmul, so the two agree to float error; fp8 also rounds the
  activations, which the test above bounds.)
  """
  ids = testing.token_ids()
  model = testing.TinyLM()
  jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True))
  testing.randomize_adapters(model, scale=0.5)
  jlora.quantize(model, fmt, **options)
  quantized = np.asarray(model(ids))
  jlora.dequantize(model)
  np.testing.assert_allclose(quantized, np.asarray(model(ids)), atol=1e-4)

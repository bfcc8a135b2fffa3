"""Layer-level parity with PEFT (PyTorch, CPU, fp32): same base weights and factors, same outputs.

PEFT is the specification: each test builds a tiny torch module wrapped by
``peft.get_peft_model`` and its NNX twin wrapped by ``jlora.get_peft_model``,
copies PEFT's (random, nonzero) factors into jlora, and compares outputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import jlora
import torch_oracle as oracle

TOL = 1e-5
MODULES = ("lin", "emb", "conv")


def assert_outputs_match(root, model, modules=MODULES):
  for module in modules:
    expected, got = oracle.outputs(root, model, module)
    assert got.shape == expected.shape, module
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0, err_msg=module)


def lora(r=2, lora_alpha=2, **kwargs):
  return dict(r=r, lora_alpha=lora_alpha, target_modules=list(MODULES), **kwargs)


@pytest.mark.parametrize("module", MODULES)
def test_plain_lora_matches_peft(module):
  root, model = oracle.twins({"default": lora(r=3, lora_alpha=3)})
  assert_outputs_match(root, model, [module])


@pytest.mark.parametrize("module", MODULES)
def test_alpha_different_from_r_matches_peft(module):
  root, model = oracle.twins({"default": lora(r=2, lora_alpha=5)})
  assert_outputs_match(root, model, [module])


@pytest.mark.parametrize("module", MODULES)
def test_rslora_matches_peft(module):
  root, model = oracle.twins({"default": lora(r=4, lora_alpha=3, use_rslora=True)})
  assert_outputs_match(root, model, [module])


def test_rslora_scaling_is_alpha_over_sqrt_r_in_both():
  root, model = oracle.twins({"default": lora(r=4, lora_alpha=3, use_rslora=True)})
  assert root.lin.scaling["default"] == pytest.approx(3 / math.sqrt(4))
  assert float(model.lin.adapters["default"].scaling[...]) == pytest.approx(3 / math.sqrt(4))


@pytest.mark.parametrize("module", MODULES)
def test_two_active_adapters_match_peft(module):
  root, model = oracle.twins({"one": lora(r=2, lora_alpha=4), "two": lora(r=3, lora_alpha=1, use_rslora=True)},
                      active=["one", "two"])
  assert_outputs_match(root, model, [module])


def test_the_adapters_change_the_output():
  """Guards the parity tests above against comparing two base models."""
  root, model = oracle.twins({"default": lora()})
  expected, _ = oracle.outputs(root, model, "lin")
  with jlora.disable_adapters(model):
    _, base = oracle.outputs(root, model, "lin")
  assert np.abs(expected - base).max() > 1e-2


@pytest.mark.parametrize("module", MODULES)
def test_delta_weight_matches_peft_get_delta_weight(module):
  root, model = oracle.twins({"default": lora(r=2, lora_alpha=3)})
  expected = oracle.peft_delta_in_flax_layout(root.get_submodule(module), "default")
  got = np.asarray(getattr(model, module).delta_weight("default"))
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


# ---- default initialisation ------------------------------------------------

def fresh(init_lora_weights=True, r=4):
  torch_model = oracle.TorchTiny()
  model = oracle.NnxTiny.from_torch(torch_model)
  jlora.get_peft_model(model, jlora.LoraConfig(
      r=r, lora_alpha=r, target_modules=list(MODULES), init_lora_weights=init_lora_weights))
  return torch_model, model


@pytest.mark.parametrize("module", MODULES)
def test_default_init_output_equals_the_base_output_exactly(module):
  torch_model, model = fresh()
  expected, got = oracle.outputs(torch_model, model, module)
  with jlora.disable_adapters(model):
    _, base = oracle.outputs(torch_model, model, module)
  np.testing.assert_array_equal(got, base)
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def big_linear_factors(init_lora_weights, fan_in=256, r=64):
  """jlora's and PEFT's fresh A (Flax layout) for an nn.Linear/nnx.Linear of ``fan_in`` inputs."""
  import torch
  from flax import nnx

  class Big(nnx.Module):
    def __init__(self):
      self.lin = nnx.Linear(fan_in, 8, rngs=nnx.Rngs(0))

  model = jlora.get_peft_model(Big(), jlora.LoraConfig(
      r=r, target_modules=["lin"], init_lora_weights=init_lora_weights))
  torch.manual_seed(0)
  pm = oracle.peft_model(torch.nn.Sequential(torch.nn.Linear(fan_in, 8)), r=r, target_modules=["0"],
                         init_lora_weights=init_lora_weights)
  peft_a, peft_b = oracle.flax_factors(pm.base_model.model[0], "default")
  adapter = model.lin.adapters["default"]
  return (np.asarray(adapter.lora_A[...]), np.asarray(adapter.lora_B[...])), (peft_a, peft_b)


def test_default_init_a_is_kaiming_uniform_like_peft():
  (a, b), (peft_a, peft_b) = big_linear_factors(True)
  bound = 1 / math.sqrt(256)
  assert np.abs(a).max() <= bound and np.abs(peft_a).max() <= bound
  assert np.abs(a).max() > 0.98 * bound  # fills the interval, not a narrower one
  # U(-b, b) has std b/sqrt(3); 16384 draws pin it to well under 2 %.
  np.testing.assert_allclose(a.std(), peft_a.std(), rtol=0.02)
  np.testing.assert_allclose(a.std(), bound / math.sqrt(3), rtol=0.02)
  assert abs(a.mean()) < 0.02 * bound
  np.testing.assert_array_equal(b, 0)
  np.testing.assert_array_equal(peft_b, 0)


def test_gaussian_init_a_has_peft_std_one_over_r():
  (a, b), (peft_a, _) = big_linear_factors("gaussian", r=16)
  np.testing.assert_allclose(a.std(), 1 / 16, rtol=0.03)
  np.testing.assert_allclose(a.std(), peft_a.std(), rtol=0.04)
  np.testing.assert_array_equal(b, 0)


def test_embedding_init_is_reversed_zero_a_and_standard_normal_b():
  _, model = fresh(r=64)
  adapter = model.emb.adapters["default"]
  np.testing.assert_array_equal(adapter.lora_A[...], 0)
  b = np.asarray(adapter.lora_B[...])  # [64, 4]: 256 draws
  assert abs(b.std() - 1.0) < 0.15 and abs(b.mean()) < 0.2


def test_conv_init_a_bound_uses_the_whole_window_as_fan_in():
  _, model = fresh(r=64)
  a = np.asarray(model.conv.adapters["default"].lora_A[...])  # [3, 3, 3, 64]
  bound = 1 / math.sqrt(3 * 3 * oracle.CHANNELS)
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound


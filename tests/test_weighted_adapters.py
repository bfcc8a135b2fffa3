"""``add_weighted_adapter`` against PEFT's ``LoraModel.add_weighted_adapter`` on the same adapters.

Two adapters with random factors on a Linear and an Embedding, built in both
frameworks; the combined adapter must have PEFT's factors (``linear``, ``cat``,
``ties``) or PEFT's update (``svd``, unique only as the product A·B).
"""

from __future__ import annotations

import numpy as np
import pytest

import jlora
import torch_oracle as oracle

TOL = 1e-5
MODULES = ("lin", "emb")
WEIGHTS = ([0.7, -0.3], [2.0, 0.5])


def pair(rank_two: int = 2):
  """PEFT and jlora twins holding adapters "one" (r=2, alpha=4) and "two" (r=rank_two, alpha=1)."""
  return oracle.twins({
      "one": dict(r=2, lora_alpha=4, target_modules=list(MODULES)),
      "two": dict(r=rank_two, lora_alpha=1, target_modules=list(MODULES)),
  })


def combine(root, model, weights, combination_type, rank_two=2, **kwargs):
  root.add_weighted_adapter(["one", "two"], weights, "mix", combination_type=combination_type, **kwargs)
  jlora.add_weighted_adapter(model, ["one", "two"], weights, "mix", combination_type=combination_type,
                             **kwargs)
  root.set_adapter("mix")
  jlora.set_adapter(model, "mix")


def assert_same_factors(root, model):
  for module in MODULES:
    want_a, want_b = oracle.flax_factors(root.get_submodule(module), "mix")
    adapter = getattr(model, module).adapters["mix"]
    np.testing.assert_allclose(adapter.lora_A[...], want_a, atol=TOL, rtol=0, err_msg=module)
    np.testing.assert_allclose(adapter.lora_B[...], want_b, atol=TOL, rtol=0, err_msg=module)


def assert_same_outputs(root, model, atol=TOL):
  for module in MODULES:
    expected, got = oracle.outputs(root, model, module)
    np.testing.assert_allclose(got, expected, atol=atol, rtol=0, err_msg=module)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_linear_factors_match_peft(weights):
  root, model = pair()
  combine(root, model, weights, "linear")
  assert_same_factors(root, model)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_linear_outputs_match_peft(weights):
  root, model = pair()
  combine(root, model, weights, "linear")
  assert_same_outputs(root, model)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_cat_of_different_ranks_matches_peft(weights):
  root, model = pair(rank_two=3)
  combine(root, model, weights, "cat")
  assert model.lin.adapters["mix"].rank == 5
  assert_same_factors(root, model)
  assert_same_outputs(root, model)


def test_cat_delta_is_exactly_the_weighted_sum_of_deltas():
  root, model = pair(rank_two=3)
  combine(root, model, [0.7, -0.3], "cat")
  for module in MODULES:
    layer = getattr(model, module)
    want = 0.7 * layer.delta_weight("one") - 0.3 * layer.delta_weight("two")
    np.testing.assert_allclose(layer.delta_weight("mix"), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_svd_update_matches_peft(weights):
  """SVD factors are unique only up to signs, so compare the update A·B (loosely: two SVD solvers)."""
  root, model = pair(rank_two=3)
  combine(root, model, weights, "svd")
  for module in MODULES:
    want = oracle.peft_delta_in_flax_layout(root.get_submodule(module), "mix")
    got = np.asarray(getattr(model, module).delta_weight("mix"))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=module)
  assert_same_outputs(root, model, atol=1e-4)


def test_svd_is_the_best_rank_k_approximation_of_the_weighted_sum():
  root, model = pair(rank_two=3)
  jlora.add_weighted_adapter(model, ["one", "two"], [0.7, -0.3], "mix", "svd", svd_rank=2)
  for module in MODULES:
    layer = getattr(model, module)
    full = np.asarray(0.7 * layer.delta_weight("one") - 0.3 * layer.delta_weight("two"), np.float64)
    u, s, vh = np.linalg.svd(full, full_matrices=False)
    want = (u[:, :2] * s[:2]) @ vh[:2]
    np.testing.assert_allclose(layer.delta_weight("mix"), want, atol=1e-5, rtol=0)
    assert layer.adapters["mix"].rank == 2


@pytest.mark.parametrize("majority_sign_method", ["total", "frequency"])
def test_ties_factors_match_peft(majority_sign_method):
  root, model = pair()
  combine(root, model, [0.7, -0.3], "ties", density=0.5, majority_sign_method=majority_sign_method)
  assert_same_factors(root, model)
  assert_same_outputs(root, model)


def test_ties_prunes_to_the_density():
  _, model = pair()
  jlora.add_weighted_adapter(model, ["one", "two"], [1.0, 1.0], "mix", "ties", density=0.25)
  a = np.asarray(model.lin.adapters["mix"].lora_A[...])  # [6, 2]: each input keeps 3 of 12
  assert 0 < np.count_nonzero(a) <= 6


def test_combined_adapter_is_added_inactive_with_scaling_one():
  _, model = pair()
  jlora.add_weighted_adapter(model, ["one", "two"], [0.7, -0.3], "mix", "linear")
  assert jlora.active_adapters(model) == ("one",)
  assert float(model.lin.adapters["mix"].scaling[...]) == 1.0
  config = jlora.peft_config(model)["mix"]
  assert config.r == config.lora_alpha == 2
  assert set(config.target_modules) == set(MODULES)


# ---- errors ----------------------------------------------------------------

def test_unknown_combination_type_is_an_error():
  _, model = pair()
  with pytest.raises(ValueError, match=r"Unknown combination_type 'dare'.*linear"):
    jlora.add_weighted_adapter(model, ["one", "two"], [1.0, 1.0], "mix", "dare")


def test_linear_of_different_ranks_is_an_error_that_suggests_cat_or_svd():
  _, model = pair(rank_two=3)
  with pytest.raises(ValueError, match=r"one rank.*'cat' or 'svd'"):
    jlora.add_weighted_adapter(model, ["one", "two"], [1.0, 1.0], "mix", "linear")


def test_unknown_adapter_is_an_error_naming_it():
  _, model = pair()
  with pytest.raises(ValueError, match=r"Unknown adapter\(s\) \['three'\]"):
    jlora.add_weighted_adapter(model, ["one", "three"], [1.0, 1.0], "mix", "cat")


def test_existing_new_name_is_an_error():
  _, model = pair()
  with pytest.raises(ValueError, match="already has an adapter named 'two'"):
    jlora.add_weighted_adapter(model, ["one", "two"], [1.0, 1.0], "two", "cat")


def test_weight_count_mismatch_is_an_error():
  _, model = pair()
  with pytest.raises(ValueError, match="one weight per adapter"):
    jlora.add_weighted_adapter(model, ["one", "two"], [1.0], "mix", "cat")


def test_ties_without_density_is_an_error():
  _, model = pair()
  with pytest.raises(ValueError, match="density"):
    jlora.add_weighted_adapter(model, ["one", "two"], [1.0, 1.0], "mix", "ties")


def test_a_failed_combination_leaves_the_model_unchanged():
  _, model = pair(rank_two=3)
  with pytest.raises(ValueError):
    jlora.add_weighted_adapter(model, ["one", "two"], [1.0, 1.0], "mix", "linear")
  assert "mix" not in jlora.peft_config(model)
  assert "mix" not in model.lin.adapters

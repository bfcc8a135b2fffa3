"""The pruning ``add_weighted_adapter`` methods against PEFT: ``magnitude_prune``, ``dare_linear``,
``dare_ties`` and the ``_svd`` variants (``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
``magnitude_prune_svd``).

Magnitude pruning and TIES are deterministic and compared as they are. DARE's masks are random
(PEFT draws them from torch's global generator, jlora from ``seed``), so the parity tests give
both the same masks (a function of each element's value, patched into both), and separate tests
check jlora's own masks: the kept fraction and the ``1/density`` rescaling.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import peft.utils.merge_utils as peft_merge_utils
import pytest

import jlora
from jlora.nn import _weighted
import torch_oracle as oracle
from test_weighted_adapters import MODULES, assert_same_factors, assert_same_outputs, combine, pair

WEIGHTS = [0.7, -0.3]
FACTOR_METHODS = ("magnitude_prune", "dare_linear", "dare_ties")
SVD_METHODS = ("ties_svd", "magnitude_prune_svd", "dare_linear_svd", "dare_ties_svd")


@pytest.fixture
def same_masks(monkeypatch):
  """DARE keeps an element iff frac(10·|x|) < density, in both PEFT and jlora."""

  def peft_random_pruning(tensor, density, rescale):
    kept = tensor * (((tensor.abs() * 10) % 1.0) < density)
    return kept / density if rescale else kept

  monkeypatch.setattr(peft_merge_utils, "random_pruning", peft_random_pruning)
  monkeypatch.setattr(_weighted, "_random_keep", lambda key, x, density: ((jnp.abs(x) * 10) % 1.0) < density)


@pytest.mark.parametrize("method", FACTOR_METHODS)
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_factor_methods_match_peft(same_masks, method, sign):
  root, model = pair()
  combine(root, model, WEIGHTS, method, density=0.5, majority_sign_method=sign)
  assert_same_factors(root, model)
  assert_same_outputs(root, model)


@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_svd_methods_match_peft(same_masks, method, sign):
  root, model = pair(rank_two=3)
  combine(root, model, WEIGHTS, method, density=0.5, majority_sign_method=sign, svd_rank=2)
  assert_same_outputs(root, model)


def test_magnitude_prune_keeps_the_largest_elements():
  _, model = pair()
  jlora.add_weighted_adapter(model, ["one", "two"], [1.0, 0.0], "mix", combination_type="magnitude_prune",
                             density=0.25)
  a = np.asarray(model.lin.adapters["mix"].lora_A[...])
  assert np.count_nonzero(a) == int(0.25 * a.size)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_at_density_one_is_its_deterministic_twin(method):
  root, model = pair()
  twin = {"dare_linear": "linear", "dare_ties": "ties", "dare_linear_svd": "svd",
          "dare_ties_svd": "ties_svd"}[method]
  jlora.add_weighted_adapter(model, ["one", "two"], WEIGHTS, "dare", combination_type=method, density=1.0)
  jlora.add_weighted_adapter(model, ["one", "two"], WEIGHTS, "twin", combination_type=twin, density=1.0)
  np.testing.assert_allclose(model.lin.delta_weight("dare"), model.lin.delta_weight("twin"), atol=1e-6)


def test_dare_keeps_about_density_and_rescales_the_kept():
  x = jnp.linspace(1.0, 2.0, 20000)
  import jax
  pruned = np.asarray(_weighted._dare_prune(jax.random.key(0), x, 0.3))
  kept = pruned != 0
  assert abs(kept.mean() - 0.3) < 0.02
  np.testing.assert_allclose(pruned[kept], np.asarray(x)[kept] / 0.3, rtol=1e-6)


def test_dare_masks_follow_the_seed():
  _, model = pair()
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    jlora.add_weighted_adapter(model, ["one", "two"], WEIGHTS, name, combination_type="dare_linear",
                               density=0.5, seed=seed)
  a, b, c = (np.asarray(model.lin.adapters[n].lora_A[...]) for n in "abc")
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("method", ["dare_linear", "magnitude_prune_svd"])
def test_pruning_methods_need_a_density(method):
  _, model = pair()
  with pytest.raises(ValueError, match=f"combination_type='{method}' needs density in \\[0, 1\\]"):
    jlora.add_weighted_adapter(model, ["one", "two"], WEIGHTS, "mix", combination_type=method)


def test_factor_methods_need_one_rank_as_in_peft():
  _, model = pair(rank_two=3)
  with pytest.raises(ValueError, match="needs adapters of one rank"):
    jlora.add_weighted_adapter(model, ["one", "two"], WEIGHTS, "mix", combination_type="dare_ties", density=0.5)


def test_unknown_majority_sign_method_is_refused():
  _, model = pair()
  with pytest.raises(ValueError, match="majority_sign_method must be 'total' or 'frequency'"):
    jlora.add_weighted_adapter(model, ["one", "two"], WEIGHTS, "mix", combination_type="ties",
                               density=0.5, majority_sign_method="mean")

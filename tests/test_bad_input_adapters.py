"""Bad input to the adapter API: NaN/inf refused where it enters, and a failed call changes nothing."""

import math

import optax
import pytest
from flax import nnx

import jlora
from jlora import testing
from jlora.nn import _weighted
from jlora.nn._layer import LoraLayer
from tests.bad_input_doubles import assert_unchanged, snapshot

TARGETS = ["q_proj", "v_proj"]


def with_adapters(*names, r=2):
  model = testing.TinyLM()
  for seed, name in enumerate(names):
    jlora.add_adapter(model, name, jlora.LoraConfig(r=r, target_modules=TARGETS, seed=seed))
  testing.randomize_adapters(model)
  return model


# ---- NaN / inf where they enter ------------------------------------------------

@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf])
def test_lora_alpha_must_be_finite(alpha):
  with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
    jlora.LoraConfig(lora_alpha=alpha)


def test_alpha_pattern_values_must_be_finite():
  with pytest.raises(ValueError, match=r"alpha_pattern\['q_proj'\] must be a finite number"):
    jlora.LoraConfig(alpha_pattern={"q_proj": math.nan})


@pytest.mark.parametrize("weight", [math.nan, math.inf])
def test_weighted_adapter_weights_must_be_finite(weight):
  model = with_adapters("a", "b")
  with pytest.raises(ValueError, match="weights must be finite numbers"):
    jlora.add_weighted_adapter(model, ["a", "b"], [1.0, weight], "mix", combination_type="cat")


# ---- svd_rank --------------------------------------------------------------------

@pytest.mark.parametrize("rank", [0, -3, 1000, 2.5])
def test_svd_rank_outside_one_to_min_in_out_is_refused_with_the_range(rank):
  model = with_adapters("a", "b")  # TinyLM projections are 8 wide
  with pytest.raises(ValueError, match=rf"svd_rank must be an int in \[1, 8\].*got {rank!r}"):
    jlora.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "mix", "svd", svd_rank=rank)


def test_svd_rank_at_the_limit_is_accepted():
  model = with_adapters("a", "b")
  jlora.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "mix", "svd", svd_rank=8)
  assert jlora.peft_config(model)["mix"].r == 8


# ---- a failed call leaves the model as it was --------------------------------------

def test_failed_wlora_with_one_good_and_one_missing_upstream_leaves_the_model_as_it_was(tmp_path):
  jlora.save_peft(with_adapters("default"), tmp_path / "good")
  model = testing.TinyLM()
  before = snapshot(model)
  config = jlora.WLoraConfig(upstream_loras=[str(tmp_path / "good"), str(tmp_path / "missing")])
  with pytest.raises(ValueError, match="neither an adapter of the model"):
    jlora.get_peft_model(model, config)
  assert_unchanged(model, before)


def test_the_corrected_wlora_retry_succeeds(tmp_path):
  jlora.save_peft(with_adapters("default"), tmp_path / "good")
  jlora.save_peft(with_adapters("default"), tmp_path / "other")
  model = testing.TinyLM()
  with pytest.raises(ValueError):
    jlora.get_peft_model(model, jlora.WLoraConfig(upstream_loras=[str(tmp_path / "good"), "nope"]))
  jlora.get_peft_model(model, jlora.WLoraConfig(upstream_loras=[str(tmp_path / "good"), str(tmp_path / "other")]))
  assert list(jlora.peft_config(model)) == ["default.upstream0", "default.upstream1", "default"]


def test_failed_wlora_injection_after_loading_upstreams_removes_them(tmp_path):
  jlora.save_peft(with_adapters("default"), tmp_path / "good")
  model = testing.TinyLM()
  before = snapshot(model)
  config = jlora.WLoraConfig(upstream_loras=[str(tmp_path / "good")], target_modules=["k_proj"])
  with pytest.raises(ValueError, match="selects no layer"):
    jlora.get_peft_model(model, config)
  assert_unchanged(model, before)


def fail_on_second_add(monkeypatch):
  calls = []
  real = LoraLayer.add

  def add(self, name, adapter):
    calls.append(name)
    if len(calls) == 2:
      raise RuntimeError("simulated failure half way")
    real(self, name, adapter)

  monkeypatch.setattr(LoraLayer, "add", add)


def test_add_adapter_failing_half_way_is_rolled_back(monkeypatch):
  model = with_adapters("a")
  before = snapshot(model)
  fail_on_second_add(monkeypatch)
  with pytest.raises(RuntimeError, match="simulated"):
    jlora.add_adapter(model, "b", jlora.LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
  assert_unchanged(model, before)


def test_add_weighted_adapter_failing_half_way_leaves_the_model_as_it_was(monkeypatch):
  model = with_adapters("a", "b")
  before = snapshot(model)
  calls = []
  real = _weighted._cat

  def cat(*args):
    calls.append(1)
    if len(calls) == 2:
      raise RuntimeError("simulated failure half way")
    return real(*args)

  monkeypatch.setattr(_weighted, "_cat", cat)
  with pytest.raises(RuntimeError, match="simulated"):
    jlora.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "mix", combination_type="cat")
  assert_unchanged(model, before)


def test_failed_load_peft_leaves_the_model_as_it_was(tmp_path):
  jlora.save_peft(with_adapters("default", r=2), tmp_path / "a")
  model = testing.TinyLM(hidden=16)  # the adapter was trained on 8-wide projections
  before = snapshot(model)
  with pytest.raises(ValueError, match="has shape"):
    jlora.load_peft(model, tmp_path / "a")
  assert_unchanged(model, before)


# ---- a module without LoRA-able layers -----------------------------------------------

class NoLayers(nnx.Module):
  def __init__(self):
    self.scale = nnx.Param(nnx.initializers.ones(nnx.Rngs(0).params(), (3,)))

  def __call__(self, x):
    return x * self.scale[...]


def test_get_peft_model_on_a_module_without_lora_layers_says_so():
  with pytest.raises(ValueError, match="NoLayers has no layers that can take LoRA"):
    jlora.get_peft_model(NoLayers(), jlora.LoraConfig(r=2, target_modules="all-linear"))


# ---- add_weighted_adapter's density and seed ------------------------------------------

@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "ties", "magnitude_prune"])
def test_an_int_density_is_taken_as_a_float(method):
  model = with_adapters("a", "b")
  jlora.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "mix", method, density=0)
  assert "mix" in jlora.peft_config(model)


@pytest.mark.parametrize("density", ["0.5", True, math.nan])
def test_a_density_that_is_not_a_number_is_refused_by_name(density):
  model = with_adapters("a", "b")
  with pytest.raises(ValueError, match=r"density in \[0, 1\].*got"):
    jlora.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "mix", "dare_linear", density=density)


@pytest.mark.parametrize("seed", ["x", 1.5, None, True])
def test_a_seed_that_is_not_an_int_is_refused_by_name(seed):
  model = with_adapters("a", "b")
  with pytest.raises(ValueError, match=rf"seed must be an int, got {seed!r}"):
    jlora.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "mix", "dare_linear", density=0.5, seed=seed)


# ---- adapter_optimizer -----------------------------------------------------------------

@pytest.mark.parametrize("tx", ["adam", None, optax.adam])
def test_an_optimizer_that_is_not_an_optax_transformation_is_named(tx):
  with pytest.raises(TypeError, match=r"tx must be an optax GradientTransformation.*optax\.adamw"):
    jlora.adapter_optimizer(with_adapters("a"), tx)


@pytest.mark.parametrize("ratio", [math.inf, math.nan])
def test_a_non_finite_loraplus_ratio_is_refused(ratio):
  with pytest.raises(ValueError, match=r"loraplus_lr_ratio must be a positive number \(PEFT suggests 16\) and finite, got"):
    jlora.adapter_optimizer(with_adapters("a"), optax.adam(1e-3), loraplus_lr_ratio=ratio)

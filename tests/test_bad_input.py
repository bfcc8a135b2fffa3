"""Bad input: one clear error naming the problem (and the fix) at the entry point."""

import numpy as np
import pytest
from flax import nnx

import jlora
from jlora import testing
from jlora.testing import module_at

Q0 = "model.layers.0.self_attn.q_proj"


def lm_with(*names, r=2, targets=("q_proj",)):
  model = testing.TinyLM()
  for name in names:
    jlora.add_adapter(model, name, jlora.LoraConfig(r=r, target_modules=list(targets)))
  jlora.set_adapter(model, names[0])
  return model


# ---- configs -----------------------------------------------------------------

@pytest.mark.parametrize("r", [0, -1, 1.5, True, "8", None])
def test_rank_must_be_a_positive_int(r):
  with pytest.raises(ValueError, match=f"r must be a positive integer rank, got {r!r}"):
    jlora.LoraConfig(r=r)


def test_numpy_int_rank_is_accepted_as_int():
  config = jlora.LoraConfig(r=np.int64(4))
  assert config.r == 4 and type(config.r) is int


def test_rank_pattern_ranks_must_be_positive():
  with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\] must be a positive integer rank"):
    jlora.LoraConfig(rank_pattern={"q_proj": 0})


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_pattern_keys_must_be_regexes(field):
  with pytest.raises(ValueError, match=f"{field} has '\\(\\(', which is not a valid regex"):
    jlora.LoraConfig(**{field: {"((": 2}})


@pytest.mark.parametrize("alpha", ["16", None, True])
def test_alpha_must_be_a_number(alpha):
  with pytest.raises(ValueError, match="lora_alpha must be a number"):
    jlora.LoraConfig(lora_alpha=alpha)


def test_unknown_init_is_rejected_with_the_choices():
  expected = "init_lora_weights='loftq' is not supported; use True, False, 'gaussian', 'pissa'"
  with pytest.raises(ValueError, match=expected):
    jlora.LoraConfig(init_lora_weights="loftq")


def test_unknown_mixer_init_is_rejected():
  expected = "mixer_init='identity' is not supported; use 'orthogonal' or 'kaiming'"
  with pytest.raises(ValueError, match=expected):
    jlora.MoSLoraConfig(mixer_init="identity")


@pytest.mark.parametrize("rate", [1.0, -0.1])
def test_dropout_must_be_in_zero_one(rate):
  with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
    jlora.LoraConfig(lora_dropout=rate)


def test_bias_training_is_rejected():
  with pytest.raises(ValueError, match="bias='all' is not supported"):
    jlora.LoraConfig(bias="all")


def test_target_regex_must_compile():
  with pytest.raises(ValueError, match="target_modules has '\\(q_proj', which is not a valid regex"):
    jlora.LoraConfig(target_modules="(q_proj")


def test_target_list_must_hold_strings():
  with pytest.raises(ValueError, match="list of module-name strings"):
    jlora.LoraConfig(target_modules=["q_proj", 3])


@pytest.mark.parametrize("layers", ["1", [-1], [0.5]])
def test_layers_to_transform_must_be_non_negative_ints(layers):
  with pytest.raises(ValueError, match="layers_to_transform must be a layer index or a list of them"):
    jlora.LoraConfig(layers_to_transform=layers)


@pytest.mark.parametrize("extra", [dict(layers_to_transform=[0]),
                                   dict(layers_to_transform=[0], layers_pattern="layers")])
def test_layer_selection_with_a_regex_target_is_rejected_like_peft(extra):
  with pytest.raises(ValueError, match="cannot be used with a regex target_modules.*put the layer indices"):
    jlora.LoraConfig(target_modules=r".*\.q_proj", **extra)


def test_layers_pattern_needs_layers_to_transform():
  with pytest.raises(ValueError, match="layers_pattern only applies with layers_to_transform"):
    jlora.LoraConfig(target_modules=["q_proj"], layers_pattern="layers")


def test_missing_target_modules_says_what_to_pass():
  with pytest.raises(ValueError, match="target_modules is required"):
    jlora.get_peft_model(testing.TinyLM(), jlora.LoraConfig(r=2))


def test_a_non_config_is_rejected():
  with pytest.raises(TypeError, match="Expected a LoraConfig, MoSLoraConfig, WLoraConfig or VeraConfig, got dict .*jlora.register_adapter_kind"):
    jlora.get_peft_model(testing.TinyLM(), {"r": 2, "target_modules": ["q_proj"]})


# ---- adapter names -------------------------------------------------------------

def test_adding_an_existing_name_is_an_error():
  model = lm_with("a")
  with pytest.raises(ValueError, match="already has an adapter named 'a'; pick another name"):
    jlora.add_adapter(model, "a", jlora.LoraConfig(r=2, target_modules=["v_proj"]))


@pytest.mark.parametrize("name", ["", "__base__", 3])
def test_invalid_adapter_names_are_rejected(name):
  with pytest.raises(ValueError, match="Invalid adapter name"):
    jlora.add_adapter(testing.TinyLM(), name, jlora.LoraConfig(r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize("call", [
    lambda m: jlora.set_adapter(m, "missing"),
    lambda m: jlora.set_adapter(m, ["a", "missing"]),
    lambda m: jlora.delete_adapter(m, "missing"),
    lambda m: jlora.merge_adapter(m, ["missing"]),
    lambda m: jlora.unmerge_adapter(m, ["missing"]),
    lambda m: jlora.per_sample_adapters(m, ["a", "missing"]).__enter__(),
], ids=["set", "set-list", "delete", "merge", "unmerge", "per-sample"])
def test_unknown_adapter_names_are_listed_with_the_known_ones(call):
  with pytest.raises(ValueError, match=r"Unknown adapter\(s\) \['missing'\]; the model has \['a', 'b'\]"):
    call(lm_with("a", "b"))


def test_set_adapter_needs_a_name():
  with pytest.raises(ValueError, match="at least one adapter name"):
    jlora.set_adapter(lm_with("a"), [])


def test_a_model_without_adapters_says_so():
  with pytest.raises(ValueError, match="the model has none"):
    jlora.set_adapter(testing.TinyLM(), "default")


def test_deleting_a_merged_adapter_asks_to_unmerge_first():
  model = lm_with("a")
  jlora.merge_adapter(model)
  with pytest.raises(ValueError, match="'a' is merged; unmerge it before deleting it"):
    jlora.delete_adapter(model, "a")
  assert "a" in jlora.peft_config(model)


# ---- per-sample routing --------------------------------------------------------

@pytest.mark.parametrize("routes", [["a", "b"], ["b", "__base__"]], ids=["routed", "not-routed"])
def test_routing_with_a_merged_adapter_is_an_error(routes):
  model = lm_with("a", "b")
  jlora.merge_adapter(model, ["a"])
  with pytest.raises(ValueError, match=r"cannot run with merged adapters \['a'\]; unmerge_adapter\(\) first"):
    with jlora.per_sample_adapters(model, routes):
      pass


@pytest.mark.parametrize("names", [["a"], ["a", "b", "a"]])
def test_routing_needs_one_name_per_batch_row(ids, names):
  model = lm_with("a", "b")
  with pytest.raises(ValueError, match=f"got {len(names)} adapter names but .* sees a batch of 2"):
    with jlora.per_sample_adapters(model, names):
      model(ids)


# ---- adapter state ---------------------------------------------------------------

def test_loading_a_state_of_another_rank_names_the_mismatch():
  saved = jlora.adapter_state(lm_with("a", r=2))
  with pytest.raises(ValueError, match=r"lora_A has shape \(8, 2\), the model needs \(8, 3\): a rank"):
    jlora.load_adapter_state(lm_with("a", r=3), saved)


def test_loading_a_state_of_other_targets_lists_missing_and_unexpected_paths():
  saved = jlora.adapter_state(lm_with("a", targets=["q_proj"]))
  with pytest.raises(ValueError, match=r"missing \[.*v_proj.*\], unexpected \[.*q_proj.*\]"):
    jlora.load_adapter_state(lm_with("a", targets=["v_proj"]), saved)


def test_a_failed_load_leaves_the_adapter_untouched():
  model = lm_with("a", r=3)
  before = np.asarray(module_at(model, Q0).adapters["a"].lora_A[...])
  with pytest.raises(ValueError):
    jlora.load_adapter_state(model, jlora.adapter_state(lm_with("a", r=2)))
  np.testing.assert_array_equal(module_at(model, Q0).adapters["a"].lora_A[...], before)


# ---- unsupported layers --------------------------------------------------------------

class GroupedConvNet(nnx.Module):
  def __init__(self):
    rngs = nnx.Rngs(0)
    self.dense = nnx.Linear(4, 4, rngs=rngs)
    self.grouped = nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=rngs)


def test_unsupported_layer_configuration_is_named():
  with pytest.raises(ValueError, match="grouped convolutions"):
    jlora.get_peft_model(GroupedConvNet(), jlora.LoraConfig(r=2, target_modules=["dense", "grouped"]))


def test_a_failed_injection_leaves_the_model_unchanged():
  model = GroupedConvNet()
  with pytest.raises(ValueError):
    jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["dense", "grouped"]))
  assert type(model.dense) is nnx.Linear
  assert jlora.peft_config(model) == {}


def test_a_failed_wlora_injection_leaves_the_model_unchanged():
  model = testing.TinyLM()
  jlora.add_adapter(model, "u1", jlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
  jlora.add_adapter(model, "u2", jlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                  layers_to_transform=[0]))
  with pytest.raises(ValueError, match="must adapt the same modules"):
    jlora.add_adapter(model, "w", jlora.WLoraConfig(upstream_loras=["u1", "u2"]))
  assert all("w" not in layer.adapters for _, layer in jlora.lora_layers(model))

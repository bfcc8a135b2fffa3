"""Which modules an adapter lands on: PEFT's target_modules / exclude_modules / layers rules."""

import numpy as np
import pytest

import jlora
from jlora import testing
from jlora.testing import adapted_names, module_at

LAYERS = range(testing.NUM_LAYERS)


def names(module: str, layers=LAYERS) -> set[str]:
  return {f"model.layers.{i}.{module}" for i in layers}


def inject(model=None, **config):
  model = model if model is not None else testing.TinyLM()
  return jlora.get_peft_model(model, jlora.LoraConfig(r=2, **config))


@pytest.fixture(params=[False, True], ids=["list", "scanned"])
def lm(request):
  return testing.TinyLM(scanned=request.param)


def test_list_entries_match_module_name_suffixes(lm):
  model = inject(lm, target_modules=["q_proj", "mlp.up_proj"])
  assert adapted_names(model) == names("self_attn.q_proj") | names("mlp.up_proj")


def test_list_entries_match_whole_name_parts_only():
  with pytest.raises(ValueError, match="matches no module"):
    inject(target_modules=["proj"])


def test_string_target_is_a_full_regex_match(lm):
  model = inject(lm, target_modules=r".*\.(q|k)_proj")
  assert adapted_names(model) == names("self_attn.q_proj") | names("self_attn.k_proj")


def test_string_target_must_match_the_whole_name():
  with pytest.raises(ValueError, match="matches no module"):
    inject(target_modules="q_proj")


def test_regex_can_pick_single_layers_of_a_stack():
  model = inject(testing.TinyScannedLM(), target_modules=r"model\.layers\.1\.self_attn\.q_proj")
  assert adapted_names(model) == {"model.layers.1.self_attn.q_proj"}


def test_all_linear_takes_every_linear_but_the_lm_head_and_embeddings(lm):
  model = inject(lm, target_modules="all-linear")
  every = set().union(*(names(m) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                          "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")))
  assert adapted_names(model) == every
  assert not isinstance(module_at(model, "lm_head"), jlora.LoraLayer)
  assert not isinstance(module_at(model, "model.embed_tokens"), jlora.LoraLayer)


def test_all_linear_skips_convolutions():
  model = inject(testing.TinyConvNet(), target_modules="all-linear")
  assert adapted_names(model) == {"head"}


def test_lm_head_and_embeddings_can_be_targeted_by_name():
  model = inject(target_modules=["lm_head", "embed_tokens"])
  assert adapted_names(model) == {"lm_head", "model.embed_tokens"}


def test_exclude_modules_list_removes_matches(lm):
  model = inject(lm, target_modules="all-linear", exclude_modules=["mlp.up_proj", "down_proj", "o_proj"])
  assert adapted_names(model) == set().union(*(names(f"self_attn.{p}_proj") for p in "qkv"))


def test_exclude_modules_regex_removes_matches(lm):
  model = inject(lm, target_modules=["q_proj"], exclude_modules=r".*\.0\..*")
  assert adapted_names(model) == names("self_attn.q_proj", [1, 2])


def test_a_config_matching_nothing_lists_the_existing_modules():
  with pytest.raises(ValueError) as error:
    inject(target_modules=["query"])
  message = str(error.value)
  assert "['query']" in message or "('query',)" in message
  assert "model.layers.0.self_attn.q_proj" in message and "lm_head" in message


def test_excluding_everything_is_an_error():
  with pytest.raises(ValueError, match="matches no module"):
    inject(target_modules=["q_proj"], exclude_modules=["q_proj"])


def test_layers_to_transform_on_a_list_of_blocks():
  model = inject(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2])
  assert adapted_names(model) == names("self_attn.q_proj", [0, 2]) | names("self_attn.v_proj", [0, 2])
  assert isinstance(module_at(model, "model.layers.1.self_attn.q_proj"), testing.nnx.Linear)


def test_layers_to_transform_accepts_one_int(lm):
  model = inject(lm, target_modules=["q_proj"], layers_to_transform=1)
  assert adapted_names(model) == {"model.layers.1.self_attn.q_proj"}


def test_layers_pattern_names_the_layer_container(lm):
  model = inject(lm, target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")
  assert adapted_names(model) == {"model.layers.1.self_attn.q_proj"}


def test_layers_pattern_that_is_not_in_the_names_selects_nothing(lm):
  with pytest.raises(ValueError, match="matches no module"):
    inject(lm, target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="h")


def test_layers_to_transform_leaves_non_layer_modules_out():
  model = inject(target_modules=["q_proj", "lm_head"], layers_to_transform=[0])
  assert adapted_names(model) == {"model.layers.0.self_attn.q_proj"}


def test_layers_to_transform_on_a_scanned_stack_zeroes_excluded_layers():
  model = inject(testing.TinyScannedLM(), target_modules=["q_proj"], layers_to_transform=[0, 2],
                 lora_alpha=4)
  adapter = module_at(model, "model.layers.self_attn.q_proj").adapters["default"]
  np.testing.assert_array_equal(adapter.scaling[...], [2.0, 0.0, 2.0])
  np.testing.assert_array_equal(adapter.rank_mask[...], [[1, 1], [0, 0], [1, 1]])
  assert adapted_names(model) == names("self_attn.q_proj", [0, 2])


def test_excluded_stacked_layers_get_no_update_even_after_training():
  model = inject(testing.TinyScannedLM(), target_modules=["q_proj"], layers_to_transform=[1])
  testing.randomize_adapters(model)
  delta = module_at(model, "model.layers.self_attn.q_proj").delta_weight("default")
  assert np.all(np.asarray(delta[0]) == 0) and np.all(np.asarray(delta[2]) == 0)
  assert np.any(np.asarray(delta[1]) != 0)


def test_stacked_layers_carry_per_layer_peft_names():
  model = inject(testing.TinyScannedLM(), target_modules=["q_proj"])
  layer = module_at(model, "model.layers.self_attn.q_proj")
  assert layer.module_names == tuple(f"model.layers.{i}.self_attn.q_proj" for i in LAYERS)


def test_mark_stacked_with_the_wrong_count_is_an_error():
  model = testing.TinyScannedLM()
  jlora.mark_stacked(model.model.layers, 5)
  with pytest.raises(ValueError, match="marked as 5 stacked layers"):
    inject(model, target_modules=["q_proj"])


class Experts(testing.nnx.Module):
  """``[model.]layers.<i>.experts.<j>.proj``: two numbered levels, as in MoE models."""

  def __init__(self, under_model: bool = True):
    nnx = testing.nnx
    rngs = nnx.Rngs(0)
    layers = nnx.List([
        nnx.Dict(experts=nnx.List([nnx.Dict(proj=nnx.Linear(2, 2, rngs=rngs)) for _ in range(3)]))
        for _ in range(2)])
    if under_model:
      self.model = nnx.Dict(layers=layers)
    else:
      self.layers = layers


def test_layer_index_is_the_first_numbered_segment_like_peft():
  model = inject(Experts(), target_modules=["proj"], layers_to_transform=[1])
  assert adapted_names(model) == {f"model.layers.1.experts.{j}.proj" for j in range(3)}


def test_layers_pattern_may_start_the_name():
  model = inject(Experts(under_model=False), target_modules=["proj"], layers_to_transform=[0],
                 layers_pattern="layers")
  assert adapted_names(model) == {f"layers.0.experts.{j}.proj" for j in range(3)}


def test_layers_pattern_picks_which_numbered_level_counts():
  model = inject(Experts(), target_modules=["proj"], layers_to_transform=[2], layers_pattern="experts")
  assert adapted_names(model) == {f"model.layers.{i}.experts.2.proj" for i in range(2)}


def test_all_linear_can_be_limited_to_some_layers():
  model = inject(target_modules="all-linear", layers_to_transform=[2],
                 exclude_modules=["mlp.up_proj", "mlp.down_proj"])
  assert adapted_names(model) == {f"model.layers.2.self_attn.{p}_proj" for p in "qkvo"}

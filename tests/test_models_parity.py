"""jlora models load HF checkpoints and match transformers' logits (PyTorch, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jlora
import jlora.models
from jlora import testing
from tests import hf_doubles

FAMILIES = list(hf_doubles.CONFIGS)
TOL = 1e-4


def load(family, tmp_path, **save_kwargs):
  ref = hf_doubles.save(family, tmp_path, **save_kwargs)
  return ref, jlora.from_pretrained(tmp_path, dtype=jnp.float32)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, tmp_path):
  ref, model = load(family, tmp_path)
  ids, _ = hf_doubles.batch()
  np.testing.assert_allclose(model(jnp.asarray(ids)), hf_doubles.logits(ref, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_matches_transformers_on_real_tokens(family, tmp_path):
  ref, model = load(family, tmp_path)
  ids, mask = hf_doubles.batch()
  ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  theirs = hf_doubles.logits(ref, ids, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], theirs[real], atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sharded_checkpoint_loads_like_a_single_file(family, tmp_path):
  ref, model = load(family, tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  ids, _ = hf_doubles.batch()
  np.testing.assert_allclose(model(jnp.asarray(ids)), hf_doubles.logits(ref, ids), atol=TOL, rtol=0)


def test_mistral_sliding_window_changes_the_output(tmp_path):
  _, model = load("mistral", tmp_path)
  wide = jlora.models.CausalLM(
      jlora.models.ModelConfig(**{**model.config.__dict__, "sliding_window": None}),
      dtype=jnp.float32)
  nnx.update(wide, nnx.state(model))
  ids, _ = hf_doubles.batch()
  assert not np.allclose(model(jnp.asarray(ids)), wide(jnp.asarray(ids)), atol=1e-2)


def test_explicit_positions_match_transformers_position_ids(tmp_path):
  ref, model = load("llama3_rope", tmp_path)
  ids, _ = hf_doubles.batch()
  positions = np.broadcast_to(np.arange(ids.shape[1]) * 5, ids.shape)
  with torch.no_grad():
    theirs = ref(torch.as_tensor(ids, dtype=torch.long), position_ids=torch.as_tensor(positions.copy())).logits
  ours = model(jnp.asarray(ids), positions=jnp.asarray(positions))
  np.testing.assert_allclose(ours, theirs.numpy(), atol=TOL, rtol=0)
  assert not np.allclose(ours, model(jnp.asarray(ids)), atol=1e-2)


@pytest.mark.parametrize("family,container", [("llama", "model.layers"), ("gpt2", "transformer.h")])
def test_layers_are_stacked_on_a_leading_axis(family, tmp_path, container):
  _, model = load(family, tmp_path)
  layers = model
  for part in container.split("."):
    layers = getattr(layers, part)
  assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(nnx.state(layers, nnx.Param)))


@pytest.mark.parametrize("family,targets,expected", [
    ("llama", ["q_proj", "v_proj"], {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                     "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}),
    ("gpt2", ["c_attn"], {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}),
])
def test_lora_target_names_equal_peft_names(family, targets, expected, tmp_path):
  _, model = load(family, tmp_path)
  model = jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=targets))
  names = {n for _, layer in jlora.lora_layers(model) for n in layer.module_names}
  assert names == expected


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_model_with_lora_injected_runs_and_starts_unchanged(family, targets, tmp_path):
  ref, model = load(family, tmp_path)
  if family == "gpt2" and targets != "all-linear":
    targets = ["c_attn"]
  ids, _ = hf_doubles.batch()
  base = np.asarray(model(jnp.asarray(ids)))
  model = jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=targets))
  np.testing.assert_allclose(model(jnp.asarray(ids)), base, atol=1e-5)  # fp32 fusion order


def test_randomized_lora_changes_logits_and_merge_and_unload_keeps_them(tmp_path):
  _, model = load("llama", tmp_path)
  ids = jnp.asarray(hf_doubles.batch()[0])
  base = np.asarray(model(ids))
  model = jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.1))
  testing.randomize_adapters(model, scale=0.3)
  model.eval()
  adapted = np.asarray(model(ids))
  assert not np.allclose(adapted, base, atol=1e-2)
  merged = jlora.merge_and_unload(model)
  np.testing.assert_allclose(merged(ids), adapted, atol=1e-4)


def test_unknown_model_type_lists_supported_ones():
  with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, gpt2"):
    jlora.models.from_hf_config(type("C", (), {"model_type": "bert"})())


def test_scanned_lora_dropout_state_advances_per_layer(tmp_path):
  _, model = load("llama", tmp_path)
  model = jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.5))
  testing.randomize_adapters(model, scale=0.5)
  ids = jnp.asarray(hf_doubles.batch()[0])
  first, second = np.asarray(model(ids)), np.asarray(model(ids))
  adapter = testing.module_at(model, "model.layers.self_attn.q_proj").adapters["default"]
  np.testing.assert_array_equal(adapter.dropout_count[...], [2, 2])
  assert not np.allclose(first, second, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_traced_program_size_does_not_grow_with_depth(family, tmp_path):
  hf = hf_doubles.CONFIGS[family]()
  sizes = []
  for layers in (1, 4):
    if family == "gpt2":
      hf.n_layer = layers
    else:
      hf.num_hidden_layers = layers
    config = jlora.models.from_hf_config(hf)
    model = jlora.models.model_class(config)(config, dtype=jnp.float32)
    graphdef, state = nnx.split(model)
    ids = jnp.zeros((1, 4), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids))(state)
    sizes.append(len(str(jaxpr).splitlines()))
  assert sizes[0] == sizes[1]

"""Hot-swap (PEFT's ``hotswap_adapter``): new weights into the same adapter slot, PEFT's logits,
and no recompilation of a jitted forward across swaps (smaller ranks padded into the slot)."""

from __future__ import annotations

import copy

import jax
import numpy as np
import peft
import pytest
from flax import nnx

import jlora
import torch_oracle as oracle
from tests import hf_doubles

IDS, _ = hf_doubles.batch()
TOL = 1e-4


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama")
  base = hf_doubles.save("llama", path)
  adapters = {
      "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
      "b": dict(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"]),  # smaller rank, other alpha
      "c": dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["q_proj"]),  # v_proj left out
      "big": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
      "other": dict(r=2, lora_alpha=2, target_modules=["k_proj"]),
      "layer0": dict(r=4, lora_alpha=4, target_modules=["q_proj"], layers_to_transform=[0]),
  }
  logits = {}
  for seed, (name, config) in enumerate(adapters.items()):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    oracle.randomize_peft(model, seed=seed, scale=0.2)
    model.save_pretrained(path / name)
    logits[name] = hf_doubles.logits(model.eval(), IDS)
  return path, logits


jmodel = hf_doubles.jlora_model


def test_five_swaps_give_peft_logits_with_one_compilation(llama):
  path, logits = llama
  model = jlora.load_peft(jmodel(path), path / "a")
  graphdef = nnx.graphdef(model)
  forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state, copy=True)(ids))
  np.testing.assert_allclose(forward(nnx.state(model), IDS), logits["a"], atol=TOL)
  for name in ("b", "c", "a", "b", "c"):
    jlora.hotswap_adapter(model, path / name)
    assert nnx.graphdef(model) == graphdef
    np.testing.assert_allclose(forward(nnx.state(model), IDS), logits[name], atol=TOL, err_msg=name)
  assert forward._cache_size() == 1


def test_smaller_rank_is_padded_under_the_slot_rank_mask(llama):
  path, logits = llama
  model = jlora.load_peft(jmodel(path), path / "layer0")  # layer 1 has rank 0: the slot has a rank mask
  (layer,) = [l for _, l in jlora.lora_layers(model) if "model.layers.0.self_attn.q_proj" in l.module_names]
  assert layer.adapters["default"].rank_mask is not None
  jlora.hotswap_adapter(model, path / "c")
  np.testing.assert_allclose(np.asarray(model(IDS)), logits["c"], atol=TOL)
  np.testing.assert_array_equal(np.asarray(layer.adapters["default"].rank_mask[...]), np.ones((2, 4)))


def test_a_larger_rank_than_the_slot_is_refused_and_nothing_changes(llama):
  path, logits = llama
  model = jlora.load_peft(jmodel(path), path / "a")
  with pytest.raises(ValueError, match="Cannot hot-swap a rank-8 adapter into .* whose slot has rank 4"):
    jlora.hotswap_adapter(model, path / "big")
  np.testing.assert_allclose(np.asarray(model(IDS)), logits["a"], atol=TOL)


def test_modules_the_slot_does_not_adapt_are_refused(llama):
  path, _ = llama
  model = jlora.load_peft(jmodel(path), path / "a")
  with pytest.raises(ValueError, match="adapts modules that adapter 'default' does not"):
    jlora.hotswap_adapter(model, path / "other")


def test_a_merged_slot_is_refused_as_in_peft(llama):
  path, _ = llama
  model = jlora.load_peft(jmodel(path), path / "a")
  jlora.merge_adapter(model)
  with pytest.raises(ValueError, match="it is merged into the base weights; unmerge_adapter"):
    jlora.hotswap_adapter(model, path / "b")

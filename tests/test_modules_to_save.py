"""``modules_to_save``: full trainable copies (PEFT's ``ModulesToSaveWrapper``), PEFT as the oracle:
checkpoint keys both ways, logits, switching adapters, merge_and_unload, training."""

from __future__ import annotations

import copy

import jax
import numpy as np
import optax
import peft
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

import jlora
from jlora.testing import TinyLM, randomize_adapters, token_ids
from tests import hf_doubles

IDS, _ = hf_doubles.batch()
TOL = 1e-4


jmodel = hf_doubles.jlora_model


def peft_with_copies(base, out, seed=1, modules=("lm_head", "embed_tokens")):
  """A PEFT adapter with random LoRA factors and perturbed full copies, saved to ``out``."""
  model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
      r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=list(modules)))
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name or "modules_to_save" in name:
        p.add_(0.2 * torch.randn(p.shape, generator=gen))
  model.save_pretrained(out)
  return model.eval()


def test_peft_copies_load_with_peft_logits(llama, tmp_path):
  path, base = llama
  peft_model = peft_with_copies(base, tmp_path / "a")
  model = jlora.load_peft(jmodel(path), tmp_path / "a")
  np.testing.assert_allclose(np.asarray(model(IDS)), hf_doubles.logits(peft_model, IDS), atol=TOL)


def test_copies_save_under_peft_keys_and_round_trip(llama, tmp_path):
  path, base = llama
  peft_with_copies(base, tmp_path / "a")
  model = jlora.load_peft(jmodel(path), tmp_path / "a")
  jlora.save_peft(model, tmp_path / "b")
  assert set(load_file(tmp_path / "b" / "adapter_model.safetensors")) == set(
      load_file(tmp_path / "a" / "adapter_model.safetensors"))
  again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b")
  np.testing.assert_allclose(hf_doubles.logits(again, IDS), np.asarray(model(IDS)), atol=TOL)


def test_set_adapter_switches_copies_as_peft(llama, tmp_path):
  path, base = llama
  peft_model = peft_with_copies(base, tmp_path / "a", seed=1)
  peft_with_copies(base, tmp_path / "b", seed=2, modules=("lm_head",))
  peft_model.load_adapter(tmp_path / "b", adapter_name="b")
  model = jlora.load_peft(jmodel(path), tmp_path / "a")
  jlora.load_peft(model, tmp_path / "b", adapter_name="b")
  for name in ("b", "default"):
    peft_model.set_adapter(name)
    jlora.set_adapter(model, name)
    np.testing.assert_allclose(np.asarray(model(IDS)), hf_doubles.logits(peft_model, IDS), atol=TOL,
                               err_msg=name)


def test_disabled_adapters_run_the_original_modules(llama, tmp_path):
  path, base = llama
  peft_with_copies(base, tmp_path / "a")
  model = jlora.load_peft(jmodel(path), tmp_path / "a")
  with jlora.disable_adapters(model):
    np.testing.assert_allclose(np.asarray(model(IDS)), hf_doubles.logits(base, IDS), atol=TOL)


def test_merge_and_unload_puts_the_copy_in_place_as_peft(llama, tmp_path):
  path, base = llama
  peft_model = peft_with_copies(base, tmp_path / "a")
  merged = jlora.merge_and_unload(jlora.load_peft(jmodel(path), tmp_path / "a"))
  assert not list(jlora.lora_layers(merged))
  assert not jax.tree.leaves(nnx.state(merged, jlora.LoraParam))
  np.testing.assert_allclose(np.asarray(merged(IDS)),
                             hf_doubles.logits(peft_model.merge_and_unload(), IDS), atol=TOL)


def test_copies_are_in_the_adapter_pytree_and_train():
  model = TinyLM()
  jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
  original = np.asarray(model.lm_head.base_layer.kernel[...]).copy()
  graphdef, params, rest = nnx.split(model, jlora.LoraParam, ...)
  assert "lm_head" in params
  loss = lambda p: (nnx.merge(graphdef, p, rest, copy=True)(token_ids()) ** 2).mean()
  tx = jlora.adapter_optimizer(model, optax.sgd(0.1))
  updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
  nnx.update(model, optax.apply_updates(params, updates))
  copy_kernel = np.asarray(model.lm_head.adapters["default"].module.kernel[...])
  assert np.abs(copy_kernel - original).max() > 1e-4
  np.testing.assert_array_equal(np.asarray(model.lm_head.base_layer.kernel[...]), original)


def test_a_module_both_targeted_and_saved_is_refused():
  model = TinyLM()
  with pytest.raises(ValueError, match="both a LoRA target and in modules_to_save"):
    jlora.get_peft_model(model, jlora.LoraConfig(target_modules=["q_proj", "lm_head"],
                                                 modules_to_save=["lm_head"]))
  assert not list(jlora.lora_layers(model))


def test_modules_to_save_matching_nothing_is_refused():
  with pytest.raises(ValueError, match="modules_to_save=\\['score'\\] matches no module"):
    jlora.get_peft_model(TinyLM(), jlora.LoraConfig(target_modules=["q_proj"], modules_to_save=["score"]))


def test_weighted_adapters_sharing_a_copied_module_are_refused_as_in_peft():
  model = TinyLM()
  for name in ("a", "b"):
    jlora.add_adapter(model, name, jlora.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
  with pytest.raises(ValueError, match="target the same module with modules_to_save"):
    jlora.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "mix", combination_type="cat")

"""VeRA, a kind added only through ``jlora.register_adapter_kind``, with PEFT as the oracle: checkpoints
both ways on a tiny Llama and GPT-2 (logits in float32), merge / unmerge, and what it refuses."""

from __future__ import annotations

import copy
import json

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

import jlora
from jlora.kinds import VeraConfig
from tests import hf_doubles

IDS, _ = hf_doubles.batch()
TOL = 1e-4
TARGETS = {"llama": ["q_proj", "v_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  return request.param, path, hf_doubles.save(request.param, path)


def peft_vera(base, family, out):
  """A PEFT VeRA adapter with random trained-looking vectors, saved to ``out``."""
  model = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(
      r=4, target_modules=TARGETS[family], projection_prng_key=3, fan_in_fan_out=family == "gpt2"))
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "vera_lambda" in name:
        p.copy_(torch.randn(p.shape, generator=gen))
  model.save_pretrained(out)
  return model.eval()


def jlora_vera(path, family):
  model = hf_doubles.jlora_model(path)
  jlora.get_peft_model(model, VeraConfig(r=4, target_modules=TARGETS[family], projection_prng_key=3))
  rng = np.random.RandomState(0)
  for _, layer in jlora.lora_layers(model):
    adapter = layer.adapters["default"]
    for variable in (adapter.vera_lambda_d, adapter.vera_lambda_b):
      variable[...] = jnp.asarray(rng.randn(*variable.shape), jnp.float32)
  return model


def test_a_peft_vera_adapter_loads_with_peft_logits(family, tmp_path):
  name, path, base = family
  peft_model = peft_vera(base, name, tmp_path / "a")
  model = jlora.load_peft(hf_doubles.jlora_model(path), tmp_path / "a")
  np.testing.assert_allclose(np.asarray(model(IDS)), hf_doubles.logits(peft_model, IDS), atol=TOL)


def test_a_jlora_vera_adapter_loads_in_peft_with_the_same_logits(family, tmp_path):
  name, path, base = family
  model = jlora_vera(path, name)
  jlora.save_peft(model, tmp_path / "b")
  again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b").eval()
  assert isinstance(again.peft_config["default"], peft.VeraConfig)
  np.testing.assert_allclose(hf_doubles.logits(again, IDS), np.asarray(model(IDS)), atol=TOL)


def test_merge_and_unmerge_are_exact(family):
  name, path, _ = family
  model = jlora_vera(path, name)
  layer = next(layer for _, layer in jlora.lora_layers(model))
  kernel = np.asarray(layer.kernel()[...]).copy()
  adapted = np.asarray(model(IDS))
  jlora.merge_adapter(model)
  np.testing.assert_allclose(np.asarray(model(IDS)), adapted, atol=TOL)
  jlora.unmerge_adapter(model)
  np.testing.assert_allclose(np.asarray(layer.kernel()[...]), kernel, atol=1e-6)
  np.testing.assert_allclose(np.asarray(model(IDS)), adapted, atol=TOL)


def test_merge_and_unload_matches_peft(family, tmp_path):
  name, path, base = family
  peft_model = peft_vera(base, name, tmp_path / "a")
  merged = jlora.merge_and_unload(jlora.load_peft(hf_doubles.jlora_model(path), tmp_path / "a"))
  want = hf_doubles.logits(peft_model.merge_and_unload(), IDS)
  np.testing.assert_allclose(np.asarray(merged(IDS)), want, atol=TOL)


def test_a_fresh_vera_adapter_leaves_the_model_unchanged_and_trains_only_its_vectors(family):
  name, path, _ = family
  base = np.asarray(hf_doubles.jlora_model(path)(IDS))
  model = hf_doubles.jlora_model(path)
  jlora.get_peft_model(model, VeraConfig(r=4, target_modules=TARGETS[name]))
  np.testing.assert_allclose(np.asarray(model(IDS)), base, atol=1e-6)
  _, params, _ = jlora.split_adapter(model)
  leaves = {str(key[-1]) for key, _ in nnx.to_flat_state(params)}
  assert leaves == {"vera_lambda_d", "vera_lambda_b"}


def test_layers_share_one_pair_of_projections():
  model = jlora.testing.TinyLM()
  jlora.get_peft_model(model, VeraConfig(r=2, target_modules=["q_proj", "up_proj", "down_proj"]))
  block = model.model.layers[0]
  up, down = block.mlp.up_proj.adapters["default"], block.mlp.down_proj.adapters["default"]
  n = min(up.vera_A.shape[0], down.vera_A.shape[0])
  np.testing.assert_array_equal(np.asarray(up.vera_A[...])[:n], np.asarray(down.vera_A[...])[:n])


def test_save_projection_false_is_refused():
  with pytest.raises(ValueError, match=r"save_projection=False\) is not supported"):
    VeraConfig(target_modules=["q_proj"], save_projection=False)


def test_vera_on_an_embedding_is_refused():
  with pytest.raises(ValueError, match="VeRA adapts Linear layers only"):
    jlora.get_peft_model(jlora.testing.TinyLM(), VeraConfig(r=2, target_modules=["embed_tokens"]))


def test_scanned_layers_left_out_get_no_update_and_round_trip(tmp_path):
  model = jlora.testing.TinyScannedLM()
  jlora.get_peft_model(model, VeraConfig(r=3, target_modules=["q_proj", "down_proj"], layers_to_transform=[1],
                                         layers_pattern="layers"))
  rng = np.random.RandomState(0)
  for _, layer in jlora.lora_layers(model):
    for variable in (layer.adapters["default"].vera_lambda_d, layer.adapters["default"].vera_lambda_b):
      variable[...] = jnp.asarray(rng.randn(*variable.shape), jnp.float32)
  ids = jlora.testing.token_ids()
  jlora.save_peft(model, tmp_path / "v")
  saved = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
  assert saved["target_modules"] == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
  loaded = jlora.load_peft(jlora.testing.TinyScannedLM(), tmp_path / "v")
  np.testing.assert_allclose(np.asarray(loaded(ids)), np.asarray(model(ids)), atol=1e-6)

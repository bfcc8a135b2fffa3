"""``init_lora_weights`` options, with PEFT as the oracle: PiSSA and OLoRA factors and residual
base weights (deterministic given the base weight), the residual saved as a model, and the
PiSSA → plain-LoRA conversion on save; orthogonal / gaussian / False by their properties."""

from __future__ import annotations

import copy
import json

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import jlora
import torch_oracle as oracle
from jlora.testing import TinyLM, randomize_adapters
from tests import hf_doubles

IDS, _ = hf_doubles.batch()
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_pair(init, r=2, lora_alpha=4, targets=("lin",)):
  """PEFT and jlora tiny models with the same base weights, each initialised by ``init``."""
  torch_model = oracle.TorchTiny(0)
  model = oracle.NnxTiny.from_torch(torch_model)
  kwargs = dict(r=r, lora_alpha=lora_alpha, target_modules=list(targets), init_lora_weights=init)
  root = oracle.peft_model(torch_model, **kwargs).base_model
  jlora.get_peft_model(model, jlora.LoraConfig(**kwargs))
  return root, model


def signs(got, want):
  """Per-rank-component sign flips (SVD/QR factors are unique only up to sign)."""
  return np.sign(np.sum(got * want, axis=0, keepdims=True))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_factors_and_residual_base_match_peft(init):
  root, model = tiny_pair(init)
  a, b = oracle.flax_factors(root.lin, "default")
  adapter = model.lin.adapters["default"]
  got_a, got_b = np.asarray(adapter.lora_A[...]), np.asarray(adapter.lora_B[...])
  flip = signs(got_a, a)
  np.testing.assert_allclose(got_a * flip, a, atol=1e-5)
  np.testing.assert_allclose(got_b * flip.T, b, atol=1e-5)
  np.testing.assert_allclose(np.asarray(model.lin.base_layer.kernel[...]),
                             oracle.to_np(root.lin.base_layer.weight).T, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "orthogonal"])
def test_output_starts_equal_to_the_base_model(init):
  torch_model = oracle.TorchTiny(0)
  base = oracle.NnxTiny.from_torch(torch_model)
  _, model = tiny_pair(init)
  x = oracle.to_np(oracle.torch_inputs()[0])
  np.testing.assert_allclose(np.asarray(model.lin(x)), np.asarray(base.lin(x)), atol=1e-5)


def test_pissa_niter_approximates_the_full_svd_update():
  """With a clear spectral gap the randomized SVD finds the same top-r subspace."""
  u, _ = np.linalg.qr(np.random.RandomState(0).randn(oracle.IN, oracle.IN))
  v, _ = np.linalg.qr(np.random.RandomState(1).randn(oracle.OUT, oracle.OUT))
  kernel = (u[:, :oracle.OUT] * [8.0, 4.0, 0.1, 0.05, 0.01]) @ v.T
  deltas = []
  for init in ("pissa", "pissa_niter_4"):
    model = oracle.NnxTiny()
    model.lin.kernel[...] = kernel
    jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["lin"], init_lora_weights=init))
    deltas.append(np.asarray(model.lin.delta_weight("default")))
  np.testing.assert_allclose(deltas[1], deltas[0], atol=1e-4)


def test_trained_pissa_factors_give_peft_outputs():
  root, model = tiny_pair("pissa")
  oracle.randomize_peft(root)
  oracle.copy_factors(root, model, "default")
  expected, got = oracle.outputs(root, model, "lin")
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_orthogonal_factors_are_nonzero_with_a_zero_product():
  _, model = tiny_pair("orthogonal", r=4)
  adapter = model.lin.adapters["default"]
  assert np.abs(np.asarray(adapter.lora_A[...])).min() > 0
  assert np.abs(np.asarray(adapter.lora_B[...])).sum() > 0
  np.testing.assert_allclose(np.asarray(model.lin.delta_weight("default")), 0, atol=1e-6)


def test_orthogonal_needs_an_even_rank_as_in_peft():
  with pytest.raises(ValueError, match="Orthogonal initialization requires the LoRA rank to be even"):
    tiny_pair("orthogonal", r=3)  # PEFT raises first
  with pytest.raises(ValueError, match="needs even ranks"):
    jlora.LoraConfig(r=3, target_modules=["lin"], init_lora_weights="orthogonal")


def test_gaussian_a_has_std_one_over_r_and_b_is_zero():
  model = jlora.testing.TinyLM(hidden=64)
  jlora.get_peft_model(model, jlora.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
  adapter = jlora.testing.module_at(model, "model.layers.0.self_attn.q_proj").adapters["default"]
  assert abs(float(jnp.std(adapter.lora_A[...])) - 0.25) < 0.03
  assert not jnp.any(adapter.lora_B[...])


def test_false_gives_random_factors_that_change_the_output():
  _, model = tiny_pair(False)
  x = oracle.to_np(oracle.torch_inputs()[0])
  with jlora.disable_adapters(model):
    base = np.asarray(model.lin(x))
  assert np.abs(np.asarray(model.lin(x)) - base).max() > 1e-3


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
def test_embeddings_take_the_default_embedding_init_as_in_peft(init):
  root, model = tiny_pair(init, targets=("emb",))
  adapter = model.emb.adapters["default"]
  assert not jnp.any(adapter.lora_A[...])
  assert jnp.all(adapter.lora_B[...] != 0)
  assert not torch.any(root.emb.lora_embedding_A["default"])


def test_pissa_on_a_conv_layer_is_refused_with_the_fix():
  model = oracle.NnxTiny()
  with pytest.raises(ValueError, match="applies to linear layers only.*init_lora_weights=True"):
    jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["conv"], init_lora_weights="pissa"))
  assert not list(jlora.lora_layers(model))


def test_pissa_rank_above_the_weight_rank_is_refused():
  with pytest.raises(ValueError, match="r must be <= 5"):
    tiny_pair("pissa", r=6)


@pytest.mark.parametrize("init", ["loftq", "pissa_niter_", "corda", 2])
def test_unknown_init_is_refused(init):
  with pytest.raises(ValueError, match="init_lora_weights=.* is not supported"):
    jlora.LoraConfig(target_modules=["lin"], init_lora_weights=init)


# ---- real (tiny) transformers models: stacked layers, checkpoints, conversion --------------


jmodel = hf_doubles.jlora_model


PISSA = dict(r=2, lora_alpha=4, target_modules=LLAMA_LINEAR, init_lora_weights="pissa")


def test_peft_pissa_adapter_loads_onto_the_original_base_as_in_peft(llama, tmp_path):
  path, base = llama
  peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**PISSA))
  oracle.randomize_peft(peft_model, scale=0.2)  # "trained" factors
  peft_model.save_pretrained(tmp_path / "a")
  model = jlora.load_peft(jmodel(path), tmp_path / "a")
  np.testing.assert_allclose(np.asarray(model(IDS)), hf_doubles.logits(peft_model.eval(), IDS),
                             atol=1e-4)


def test_pissa_converts_to_plain_lora_for_the_original_base(llama, tmp_path):
  path, base = llama
  model = jlora.get_peft_model(jmodel(path), jlora.LoraConfig(**PISSA))
  jlora.save_peft(model, tmp_path / "init")
  randomize_adapters(model, scale=0.2)
  jlora.save_peft(model, tmp_path / "lora", initial_adapter=tmp_path / "init")
  config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
  assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (4, 8, True)
  peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora")
  np.testing.assert_allclose(hf_doubles.logits(peft_model, IDS), np.asarray(model(IDS)), atol=1e-4)


def test_residual_base_saves_as_a_model_that_peft_completes(llama, tmp_path):
  path, _ = llama
  model = jlora.get_peft_model(jmodel(path), jlora.LoraConfig(**PISSA))
  randomize_adapters(model, scale=0.2)
  want = np.asarray(model(IDS))
  jlora.save_peft(model, tmp_path / "a")
  jlora.save_pretrained(jlora.unload(model), tmp_path / "residual")
  config_file = tmp_path / "a" / "adapter_config.json"  # PEFT's residual workflow: init True
  config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "init_lora_weights": True}))
  residual = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "residual").eval()
  peft_model = peft.PeftModel.from_pretrained(residual, tmp_path / "a")
  np.testing.assert_allclose(hf_doubles.logits(peft_model, IDS), want, atol=1e-4)


def test_failed_pissa_load_gives_the_base_its_weights_back(llama, tmp_path):
  path, base = llama
  peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**PISSA))
  peft_model.save_pretrained(tmp_path / "a")
  from safetensors.numpy import load_file, save_file
  weights = tmp_path / "a" / "adapter_model.safetensors"
  tensors = load_file(weights)
  tensors.pop(sorted(tensors)[0])
  save_file(tensors, weights)
  model = jmodel(path)
  want = np.asarray(model(IDS))
  with pytest.raises(ValueError, match="lacks 1 tensor"):
    jlora.load_peft(model, tmp_path / "a")
  np.testing.assert_allclose(np.asarray(model(IDS)), want, atol=1e-5)


def test_initial_adapter_with_other_modules_is_refused(llama, tmp_path):
  path, _ = llama
  model = jlora.get_peft_model(jmodel(path), jlora.LoraConfig(**PISSA))
  other = jlora.get_peft_model(jmodel(path), jlora.LoraConfig(**{**PISSA, "target_modules": ["q_proj"]}))
  jlora.save_peft(other, tmp_path / "init")
  with pytest.raises(ValueError, match="does not hold the same modules"):
    jlora.save_peft(model, tmp_path / "lora", initial_adapter=tmp_path / "init")
  assert not (tmp_path / "lora").exists()


@pytest.mark.parametrize("option", [dict(init_lora_weights="pissa"), dict(init_lora_weights="olora"),
                                    dict(use_dora=True)])
def test_options_that_read_the_base_weight_refuse_a_quantized_base(option):
  model = jlora.quantize(TinyLM(), "int8")
  with pytest.raises(ValueError, match="stored quantized .* jlora.dequantize\\(model\\)"):
    jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["q_proj"], **option))
  assert not list(jlora.lora_layers(model))

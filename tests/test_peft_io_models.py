"""PEFT adapters on real (tiny) transformers models <-> jlora models, PEFT as the oracle."""

import copy

import jax.numpy as jnp
import numpy as np
import pytest
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model as peft_get_peft_model

import jlora
from tests import hf_doubles

IDS, _ = hf_doubles.batch()
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  path = tmp_path_factory.mktemp("gpt2")
  return path, hf_doubles.save("gpt2", path)


def peft_adapter(base, out, seed=1, **config):
  """A real PEFT adapter (random factors) saved to ``out``; returns the PEFT model."""
  import torch
  peft_model = peft_get_peft_model(copy.deepcopy(base), PeftLoraConfig(**config))
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_" in name:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
  peft_model.save_pretrained(out)
  return peft_model.eval()


jmodel = hf_doubles.jlora_model


def close(model, want):
  np.testing.assert_allclose(np.asarray(model(IDS)), want, atol=1e-4)


def test_llama_all_linear_and_embeddings_match_peft(llama, tmp_path):
  path, base = llama
  peft_model = peft_adapter(base, tmp_path / "a", r=2, lora_alpha=4,
                            target_modules=LLAMA_LINEAR + ["embed_tokens", "lm_head"])
  close(jlora.load_peft(jmodel(path), tmp_path / "a"), hf_doubles.logits(peft_model, IDS))


def test_llama_all_linear_string_target_matches_peft(llama, tmp_path):
  path, base = llama
  peft_model = peft_adapter(base, tmp_path / "a", r=2, target_modules="all-linear")
  close(jlora.load_peft(jmodel(path), tmp_path / "a"), hf_doubles.logits(peft_model, IDS))


def test_llama_rslora_with_per_layer_rank_and_alpha_patterns_matches_peft(llama, tmp_path):
  path, base = llama
  peft_model = peft_adapter(base, tmp_path / "a", r=2, lora_alpha=3, use_rslora=True,
                            target_modules=["q_proj", "v_proj", "down_proj"],
                            rank_pattern={"layers.1.self_attn.q_proj": 4, "down_proj": 3},
                            alpha_pattern={"layers.0.self_attn.v_proj": 9})
  model = jlora.load_peft(jmodel(path), tmp_path / "a")
  close(model, hf_doubles.logits(peft_model, IDS))


def test_llama_layers_to_transform_matches_peft(llama, tmp_path):
  path, base = llama
  peft_model = peft_adapter(base, tmp_path / "a", r=2, target_modules=["q_proj", "up_proj"],
                            layers_to_transform=[1], layers_pattern="layers")
  close(jlora.load_peft(jmodel(path), tmp_path / "a"), hf_doubles.logits(peft_model, IDS))


def two_adapters(llama, tmp_path):
  path, base = llama
  peft_adapter(base, tmp_path / "x", seed=1, r=2, target_modules=["q_proj", "o_proj"])
  peft_adapter(base, tmp_path / "y", seed=2, r=3, target_modules=["q_proj", "o_proj"])
  peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "x", adapter_name="x")
  peft_model.load_adapter(tmp_path / "y", adapter_name="y")
  model = jmodel(path)
  jlora.load_peft(model, tmp_path / "x", adapter_name="x")
  jlora.load_peft(model, tmp_path / "y", adapter_name="y")
  return model, peft_model


def test_llama_two_adapters_active_together_match_peft(llama, tmp_path):
  model, peft_model = two_adapters(llama, tmp_path)
  peft_model.base_model.set_adapter(["x", "y"])
  jlora.set_adapter(model, ["x", "y"])
  close(model, hf_doubles.logits(peft_model.eval(), IDS))


def test_llama_cat_weighted_adapter_matches_peft(llama, tmp_path):
  model, peft_model = two_adapters(llama, tmp_path)
  peft_model.add_weighted_adapter(["x", "y"], [0.7, -0.4], "cat", combination_type="cat")
  peft_model.set_adapter("cat")
  jlora.add_weighted_adapter(model, ["x", "y"], [0.7, -0.4], "cat", combination_type="cat")
  jlora.set_adapter(model, "cat")
  close(model, hf_doubles.logits(peft_model.eval(), IDS))


def test_llama_merge_and_unload_matches_peft(llama, tmp_path):
  path, base = llama
  peft_model = peft_adapter(base, tmp_path / "a", r=2, target_modules=LLAMA_LINEAR)
  want = hf_doubles.logits(peft_model.merge_and_unload(), IDS)
  model = jlora.merge_and_unload(jlora.load_peft(jmodel(path), tmp_path / "a"))
  assert not list(jlora.lora_layers(model))
  close(model, want)


def test_gpt2_fan_in_fan_out_adapter_matches_peft(gpt2, tmp_path):
  path, base = gpt2
  peft_model = peft_adapter(base, tmp_path / "a", r=2, fan_in_fan_out=True,
                            target_modules=["c_attn", "c_proj", "c_fc", "wte"])
  close(jlora.load_peft(jmodel(path), tmp_path / "a"), hf_doubles.logits(peft_model, IDS))


# ---- jlora -> save_peft -> PeftModel.from_pretrained ------------------------------------------------


def peft_sees_same(model, base, out, name="default"):
  jlora.save_peft(model, out, adapter_name=name)
  peft_model = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
  close(model, hf_doubles.logits(peft_model, IDS))


def test_llama_lora_round_trip_through_peft(llama, tmp_path):
  path, base = llama
  model = jlora.get_peft_model(jmodel(path), jlora.LoraConfig(
      r=2, lora_alpha=5, use_rslora=True, init_lora_weights=False,
      target_modules=LLAMA_LINEAR + ["embed_tokens"], rank_pattern={"layers.1.mlp.up_proj": 3}))
  peft_sees_same(model, base, tmp_path / "out")


def test_llama_moslora_with_per_layer_rank_round_trips_through_peft(llama, tmp_path):
  path, base = llama
  model = jlora.get_peft_model(jmodel(path), jlora.MoSLoraConfig(
      r=3, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "down_proj"],
      rank_pattern={"layers.0.self_attn.q_proj": 2}))
  # As after training: the mixer feeds B's rows beyond layer 0's rank 2 too, so they are live.
  adapter = model.model.layers.self_attn.q_proj.adapters["default"]
  adapter.lora_B[...] = 0.3 * jnp.cos(jnp.arange(adapter.lora_B.size).reshape(adapter.lora_B.shape))
  peft_sees_same(model, base, tmp_path / "out")


def test_llama_wlora_round_trips_through_peft(llama, tmp_path):
  path, base = llama
  model = jmodel(path)
  for k, r in enumerate((2, 3)):
    jlora.add_adapter(model, f"u{k}", jlora.LoraConfig(r=r, init_lora_weights=False, seed=k,
                                                       target_modules=["q_proj", "v_proj"]))
  jlora.get_peft_model(model, jlora.WLoraConfig(upstream_loras=["u0", "u1"]), "w")
  for _, layer in jlora.lora_layers(model):
    layer.adapters["w"].logits[...] = jnp.asarray([[0.4, -0.2], [-0.3, 0.5]])
  peft_sees_same(model, base, tmp_path / "out", "w")


def test_gpt2_lora_round_trips_through_peft(gpt2, tmp_path):
  path, base = gpt2
  model = jlora.get_peft_model(jmodel(path), jlora.LoraConfig(
      r=2, init_lora_weights=False, target_modules=["c_attn", "c_fc"], layers_to_transform=[0]))
  peft_sees_same(model, base, tmp_path / "out")

"""Gemma 2, Gemma 3 text and Phi-3 against transformers and peft (torch CPU as the oracle).

Logits parity of every family and variant is in test_models_parity (through
hf_doubles.CONFIGS); here: greedy generation, checkpoint round trips, PEFT
adapters both ways, soft-capped attention kernels and the options refused.
"""

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model as peft_get_peft_model

import jlora
from jlora.io import _safetensors
from jlora.models import _attention, target_backend
from jlora.models._splash import splash_attention
from tests import hf_doubles
from tests.test_generate import NEW, hf_greedy

FAMILIES = ["gemma2", "gemma2_untied", "gemma3_text", "phi3"]
IDS, _ = hf_doubles.batch()


def load(family, path):
  ref = hf_doubles.save(family, path)
  return ref, hf_doubles.jlora_model(path)


def peft_adapter(base, out, seed=1, **config):
  """A real PEFT adapter whose factors (and modules_to_save copies) are random, saved to ``out``."""
  peft_model = peft_get_peft_model(copy.deepcopy(base), PeftLoraConfig(**config))
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_" in name or "modules_to_save" in name:
        p.add_(torch.randn(p.shape, generator=gen) * 0.2)
  peft_model.save_pretrained(out)
  return peft_model.eval()


def close(model, want):
  np.testing.assert_allclose(np.asarray(model(IDS)), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_transformers(family, tmp_path):
  ref, model = load(family, tmp_path)
  np.testing.assert_array_equal(jlora.generate(model, IDS, NEW), hf_greedy(ref, IDS))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_writes_the_checkpoint_back_unchanged(family, tmp_path):
  _, model = load(family, tmp_path / "in")
  jlora.save_pretrained(model, tmp_path / "out")
  ours = _safetensors.read(tmp_path / "out" / "model.safetensors")
  theirs = _safetensors.read(tmp_path / "in" / "model.safetensors")
  assert sorted(ours) == sorted(theirs)
  for name in theirs:
    np.testing.assert_array_equal(ours[name], theirs[name])


def test_gemma2_lora_dora_and_modules_to_save_from_peft_match(tmp_path):
  base = hf_doubles.save("gemma2_untied", tmp_path / "base")
  want = peft_adapter(base, tmp_path / "a", r=2, lora_alpha=4, use_dora=True, modules_to_save=["lm_head"],
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
  close(jlora.load_peft(hf_doubles.jlora_model(tmp_path / "base"), tmp_path / "a"), hf_doubles.logits(want, IDS))


def test_gemma3_lora_from_peft_matches(tmp_path):
  base = hf_doubles.save("gemma3_text", tmp_path / "base")
  want = peft_adapter(base, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
  close(jlora.load_peft(hf_doubles.jlora_model(tmp_path / "base"), tmp_path / "a"), hf_doubles.logits(want, IDS))


def test_phi3_fused_targets_with_rank_pattern_from_peft_match(tmp_path):
  base = hf_doubles.save("phi3", tmp_path / "base")
  want = peft_adapter(base, tmp_path / "a", r=2, lora_alpha=4, target_modules=["qkv_proj", "gate_up_proj", "o_proj"],
                      rank_pattern={"qkv_proj": 3}, alpha_pattern={"layers.1.mlp.gate_up_proj": 6})
  close(jlora.load_peft(hf_doubles.jlora_model(tmp_path / "base"), tmp_path / "a"), hf_doubles.logits(want, IDS))


def test_phi3_dora_on_fused_projections_from_peft_matches(tmp_path):
  base = hf_doubles.save("phi3", tmp_path / "base")
  want = peft_adapter(base, tmp_path / "a", r=2, lora_alpha=4, use_dora=True, target_modules=["qkv_proj", "gate_up_proj"])
  close(jlora.load_peft(hf_doubles.jlora_model(tmp_path / "base"), tmp_path / "a"), hf_doubles.logits(want, IDS))


@pytest.mark.parametrize("family,targets", [("gemma2", ["q_proj", "v_proj", "gate_proj"]),
                                            ("phi3", ["qkv_proj", "gate_up_proj", "down_proj"])])
def test_jlora_adapter_loads_in_peft_with_the_same_logits(family, targets, tmp_path):
  base, model = load(family, tmp_path / "base")
  model = jlora.get_peft_model(model, jlora.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                       target_modules=targets))
  jlora.save_peft(model, tmp_path / "out")
  peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
  close(model, hf_doubles.logits(peft_model, IDS))


def test_gemma2_windows_and_soft_caps_change_the_logits(tmp_path):
  _, model = load("gemma2", tmp_path)
  plain = jlora.models.GemmaForCausalLM(
      jlora.models.GemmaConfig(**{**model.config.__dict__, "attn_logit_softcapping": None,
                                  "layer_types": ("full_attention",) * 2}), dtype=jnp.float32)
  nnx.update(plain, nnx.state(model))
  assert not np.allclose(model(IDS), plain(IDS), atol=1e-2)


def _qkv(t=128, heads=4, kv_heads=2, d=32, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((1, t, h, d)) * 2, jnp.float32) for h in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("window", [None, 40])
def test_splash_soft_cap_matches_materialised_attention_in_interpret_mode(window):
  q, k, v = _qkv()
  mask = _attention.causal_mask(q.shape[1], None, window)
  want = _attention.capped_attention(q, k, v, mask, 0.2, 5.0)
  got = splash_attention(q, k, v, None, window, 0.2, interpret=True, soft_cap=5.0)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
  uncapped = splash_attention(q, k, v, None, window, 0.2, interpret=True)
  assert not np.allclose(np.asarray(uncapped), np.asarray(want), atol=1e-3)


def test_tokamax_soft_cap_matches_materialised_attention():
  pytest.importorskip("tokamax")
  q, k, v = _qkv(t=16)
  want = _attention.capped_attention(q, k, v, _attention.causal_mask(16, None, 5), 0.2, 5.0)
  got = _attention._tokamax.tokamax_attention(q, k, v, None, 5, 0.2, implementation="xla", soft_cap=5.0)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


@pytest.mark.parametrize("attention", ["xla", "cudnn"])
def test_soft_capped_model_refuses_gpu_kernels_that_cannot_cap(attention, tmp_path):
  _, model = load("gemma2", tmp_path)
  model.attention = attention
  with target_backend("gpu"), pytest.raises(ValueError, match=rf"attention='{attention}' cannot soft-cap.*tokamax"):
    model(jnp.asarray(IDS))


def _config(family, **changes):
  config = hf_doubles.CONFIGS[family]()
  for name, value in changes.items():
    setattr(config, name, value)
  return config


@pytest.mark.parametrize("family,option,match", [
    ("gemma3_text", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0.*transformers' Gemma 3 ignores"),
    ("gemma2", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("llama", dict(final_logit_softcapping=30.0), "final_logit_softcapping=30.0.*only Gemma"),
    ("phi3", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    ("llama", dict(rope_parameters={"rope_type": "mrope", "rope_theta": 1e4}), "rope_type='mrope'.*longrope"),
    ("gemma2", dict(layer_types=["chunked_attention", "full_attention"]), "chunked_attention"),
])
def test_unimplemented_options_are_refused_at_load(family, option, match):
  with pytest.raises(ValueError, match=match):
    jlora.models.from_hf_config(_config(family, **option))


def test_qwen2_use_sliding_window_slides_the_layers_from_max_window_layers():
  config = jlora.models.from_hf_config(hf_doubles.CONFIGS["qwen2_sliding"]())
  assert [a.sliding_window for a in config.layer_attention()] == [None, 3]


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_lora_training_steps_lower_the_loss_on_packed_rows(family, tmp_path):
  from jlora.train import make_optimizer, make_train_step, split_model

  _, model = load(family, tmp_path)
  model = jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules="all-linear"))
  graphdef, params, rng, frozen = split_model(model)
  tx = make_optimizer(model, params, learning_rate=1e-2, steps=10, warmup_steps=0, end_lr_ratio=1.0,
                      weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=1.0, grad_accum=1)
  step = make_train_step(graphdef, tx, loss_chunk_tokens=8)
  tokens = jnp.asarray(IDS)
  segments = jnp.asarray([[0, 0, 0, 1, 1, 1, 1]] * tokens.shape[0])
  batch = dict(tokens=tokens, loss_mask=jnp.ones_like(tokens), segment_ids=segments)
  state, losses = [params, tx.init(params), rng], []
  for _ in range(4):
    state[0], state[1], state[2], loss, _ = step(*state, frozen, batch)
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]

"""Rope tables against transformers' ``ROPE_INIT_FUNCTIONS`` and rotary modules (torch CPU as the oracle)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig, Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3 import modeling_phi3

from jlora.models import _rope as R

TOL = dict(rtol=1e-6, atol=1e-7)


def llama(rope_scaling=None, **kw):
  base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
              max_position_embeddings=256, vocab_size=32)
  base.update(kw)
  return LlamaConfig(rope_scaling=rope_scaling, **base)


def phi3(partial=0.5, **kw):
  base = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=32, max_position_embeddings=64,
              original_max_position_embeddings=16, partial_rotary_factor=partial)
  dim = int(16 * partial) // 2
  base["rope_scaling"] = {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(dim)],
                          "long_factor": [2.0 + 0.5 * i for i in range(dim)]}
  base.update(kw)
  return Phi3Config(**base)


def oracle(config, seq_len=None, layer_type=None):
  """transformers' ``(inv_freq, attention_factor)`` for ``config``."""
  params = config.rope_parameters if layer_type is None else config.rope_parameters[layer_type]
  if params["rope_type"] == "default":
    if layer_type is None:
      inv, factor = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
      inv, factor = Gemma3RotaryEmbedding.compute_default_rope_parameters(config, layer_type=layer_type)
  else:
    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    inv, factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None, seq_len=seq_len, **kwargs)
  return inv.numpy(), float(factor)


def ours(config, seq_len=None, layer_type=None):
  params = R.rope_parameters(config.to_dict(), layer_type)
  head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
  return R.inverse_frequencies(params, head_dim=head_dim, max_position_embeddings=config.max_position_embeddings,
                               seq_len=seq_len)


def check(config, seq_len=None, layer_type=None):
  want, want_factor = oracle(config, seq_len, layer_type)
  got, got_factor = ours(config, seq_len, layer_type)
  assert got.dtype == np.float32 and got.shape == want.shape
  np.testing.assert_allclose(got, want, **TOL)
  assert got_factor == pytest.approx(want_factor, rel=1e-12)


CASES = {
    "default": llama(),
    "default_theta_1e6_head_dim_32": llama(rope_theta=1e6, head_dim=32),
    "linear": llama({"rope_type": "linear", "factor": 4.0}),
    "llama3": llama({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64}, rope_theta=500000.0),
    "yarn": llama({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "yarn_no_truncate_betas": llama({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                     "truncate": False, "beta_fast": 16, "beta_slow": 2}),
    "yarn_mscale": llama({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
                          "mscale": 1.0, "mscale_all_dim": 0.707}, max_position_embeddings=2560),
    "yarn_attention_factor": llama({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128,
                                    "attention_factor": 0.9}),
    "dynamic": llama({"rope_type": "dynamic", "factor": 2.0}),
    "longrope_phi3": phi3(),
    "longrope_full_rotary": phi3(partial=1.0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_table_at_init_matches_transformers(name):
  check(CASES[name])


@pytest.mark.parametrize("seq_len", [100, 256, 300, 1000])
def test_dynamic_at_a_length_matches_transformers(seq_len):
  check(CASES["dynamic"], seq_len=seq_len)


def test_dynamic_grows_the_base_only_past_max_position_embeddings():
  short, _ = ours(CASES["dynamic"], seq_len=200)
  long, _ = ours(CASES["dynamic"], seq_len=1000)
  np.testing.assert_array_equal(short, ours(CASES["dynamic"])[0])
  assert np.all(long[1:] < short[1:])


@pytest.mark.parametrize("seq_len", [1, 16, 17, 64])
def test_longrope_short_and_long_factors_match_transformers(seq_len):
  check(CASES["longrope_phi3"], seq_len=seq_len)


def test_longrope_switches_past_original_max_position_embeddings():
  params = R.rope_parameters(CASES["longrope_phi3"].to_dict())
  assert params["original_max_position_embeddings"] == 16
  assert not R.longrope_uses_long(params, 16) and R.longrope_uses_long(params, 17)
  short, factor = ours(CASES["longrope_phi3"], seq_len=16)
  long, _ = ours(CASES["longrope_phi3"], seq_len=17)
  assert not np.allclose(short, long)
  assert factor == pytest.approx(np.sqrt(1 + np.log(64 / 16) / np.log(16)))


def test_gemma3_local_and_global_rope_match_transformers():
  config = Gemma3TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_hidden_layers=6, vocab_size=32, rope_theta=1e6, rope_local_base_freq=1e4,
                            rope_scaling={"rope_type": "linear", "factor": 8.0})
  for layer_type in ("sliding_attention", "full_attention"):
    check(config, layer_type=layer_type)
  local = R.rope_parameters(config.to_dict(), "sliding_attention")
  assert (local["rope_type"], local["rope_theta"]) == ("default", 1e4)


def test_nested_rope_needs_a_layer_type():
  config = Gemma3TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_hidden_layers=6, vocab_size=32)
  with pytest.raises(ValueError, match="layer_type"):
    R.rope_parameters(config.to_dict())


def test_old_spelling_is_standardized_like_transformers():
  raw = {"max_position_embeddings": 256, "rope_theta": 5e5, "original_max_position_embeddings": 32,
         "rope_scaling": {"type": "yarn", "factor": 4.0}}
  params = R.rope_parameters(raw)
  assert params == {"type": "yarn", "factor": 4.0, "rope_type": "yarn", "rope_theta": 5e5,
                    "original_max_position_embeddings": 32}


def test_unknown_rope_type_is_refused_by_name():
  with pytest.raises(ValueError, match="rope_type='mrope'.*longrope"):
    R.rope_parameters({"max_position_embeddings": 8, "rope_parameters": {"rope_type": "mrope"}})


def test_longrope_factor_length_is_checked():
  params = dict(R.rope_parameters(CASES["longrope_phi3"].to_dict()), short_factor=[1.0])
  with pytest.raises(ValueError, match="short_factor has 1 entries"):
    R.inverse_frequencies(params, head_dim=16, max_position_embeddings=64)


def _module_cos_sin(module, positions):
  x = torch.zeros(1, dtype=torch.float32)
  cos, sin = module(x, torch.as_tensor(positions))
  return cos.numpy(), sin.numpy()


@pytest.mark.parametrize("length", [12, 40])
def test_phi3_rotary_module_picks_the_factors_by_length(length):
  config = CASES["longrope_phi3"]
  positions = np.arange(length)[None]
  want_cos, want_sin = _module_cos_sin(modeling_phi3.Phi3RotaryEmbedding(config), positions)
  params = R.rope_parameters(config.to_dict())
  cos, sin = R.rope_cos_sin(params, jnp.asarray(positions), head_dim=16, max_position_embeddings=64)
  np.testing.assert_allclose(np.asarray(cos), want_cos, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(sin), want_sin, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [100, 400])
def test_dynamic_rotary_module_matches_in_the_traced_table(length):
  config = CASES["dynamic"]
  positions = np.arange(length)[None]
  want_cos, want_sin = _module_cos_sin(LlamaRotaryEmbedding(config), positions)
  params = R.rope_parameters(config.to_dict())
  cos, sin = R.rope_cos_sin(params, jnp.asarray(positions), head_dim=16, max_position_embeddings=256)
  np.testing.assert_allclose(np.asarray(cos), want_cos, atol=2e-5)
  np.testing.assert_allclose(np.asarray(sin), want_sin, atol=2e-5)


def test_partial_rotary_apply_matches_phi3():
  config = CASES["longrope_phi3"]
  rng = np.random.default_rng(0)
  q = rng.standard_normal((2, 5, 4, 16)).astype(np.float32)  # [B, T, heads, head_dim]
  positions = np.tile(np.arange(5), (2, 1))
  inv, factor = ours(config, seq_len=5)
  cos, sin = R.cos_sin(jnp.asarray(positions), inv, factor)
  got = R.apply_rope(jnp.asarray(q), cos, sin)
  qt = torch.as_tensor(q).transpose(1, 2)
  want, _ = modeling_phi3.apply_rotary_pos_emb(qt, qt, torch.as_tensor(np.asarray(cos)),
                                               torch.as_tensor(np.asarray(sin)))
  np.testing.assert_allclose(np.asarray(got), want.transpose(1, 2).numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(got)[..., 8:], q[..., 8:])

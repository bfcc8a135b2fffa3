"""Splash attention (the Pallas TPU kernel, run here in interpret mode) equals XLA's attention.

Causal, GQA (4 query heads over 2 key/value heads), packed rows with
segment ids, and a Mistral-style sliding window: outputs and gradients
match the XLA path. The kernel works on blocks of 128 tokens, so rows are 128
long. On CPU or GPU the real kernel is refused with the fix.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from attention_doubles import (assert_matches_masked_attention, assert_same_loss_and_lora_grads, packed_batch,
                               random_qkv, tiny_llama, with_lora)
from jlora.models import target_backend
from jlora.models._splash import splash_attention

LENGTHS = (50, 30, 40)  # 120 tokens in a row of 128: three records and padding


def qkv(t=128):
  return random_qkv(1, t)


def test_kernel_equals_masked_attention_with_segments_and_a_window():
  q, k, v = qkv()
  window = 20
  segments = jnp.asarray(np.repeat([[1, 2, 3, 0]], [50, 30, 40, 8], axis=1))

  def splash(q, k, v):
    return splash_attention(q, k, v, segments, window, None, interpret=True)

  assert_matches_masked_attention(splash, q, k, v, segments, window)


@pytest.mark.slow
def test_model_loss_and_lora_gradients_match_xla_on_packed_rows():
  model = with_lora(tiny_llama(model_type="mistral", sliding_window=48, num_hidden_layers=1))
  model.remat = "none"  # one kernel call per pass keeps the interpreted run short
  batch = {k: v[:1] for k, v in packed_batch(LENGTHS, seq_len=128).items()}
  assert_same_loss_and_lora_grads(model, batch, "splash_interpret")


def test_splash_off_tpu_is_refused_with_the_fix():
  model = tiny_llama(attention="splash")
  with pytest.raises(ValueError, match="backend here is 'cpu'.*splash_interpret"):
    model(jnp.ones((1, 128), jnp.int32))


def test_auto_picks_splash_for_tpu_only_when_the_length_fits_its_blocks():
  from jlora.models._attention import resolve

  with target_backend("tpu"):
    assert resolve("auto", jnp.zeros((1, 256, 4, 16))) == "splash"
    assert resolve("auto", jnp.zeros((1, 100, 4, 16))) == "xla"


def test_explicit_splash_on_a_length_off_its_blocks_names_the_fix():
  model = tiny_llama(attention="splash_interpret")
  with pytest.raises(ValueError, match="multiple of 128.*data.seq_len"):
    model(jnp.ones((1, 100), jnp.int32))


def test_a_job_asking_for_splash_off_tpu_fails_before_anything_is_written(tmp_path):
  import jlora

  cfg = jlora.TrainConfig().replace(**{"model.attention": "splash", "output_dir": str(tmp_path / "run")})
  with pytest.raises(ValueError, match="attention='splash'.*attention='auto'"):
    jlora.train(cfg)
  assert not (tmp_path / "run").exists()

"""``scan_unroll``: how many layers run per step of the layer loop; any value gives the same model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from jlora import testing
from jlora.models import CausalLM, Gpt2LMHeadModel, ModelConfig
from jlora.train import ConfigError, load_config
from jlora.train._config import ModelConfig as TrainModelConfig
from jlora.train._model import load_model

LAYERS = 3


def adapted(model_type: str = "llama", remat: str = "matmuls") -> nnx.Module:
  config = ModelConfig(model_type=model_type, vocab_size=32, hidden_size=16, intermediate_size=24,
                       num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4, head_dim=4,
                       max_position_embeddings=64)
  model = (Gpt2LMHeadModel if model_type == "gpt2" else CausalLM)(config, rngs=nnx.Rngs(0), remat=remat)
  jlora.get_peft_model(model, jlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
  testing.randomize_adapters(model)
  return model


def logits_and_grads(model, unroll: int):
  model.scan_unroll = unroll
  ids = testing.token_ids(2, 12, vocab=32)
  graphdef, params, rest = nnx.split(model, jlora.LoraParam, ...)

  @jax.jit
  def loss(params):
    logits = nnx.merge(graphdef, params, rest, copy=True)(ids)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return logits, grads


def assert_close(got, want):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got, want)


@pytest.mark.parametrize("unroll", [2, LAYERS, LAYERS + 5])
def test_unrolled_layer_loop_gives_the_rolled_logits_and_grads(unroll):
  model = adapted()
  want = logits_and_grads(model, 1)
  assert_close(logits_and_grads(model, unroll), want)


def test_unrolled_gpt2_under_full_remat_gives_the_rolled_logits_and_grads():
  model = adapted("gpt2", remat="full")
  want = logits_and_grads(model, 1)
  assert_close(logits_and_grads(model, 2), want)


def test_full_unroll_leaves_no_loop_in_the_forward_pass():
  model = adapted()
  ids = testing.token_ids(1, 8, vocab=32)
  graphdef, state = nnx.split(model)
  hlo = lambda: jax.jit(lambda s: nnx.merge(graphdef, s, copy=True)(ids)).lower(state).as_text()
  model.scan_unroll = 1
  graphdef, state = nnx.split(model)
  assert "while" in hlo()
  model.scan_unroll = LAYERS
  graphdef, state = nnx.split(model)
  assert "while" not in hlo()


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_scan_unroll_is_rejected_with_the_fix(bad):
  with pytest.raises(ValueError, match=r"scan_unroll=.*positive number of layers.*use 1"):
    CausalLM(ModelConfig(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4,
                         max_position_embeddings=8), scan_unroll=bad)


def test_bad_scan_unroll_set_later_is_rejected_before_compiling():
  model = adapted()
  model.scan_unroll = 0
  with pytest.raises(ValueError, match="scan_unroll=0"):
    model(testing.token_ids(1, 4, vocab=32))


def test_train_config_scan_unroll_reaches_the_model():
  model, _ = load_model(TrainModelConfig(name="tiny", scan_unroll=2))
  assert model.scan_unroll == 2


def test_train_config_rejects_a_scan_unroll_below_one():
  with pytest.raises(ConfigError, match=r"model\.scan_unroll must be >= 1, got 0"):
    load_config(None, ["model.scan_unroll=0"])


def test_train_config_scan_unroll_defaults_to_auto_and_takes_auto_or_a_number():
  assert TrainModelConfig().scan_unroll == "auto"
  assert load_config(None, ["model.scan_unroll=auto"]).model.scan_unroll == "auto"
  assert load_config(None, ["model.scan_unroll=4"]).model.scan_unroll == 4
  with pytest.raises(ConfigError, match="model.scan_unroll"):
    load_config(None, ["model.scan_unroll=most"])


def test_an_auto_scan_unroll_loads_rolled_until_the_job_plans_it():
  model, _ = load_model(TrainModelConfig(name="tiny"))
  assert model.scan_unroll == 1

"""Bad input to the model call and the train step: token ids outside the vocabulary are one clear error
naming the vocabulary size, not all-NaN logits or a NaN loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from jlora.models import CausalLM, Gpt2LMHeadModel, ModelConfig
from jlora.train import _steps

VOCAB = 61
SMALL = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=32)
OUTSIDE = r"token ids outside the model's vocabulary \[0, 61\)"


def llama():
  return CausalLM(ModelConfig(model_type="llama", **SMALL), rngs=nnx.Rngs(0))


def gpt2():
  return Gpt2LMHeadModel(ModelConfig(model_type="gpt2", **SMALL), rngs=nnx.Rngs(0))


def ids(bad: int) -> np.ndarray:
  return np.array([[1, 2, bad, 3]], np.int32)


@pytest.mark.parametrize("family", [llama, gpt2])
@pytest.mark.parametrize("bad", [1000, VOCAB, -5])
def test_the_model_call_refuses_ids_outside_the_vocabulary(family, bad):
  with pytest.raises(ValueError, match=rf"{OUTSIDE} \(min -?\d+, max \d+\)"):
    family()(jnp.asarray(ids(bad)))


def test_hidden_refuses_ids_outside_the_vocabulary():
  with pytest.raises(ValueError, match=OUTSIDE):
    llama().hidden(ids(1000))


def test_ids_inside_the_vocabulary_still_run_under_jit():
  model = llama()
  logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids(VOCAB - 1)))
  assert logits.shape == (1, 4, VOCAB) and bool(jnp.isfinite(logits).all())


def train_step_and_state():
  model = jlora.get_peft_model(llama(), jlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
  graphdef, params, rng, frozen = _steps.split_model(model)
  tx = jlora.adapter_optimizer(model, optax.sgd(0.1), params)
  return _steps.make_train_step(graphdef, tx), (params, tx.init(params), rng, frozen)


@pytest.mark.parametrize("as_array", [np.asarray, jnp.asarray], ids=["numpy", "jax"])
def test_the_train_step_refuses_ids_outside_the_vocabulary(as_array):
  step, state = train_step_and_state()
  batch = {"tokens": as_array(ids(1000)), "loss_mask": as_array(np.ones((1, 4), np.int32))}
  with pytest.raises(ValueError, match=rf"batch\['tokens'\] holds {OUTSIDE}"):
    step(*state, batch)


def test_the_train_step_trains_on_ids_inside_the_vocabulary():
  step, state = train_step_and_state()
  batch = {"tokens": ids(VOCAB - 1), "loss_mask": np.ones((1, 4), np.int32)}
  loss = step(*state, batch)[3]
  assert bool(jnp.isfinite(loss))

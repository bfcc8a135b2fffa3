"""The jitted training and evaluation steps."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jlora
from jlora.train import ModelSection
from jlora.train._data import pack
from jlora.train._model import load_model
from jlora.train._steps import make_eval_step, masked_nll, split_model


def right_padded_batch():
  """Two packed rows, the second holding padding after its last token."""
  rows = pack([(list(range(3, 40)), [1] * 37), (list(range(50, 60)), [1] * 10)], seq_len=32, pad_id=0,
              packing=False)
  return {"tokens": jnp.asarray(rows.tokens), "loss_mask": jnp.asarray(rows.loss_mask),
          "attention_mask": jnp.asarray(rows.attention_mask)}


def test_eval_step_loss_equals_the_loss_under_the_padding_mask():
  model, _ = load_model(ModelSection(name="tiny", dtype="float32"))
  jlora.get_peft_model(model, jlora.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
  batch = right_padded_batch()
  assert int(batch["attention_mask"].sum()) < batch["attention_mask"].size  # the batch really pads
  expected_total, expected_count = masked_nll(
      model(batch["tokens"], attention_mask=batch["attention_mask"]), batch["tokens"], batch["loss_mask"])

  graphdef, params, rng, frozen = split_model(model)
  total, count = make_eval_step(graphdef)(params, rng, frozen, batch)

  assert float(count) == float(expected_count)
  np.testing.assert_allclose(float(total), float(expected_total), rtol=1e-6)


def test_masked_nll_is_the_mean_free_sum_of_next_token_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  tokens = rng.integers(0, 7, size=(2, 5))
  loss_mask = np.array([[0, 1, 1, 0, 1], [0, 0, 1, 1, 1]])
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -sum(logp[b, t - 1, tokens[b, t]] for b in range(2) for t in range(1, 5) if loss_mask[b, t])

  total, count = masked_nll(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(loss_mask))

  assert float(count) == loss_mask[:, 1:].sum()
  np.testing.assert_allclose(float(total), expected, rtol=1e-6)


def test_every_remat_policy_gives_the_same_gradients():
  model, _ = load_model(ModelSection(name="tiny", dtype="float32"))
  jlora.get_peft_model(model, jlora.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
  batch = right_padded_batch()

  def grads(remat):
    model.remat = remat
    graphdef, params, rest = nnx.split(model, jlora.LoraParam, ...)

    def loss(p):
      logits = nnx.merge(graphdef, p, rest, copy=True)(batch["tokens"])
      return masked_nll(logits, batch["tokens"], batch["loss_mask"])[0]

    return jax.grad(loss)(params)

  reference = grads("none")
  for remat in ("matmuls", "full"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads(remat), reference)

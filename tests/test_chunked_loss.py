"""The chunked cross-entropy equals the one-pass loss, in value and in gradients, without [tokens, vocab] logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from attention_doubles import packed_batch, tiny_gpt2, tiny_llama, with_lora
from jlora.nn import LoraParam
from jlora.train._steps import batch_nll, split_model

LENGTHS = (9, 14, 6, 11, 8)  # 48 tokens: two rows of 24


def loss_and_grads(model, batch, chunk):
  graphdef, params, rng, frozen = split_model(model)

  def loss(p):
    total, count = batch_nll(nnx.merge(graphdef, p, rng, frozen, copy=True), batch, chunk)
    return total / count, count

  return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.mark.parametrize("build", [tiny_llama, lambda: tiny_llama(tie_word_embeddings=True), tiny_gpt2],
                         ids=["lm_head", "tied", "gpt2"])
@pytest.mark.parametrize("chunk", [10, 16])  # 5 or 8 tokens of each of the 2 rows; 5 leaves a padded chunk
def test_chunked_loss_and_gradients_equal_the_one_pass_loss(build, chunk):
  model = with_lora(build())  # adapters on the output head or the tied embedding too
  batch = packed_batch(LENGTHS, seq_len=24)
  (loss, count), grads = loss_and_grads(model, batch, 0)
  (chunked_loss, chunked_count), chunked_grads = loss_and_grads(model, batch, chunk)
  assert float(chunked_count) == float(count)
  np.testing.assert_allclose(float(chunked_loss), float(loss), rtol=1e-6)
  for g, cg in zip(jax.tree.leaves(grads), jax.tree.leaves(chunked_grads)):
    np.testing.assert_allclose(cg, g, rtol=2e-5, atol=1e-7)


def test_chunked_loss_never_holds_the_full_logits():
  model = tiny_llama(vocab_size=4096)
  batch = packed_batch((40, 50, 30, 72), seq_len=96)  # 192 tokens x 4096 vocab
  graphdef, params, rng, frozen = split_model(with_lora(model))

  def grad_of(chunk):
    def loss(p):
      total, count = batch_nll(nnx.merge(graphdef, p, rng, frozen, copy=True), batch, chunk)
      return total / count
    return jax.jit(jax.grad(loss)).lower(params).as_text()

  one_pass, chunked = grad_of(0), grad_of(32)
  assert "2x96x4096xf32" in one_pass
  assert "96x4096" not in chunked and "2x16x4096xf32" in chunked  # 32 tokens: 16 of each row


def test_dropout_on_the_head_still_trains_under_chunking():
  model = tiny_llama()
  jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["lm_head"], lora_dropout=0.5,
                                               init_lora_weights=False))
  batch = packed_batch(LENGTHS, seq_len=24)
  (_, _), grads = loss_and_grads(model, batch, 8)
  assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in jax.tree.leaves(nnx.state(grads, LoraParam)))

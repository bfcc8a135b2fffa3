"""The train step and the generate step lower for TPU, with TPU attention selected, on a CPU machine.

``jax.export(..., platforms=["tpu"])`` traces and lowers both steps to
StableHLO for TPU inside ``jlora.models.target_backend("tpu")``, where
``attention="auto"`` picks splash attention. Anything that cannot lower for
TPU fails here. What this cannot check: the Pallas kernels are lowered to
Mosaic MLIR and embedded (a ``tpu_custom_call``), but Mosaic compiles them to
TPU code only on a TPU, so block-shape or VMEM limits that only Mosaic's
compiler enforces are not exercised; neither is XLA's TPU compiler (layouts,
memory fit). The generate step uses XLA's attention (its queries are a
cache slot at a time), so it holds no Pallas kernel.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attention_doubles import packed_batch, tiny_llama, with_lora
from jlora.models import target_backend
from jlora.models._generate import _generate
from jlora.train._steps import make_train_step, split_model


@pytest.fixture(scope="module")
def model():
  return with_lora(tiny_llama(dtype=jnp.bfloat16, head_dim=128, num_attention_heads=2))


def test_train_step_lowers_for_tpu_with_splash_attention_and_the_chunked_loss(model):
  graphdef, params, rng, frozen = split_model(model)
  tx = optax.adamw(1e-3)
  step = make_train_step(graphdef, tx, loss_chunk_tokens=64)
  batch = packed_batch((100, 80, 60), seq_len=128)
  with target_backend("tpu"):
    exported = jax.export.export(step, platforms=["tpu"])(params, tx.init(params), rng, frozen, batch)
  text = exported.mlir_module()
  assert exported.platforms == ("tpu",)
  assert text.count("tpu_custom_call") >= 3  # splash attention: forward, dq and dkv kernels
  assert "tensor<2x32x61x" in text  # the loss's logits, one chunk of 64 tokens (32 of each row) at a time


def test_generate_step_lowers_for_tpu(model):
  graphdef, state = nnx.split(model)
  ids = jnp.ones((2, 16), jnp.int32)
  with target_backend("tpu"):
    exported = jax.export.export(_generate, platforms=["tpu"])(
        graphdef, state, ids, jnp.ones_like(ids), jax.random.key(0), max_new_tokens=4, temperature=0.0,
        top_p=1.0, eos_token_id=None, cached=True)
  assert exported.platforms == ("tpu",)
  assert np.prod(exported.out_avals[0].shape) == 2 * 20

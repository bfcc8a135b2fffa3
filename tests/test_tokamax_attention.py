"""tokamax attention (``attention="tokamax"`` / ``"tokamax_xla"``) equals XLA's attention.

On CPU the Mosaic GPU kernel cannot run, so these tests drive tokamax's XLA
reference through the same op, mask and custom VJP the kernel uses
(``"tokamax_xla"``): causal, GQA (4 query heads over 2 key/value heads),
packed rows (segment ids become each query's first visible key) and a
sliding window; outputs, gradients and a model's loss and LoRA gradients
match the XLA path. The ``"matmuls"`` remat policy keeps tokamax's attention
instead of recomputing it. Off GPU, or without tokamax, the kernel is refused
with the fix.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tokamax")

from attention_doubles import (assert_matches_masked_attention, assert_same_loss_and_lora_grads,  # noqa: E402
                               packed_batch, random_qkv, tiny_llama, with_lora)
from jlora.models import check_attention  # noqa: E402
from jlora.models import _tokamax  # noqa: E402
from jlora.models._remat import save_matmuls_and_attention  # noqa: E402
from jlora.models._tokamax import key_start, tokamax_attention  # noqa: E402

SEGMENTS = np.repeat([[1, 2, 3, 0]], [20, 12, 16, 8], axis=1)  # three records and padding in a row of 56


def qkv(t=56):
  return random_qkv(2, t)

def test_key_start_is_the_record_start_raised_by_the_window():
  segments = jnp.asarray([[1, 1, 1, 2, 2, 0]])
  np.testing.assert_array_equal(key_start(segments, None, 6), [[0, 0, 0, 3, 3, 5]])
  np.testing.assert_array_equal(key_start(segments, 2, 6), [[0, 0, 1, 3, 3, 5]])
  np.testing.assert_array_equal(key_start(None, 2, 6), [[0, 0, 1, 2, 3, 4]])
  assert key_start(None, None, 6) is None


@pytest.mark.parametrize("window", [None, 10])
@pytest.mark.parametrize("packed", [False, True])
def test_outputs_and_gradients_equal_masked_attention(packed, window):
  q, k, v = qkv()
  segments = jnp.asarray(np.repeat(SEGMENTS, 2, axis=0)) if packed else None

  def tokamax(q, k, v):
    return tokamax_attention(q, k, v, segments, window, None, implementation="xla")

  assert_matches_masked_attention(tokamax, q, k, v, segments, window)


@pytest.mark.slow
def test_model_loss_and_lora_gradients_match_xla_on_packed_rows():
  model = with_lora(tiny_llama(model_type="mistral", sliding_window=24, num_hidden_layers=1))
  batch = packed_batch((30, 20, 25, 40), seq_len=64)
  assert_same_loss_and_lora_grads(model, batch, "tokamax_xla")


def test_matmuls_policy_keeps_the_attention_forward_for_the_backward_pass():
  q, k, v = qkv()

  def layer(q, k, v):
    return jnp.sum(jnp.sin(tokamax_attention(q, k, v, None, None, None, implementation="xla")))

  def forward_runs(policy):
    jaxpr = str(jax.make_jaxpr(jax.grad(jax.checkpoint(layer, policy=policy), argnums=(0, 1, 2)))(q, k, v))
    return jaxpr.count("remat_opt") + jaxpr.count("closed_call")

  assert forward_runs(save_matmuls_and_attention) == 1
  assert forward_runs(jax.checkpoint_policies.nothing_saveable) == 2  # the policy is what saves it


def test_tokamax_off_gpu_is_refused_with_the_fix():
  model = tiny_llama(attention="tokamax")
  with pytest.raises(ValueError, match="backend here is 'cpu'.*tokamax_xla"):
    model(jnp.ones((1, 16), jnp.int32))


def test_kernel_refuses_float32_activations_with_the_fix():
  q, k, v = qkv()
  with pytest.raises(ValueError, match="bf16/fp16.*dtype bfloat16"):
    tokamax_attention(q, k, v, None, None, None, implementation="mosaic")


def test_missing_tokamax_is_refused_with_the_install_command(monkeypatch):
  monkeypatch.setattr(_tokamax, "available", lambda: False)
  with pytest.raises(ValueError, match=r"pip install 'jlora\[tokamax\]'"):
    check_attention("tokamax_xla", for_backend=True)


def test_kernels_under_a_jax_they_do_not_build_with_are_refused_with_the_fix(monkeypatch):
  from jax.experimental.pallas import mosaic_gpu as plgpu

  monkeypatch.setattr(plgpu, "kernel", lambda body=None, *, out_type=None, **mesh: None)  # jax >= 0.11's form
  with pytest.raises(ValueError, match="cannot run with jax.*attention='auto'"):
    _tokamax.require("tokamax")


def test_tokamax_xla_needs_no_kernels(monkeypatch):
  from jax.experimental.pallas import mosaic_gpu as plgpu

  monkeypatch.setattr(plgpu, "kernel", lambda body=None, *, out_type=None, **mesh: None)
  _tokamax.require("tokamax_xla")


@pytest.mark.slow
def test_kernel_path_lowers_to_mosaic_gpu_kernels_for_packed_rows(monkeypatch):
  from tokamax._src import config, gpu_utils

  monkeypatch.setattr(gpu_utils, "is_sm90", lambda device=None: True)  # lower for an H100 from this CPU
  monkeypatch.setattr(gpu_utils, "is_sm100", lambda device=None: False)
  q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
  segments = jnp.asarray(np.tile(np.repeat([1, 2, 3], [100, 100, 56]), (2, 1)))

  def loss(q, k, v):
    return jnp.sum(tokamax_attention(q, k, v, segments, 64, None, implementation="mosaic").astype(jnp.float32))

  with config.cross_compile(True):
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
  assert hlo.count("stablehlo.custom_call @mosaic_gpu") == 3  # forward, dq and dk/dv kernels

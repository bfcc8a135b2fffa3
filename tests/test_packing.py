"""Packed rows: segment ids keep records apart in attention, positions and the loss.

The spec is PEFT / Hugging Face semantics: each record is an independent
sequence, so a packed row's loss is the sum of its records' losses computed
one at a time.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_doubles import (assert_matches_masked_attention, packed_batch, random_qkv, records, single_batches,
                               tiny_gpt2, tiny_llama, with_lora)
from jlora.models._attention import (AttentionMask, attend, cudnn_packed_layout, dense_segment_attention,
                                     segment_offsets, segment_overflow, segment_positions, target_backend)
from jlora.train._data import pack, segment_bound
from jlora.train._loss import shifted_targets
from jlora.train._steps import batch_nll

LENGTHS = (7, 5, 9)  # 21 tokens: one row of 24 with 3 pads


def test_pack_numbers_records_per_row_and_zeroes_padding():
  rows = pack(records((3, 4, 3)), seq_len=6, pad_id=0)
  np.testing.assert_array_equal(rows.segment_ids, [[1, 1, 1, 2, 2, 2], [1, 2, 2, 2, 0, 0]])


def test_unpacked_rows_are_one_segment_each():
  rows = pack(records((3, 5)), seq_len=4, pad_id=0, packing=False)
  np.testing.assert_array_equal(rows.segment_ids, [[1, 1, 1, 0], [1, 1, 1, 1]])


def test_positions_restart_at_every_segment():
  np.testing.assert_array_equal(segment_positions(jnp.array([[1, 1, 1, 2, 2, 0, 0]])), [[0, 1, 2, 0, 1, 0, 1]])


def test_the_last_token_of_a_record_predicts_nothing():
  tokens = jnp.arange(6)[None]
  _, weights = shifted_targets(tokens, jnp.ones((1, 6), jnp.int32), jnp.array([[1, 1, 1, 2, 2, 2]]))
  np.testing.assert_array_equal(weights, [[1, 1, 0, 1, 1, 0]])


def test_cudnn_segment_layout_covers_every_token_padding_included():
  offsets, lengths = segment_offsets(jnp.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]]))
  np.testing.assert_array_equal(offsets, [[0, 2, 5, -1, -1, -1, -1], [0, -1, -1, -1, -1, -1, -1]])
  np.testing.assert_array_equal(lengths, [[2, 3, 1, -1, -1, -1], [6, -1, -1, -1, -1, -1]])


def test_cudnn_segment_layout_has_room_for_max_segments_runs():
  offsets, lengths = segment_offsets(jnp.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]]), max_segments=3)
  np.testing.assert_array_equal(offsets, [[0, 2, 5, -1], [0, -1, -1, -1]])
  np.testing.assert_array_equal(lengths, [[2, 3, 1], [6, -1, -1]])


def test_a_row_with_more_runs_than_the_bound_is_an_overflow():
  segments = jnp.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])  # 3 runs, then 1
  assert bool(segment_overflow(segments, 2))
  assert not bool(segment_overflow(segments, 3))


@pytest.mark.parametrize("max_segments, layout", [(8, "ragged"), (16, "ragged"), (32, "dense"), (None, "dense")])
def test_cudnn_takes_its_packed_layout_only_for_a_small_known_bound(max_segments, layout):
  assert cudnn_packed_layout(max_segments) == layout


@pytest.mark.parametrize("window", [None, 3])
def test_dense_segment_mask_attention_equals_masked_attention(window):
  q, k, v = random_qkv(2, 12)
  segments = jnp.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])
  assert_matches_masked_attention(
      lambda q, k, v: dense_segment_attention(q, k, v, segments, window, None, implementation="xla"),
      q, k, v, segments, window)


@pytest.fixture
def hopper_cudnn(monkeypatch):
  """Let jax trace cuDNN attention on this CPU as if for an H100 with cuDNN 9.10."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn

  monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda capability: False)


def cudnn_training_statistics(max_segments) -> set[str]:
  """Shapes of the float32 softmax statistics cuDNN's forward hands its backward, from the CUDA lowering."""
  q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
  segments = jax.ShapeDtypeStruct((2, 256), jnp.int32)

  def loss(q, k, v, segments):
    mask = AttentionMask(segment_ids=segments, implementation="cudnn", max_segments=max_segments)
    return attend(q, k, v, mask).astype(jnp.float32).sum()

  with target_backend("gpu"):
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, segments).lower(
        lowering_platforms=("cuda",)).as_text()
  calls = [line for line in text.splitlines() if "custom_call" in line and "cudnn" in line]
  return {shape for line in calls for shape in re.findall(r"tensor<(\d+x\d+x\d+)xf32>", line)}


def test_cudnn_packed_layout_is_sized_by_the_record_bound_not_the_row_length(hopper_cudnn):
  assert cudnn_training_statistics(max_segments=4) == {"8x4x256"}  # [B * 4 records, heads, T]


def test_cudnn_without_a_record_bound_keeps_unpacked_statistics(hopper_cudnn):
  assert cudnn_training_statistics(max_segments=None) == {"2x4x256"}  # [B, heads, T]: the dense mask


def test_segment_bound_counts_padding_as_a_run_and_rounds_up_to_a_power_of_two():
  assert segment_bound(np.array([[1, 1, 1, 1]])) == 1
  assert segment_bound(np.array([[1, 2, 0, 0], [1, 1, 1, 1]])) == 4  # 3 runs
  assert segment_bound(np.array([[1, 2, 3, 4]])) == 4


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama-gqa", "gpt2"])
def test_packed_row_loss_is_the_sum_of_its_records_losses(build):
  model = with_lora(build())
  total, count = batch_nll(model, packed_batch(LENGTHS, seq_len=24))
  alone = [batch_nll(model, b) for b in single_batches(LENGTHS)]
  assert float(count) == sum(float(c) for _, c in alone) == sum(n - 2 for n in LENGTHS)
  np.testing.assert_allclose(float(total), sum(float(t) for t, _ in alone), rtol=1e-5)


def test_a_record_in_a_packed_row_has_the_logits_it_has_alone():
  model = tiny_llama()
  batch = packed_batch(LENGTHS, seq_len=24)
  packed = model(batch["tokens"], segment_ids=batch["segment_ids"])
  second = single_batches(LENGTHS)[1]
  np.testing.assert_allclose(packed[:, 7:12], model(second["tokens"]), atol=1e-5)


def test_segment_ids_with_a_padding_mask_match_the_unmasked_call():
  model = tiny_llama()
  batch = packed_batch(LENGTHS, seq_len=24)
  plain = model(batch["tokens"], segment_ids=batch["segment_ids"])
  masked = model(batch["tokens"], segment_ids=batch["segment_ids"], attention_mask=batch["attention_mask"])
  np.testing.assert_allclose(masked[:, :21], plain[:, :21], atol=1e-5)


def test_segment_ids_with_a_cache_is_an_error():
  from jlora.models import KVCache

  model = tiny_llama()
  cache = KVCache.zeros(model.config, 1, 8, jnp.float32)
  with pytest.raises(ValueError, match="segment_ids.*KV cache"):
    model(jnp.ones((1, 4), jnp.int32), segment_ids=jnp.ones((1, 4), jnp.int32), cache=cache)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's packed layout needs an NVIDIA GPU (Hopper+)")
@pytest.mark.parametrize("max_segments", [4, None], ids=["ragged", "dense"])
def test_cudnn_packed_attention_matches_xla_on_gpu(max_segments):
  model = tiny_llama(head_dim=64, dtype=jnp.bfloat16)
  model.max_segments = max_segments
  batch = packed_batch((100, 60, 90), seq_len=256)
  outs = {}
  for impl in ("cudnn", "xla"):
    model.attention = impl
    outs[impl] = np.asarray(model.hidden(batch["tokens"], segment_ids=batch["segment_ids"]), np.float32)
  np.testing.assert_allclose(outs["cudnn"][:, :250], outs["xla"][:, :250], atol=2e-2)

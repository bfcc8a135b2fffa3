"""Causal-LM cross-entropy: next-token targets within each record, whole or chunked over tokens.

Position ``t - 1`` predicts token ``t``. In a packed row the first token of
a record is not predicted from the record before it (each record is its own
sequence, as in PEFT / Hugging Face training), so ``segment_ids`` zero those
targets' weights. ``chunked_nll`` computes the same sums without ever
holding the ``[tokens, vocab]`` logits: it runs the output head over chunks
of tokens in a ``lax.scan`` whose backward pass recomputes each chunk's
logits (the usual trick for 128k vocabularies).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jlora.nn import LoraRngKey


def shifted_targets(tokens: jax.Array, loss_mask: jax.Array,
                    segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """``(targets, weights)`` ``[B, T]``: what position ``t`` predicts (token ``t + 1``) and whether it counts.

  The last position predicts nothing; with ``segment_ids`` neither does the
  last position of a record (its target opens the next record).
  """
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  weights = loss_mask[:, 1:].astype(jnp.float32)
  if segment_ids is not None:
    weights = weights * (segment_ids[:, 1:] == segment_ids[:, :-1])
  return targets, jnp.pad(weights, ((0, 0), (0, 1)))


def nll_sum(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """``sum(weights * -log softmax(logits)[targets])`` in float32; logits ``[..., V]``.

  Written as reductions over the logits (no materialised log-softmax) so XLA
  fuses the float32 upcast into them.
  """
  logits = logits.astype(jnp.float32)
  vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
  target_logit = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
  return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logit) * weights)


def masked_nll(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """``(sum of -log p(token t | < t) over masked t, number of masked t)`` in float32.

  logits ``[B, T, V]``, tokens, loss_mask and segment_ids ``[B, T]``;
  ``loss_mask[:, 0]`` and (with segment ids) each record's first token are
  ignored: nothing in the record predicts them.
  """
  targets, weights = shifted_targets(tokens, loss_mask, segment_ids)
  return nll_sum(logits, targets, weights), jnp.sum(weights)


def chunked_nll(model: nnx.Module, hidden: jax.Array, tokens: jax.Array, loss_mask: jax.Array,
                segment_ids: jax.Array | None, chunk_tokens: int) -> tuple[jax.Array, jax.Array]:
  """``masked_nll(model.head(hidden), ...)`` computed about ``chunk_tokens`` tokens at a time.

  ``hidden [B, T, d]`` are the model's final hidden states (``model.hidden``);
  ``model.head`` (with any adapter on the output head or tied embedding) maps
  a chunk to its logits. A chunk is ``[B, chunk_tokens // B, d]``: a slice of
  the sequence of every row, so a batch split over devices stays split and
  each device holds its rows' share of one chunk's logits instead of
  ``[B, T, V]``. The backward pass recomputes each chunk's logits. LoRA
  dropout keys advance as in one unchunked call.
  """
  targets, weights = shifted_targets(tokens, loss_mask, segment_ids)
  b, t = targets.shape
  width = min(t, max(1, chunk_tokens // b))
  pad = -t % width

  def chunks(x):  # [B, T, ...] -> [T / width, B, width, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, -1, width, *x.shape[2:]), 1, 0)

  graphdef, rng, rest = nnx.split(model, LoraRngKey, ...)

  @jax.checkpoint
  def body(carry, xs):
    total, rng = carry
    h, t, w = xs
    module = nnx.merge(graphdef, rng, rest, copy=True)
    total = total + nll_sum(module.head(h), t, w)
    return (total, nnx.state(module, LoraRngKey)), None

  (total, rng), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), rng),
                                 (chunks(hidden), chunks(targets), chunks(weights)))
  nnx.update(model, rng)
  return total, jnp.sum(weights)

"""The jitted pieces of training: the batch loss, optimizer, train and eval steps.

The model is split once into ``(graphdef, params, rng, frozen)``: ``params`` are
the ``LoraParam`` arrays (the only thing differentiated), ``rng`` the LoRA
dropout counters (they advance every step), ``frozen`` everything else (the
base model). Steps are pure functions of those pytrees.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jlora.models import LanguageModel, check_token_ids, placed
from jlora.nn import LoraParam, LoraRngKey
from jlora.train._loss import chunked_nll, masked_nll
from jlora.train._model import vocab_size
from jlora.train._optimizer import adapter_optimizer
from jlora.train._sharding import placement


class Parts(NamedTuple):
  graphdef: nnx.GraphDef
  params: nnx.State
  rng: nnx.State
  frozen: nnx.State


def split_model(model: nnx.Module) -> Parts:
  """``model`` as ``(graphdef, LoraParam state, LoraRngKey state, the rest)``."""
  return Parts(*nnx.split(model, LoraParam, LoraRngKey, ...))


def lr_schedule(learning_rate: float, steps: int, warmup_steps: int, end_lr_ratio: float) -> optax.Schedule:
  """Linear warmup from 0 then cosine decay to ``learning_rate * end_lr_ratio``; ``schedule(k)`` is update ``k+1``'s rate."""
  warmup = min(warmup_steps, max(steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else learning_rate, peak_value=learning_rate, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=learning_rate * end_lr_ratio)


def make_optimizer(model: nnx.Module, params: nnx.State, *, learning_rate: float, steps: int,
                   warmup_steps: int, end_lr_ratio: float, weight_decay: float, b1: float, b2: float,
                   grad_clip: float, grad_accum: int, loraplus_lr_ratio: float | None = None,
                   loraplus_lr_embedding: float = 1e-6) -> optax.GradientTransformation:
  """AdamW on a warmup-then-cosine schedule with global-norm clipping, every ``grad_accum`` micro-steps.

  Only trainable adapter params get state (``jlora.adapter_optimizer``, which also applies
  LoRA+ when ``loraplus_lr_ratio`` is set).
  """
  schedule = lr_schedule(learning_rate, steps, warmup_steps, end_lr_ratio)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
  tx = adapter_optimizer(model, optax.chain(*parts), params, loraplus_lr_ratio=loraplus_lr_ratio,
                         learning_rate=learning_rate, loraplus_lr_embedding=loraplus_lr_embedding)
  return optax.MultiSteps(tx, every_k_schedule=grad_accum) if grad_accum > 1 else tx


def _call(model: nnx.Module, fn: Callable, batch: dict[str, jax.Array]) -> jax.Array:
  """``fn(tokens)`` (``model`` or its ``hidden``) of a training batch under causal attention within each record.

  Training rows are right-padded (``pack`` puts every token before any pad),
  so a query that carries loss never sees a pad key under the causal mask:
  no ``attention_mask`` is passed, which keeps the fused attention kernels.
  ``segment_ids`` go along when the batch has them and the model is a
  ``jlora.models.LanguageModel`` (a custom model attends across records,
  though the loss still never predicts one record from another).
  """
  segments = batch.get("segment_ids")
  if segments is not None and isinstance(model, LanguageModel):
    return fn(batch["tokens"], attention_mask=None, segment_ids=segments)
  return fn(batch["tokens"], attention_mask=None)


def batch_nll(model: nnx.Module, batch: dict[str, jax.Array], loss_chunk_tokens: int = 0):
  """``(sum nll, trained tokens)`` of a batch; the head runs in chunks of ``loss_chunk_tokens`` tokens.

  Chunking applies when the model is a ``jlora.models.LanguageModel`` (it
  has ``hidden`` / ``head``) and the batch holds more than one chunk of
  tokens; ``0`` turns it off.
  """
  tokens, loss_mask, segments = batch["tokens"], batch["loss_mask"], batch.get("segment_ids")
  if 0 < loss_chunk_tokens < tokens.size and isinstance(model, LanguageModel):
    return chunked_nll(model, _call(model, model.hidden, batch), tokens, loss_mask, segments, loss_chunk_tokens)
  return masked_nll(_call(model, model, batch), tokens, loss_mask, segments)


def _forward(graphdef, params, rng, frozen, batch, loss_chunk_tokens):
  model = nnx.merge(graphdef, params, rng, frozen, copy=True)
  total, count = batch_nll(model, batch, loss_chunk_tokens)
  return total, count, nnx.state(model, LoraRngKey)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    loss_chunk_tokens: int = 0, mesh=None, stats: bool = False) -> Callable:
  """The jitted step ``jlora.train`` runs, for loops of your own.

  ``step(params, opt_state, rng, frozen, batch) -> (params, opt_state, rng, loss, tokens)``:
  ``graphdef, params, rng, frozen = split_model(model)``; ``tx`` from
  ``make_optimizer`` (or any optax transformation over ``params``, masked
  with ``adapter_optimizer``) and ``opt_state = tx.init(params)``; ``batch``
  a dict of ``tokens``, ``loss_mask``, ``attention_mask`` and (packed rows)
  ``segment_ids``, each ``[B, T]`` int. ``loss_chunk_tokens`` runs the output
  head that many tokens at a time (``batch_nll``). Returns the updated states, the mean masked next-token loss and the
  number of trained tokens; with ``stats=True`` the last output is instead a dict of
  ``trained_tokens``, ``tokens`` (every non-padding token of the batch) and
  ``grad_norm`` (the global norm of the gradient). Write the result back with
  ``nnx.update(model, params, rng)``. Arrays keep the shardings they come in
  with (``shard_state`` / ``put_batch`` place them on a mesh); pass that
  ``mesh`` so the model is traced under its placement
  (``_sharding.MeshPlacement``: activations split over the batch axes,
  scanned layers' weights gathered one layer at a time). Nothing is donated: adapter-sized state is
  small, WLoRA upstreams may share buffers, and async checkpoints still
  read the previous step's arrays.
  """

  where = placement(mesh)

  def train_step(params, opt_state, rng, frozen, batch):
    def loss_fn(p):
      total, count, new_rng = _forward(graphdef, p, rng, frozen, batch, loss_chunk_tokens)
      return total / jnp.maximum(count, 1.0), (count, new_rng)

    with placed(where):
      (loss, (count, new_rng)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    if stats:
      count = {"trained_tokens": count, "tokens": jnp.sum(batch["attention_mask"]),
               "grad_norm": optax.global_norm(grads)}
    return optax.apply_updates(params, updates), opt_state, new_rng, loss, count

  return CheckedStep(jax.jit(train_step), graphdef, lambda args: (args[0], args[2], args[3]))


def make_eval_step(graphdef: nnx.GraphDef, loss_chunk_tokens: int = 0, mesh=None) -> Callable:
  """``(params, rng, frozen, batch) -> (sum nll, trained tokens)``, jitted; dropout off; ``mesh`` as above."""
  where = placement(mesh)

  def eval_step(params, rng, frozen, batch):
    model = nnx.merge(graphdef, params, rng, frozen, copy=True)
    model.eval()
    with placed(where):
      return batch_nll(model, batch, loss_chunk_tokens)

  return CheckedStep(jax.jit(eval_step), graphdef, lambda args: args[:3])


class CheckedStep:
  """A jitted step whose batch's ``tokens`` are checked on the host before each call.

  Ids outside the model's vocabulary would make the embedding lookup return
  NaN rows (a NaN loss, NaN updates); here they are a ``ValueError`` naming
  the vocabulary size. The vocabulary is read once from the model's
  ``config.vocab_size`` (models without one are not checked). ``lower``,
  ``trace`` and everything else are the jitted function's.
  """

  def __init__(self, jitted: Callable, graphdef: nnx.GraphDef, states: Callable):
    self._jitted, self._graphdef, self._states = jitted, graphdef, states
    self._vocab: list = []  # found on the first call with concrete tokens

  def __call__(self, *args):
    tokens = args[-1]["tokens"]
    if not isinstance(tokens, jax.core.Tracer):
      if not self._vocab:
        self._vocab.append(vocab_size(nnx.merge(self._graphdef, *self._states(args))))
      check_token_ids(tokens, self._vocab[0], "batch['tokens']")
    return self._jitted(*args)

  def __getattr__(self, name):
    return getattr(self._jitted, name)

  def trace(self, *args, **kwargs):
    return self._jitted.trace(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return self._jitted.lower(*args, **kwargs)

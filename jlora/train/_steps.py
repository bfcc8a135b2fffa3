"""The jitted pieces of training: masked causal-LM loss, optimizer, train and eval steps.

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

from jlora.models._remat import placed
from jlora.nn import LoraParam
from jlora.nn._variables import LoraRngKey
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


def masked_nll(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(sum of -log p(token t | < t) over masked t, number of masked t)`` in float32.

  logits ``[B, T, V]``, tokens and loss_mask ``[B, T]``; position ``t-1``
  predicts token ``t``, so ``loss_mask[:, 0]`` is ignored. Written as
  reductions over the full logits (no ``[B, T-1, V]`` slice, no materialised
  log-softmax) so XLA fuses the float32 upcast into them: the loss adds no
  logits-sized buffer beyond the logits' gradient.
  """
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  weights = jnp.pad(loss_mask[:, 1:], ((0, 0), (0, 1))).astype(jnp.float32)
  logits = logits.astype(jnp.float32)
  vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
  target_logit = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
  return jnp.sum(nll * weights), jnp.sum(weights)


def make_optimizer(model: nnx.Module, params: nnx.State, *, learning_rate: float, steps: int,
                   warmup_steps: int, end_lr_ratio: float, weight_decay: float, b1: float, b2: float,
                   grad_clip: float, grad_accum: int) -> optax.GradientTransformation:
  """AdamW on a warmup-then-cosine schedule with global-norm clipping, every ``grad_accum`` micro-steps.

  Only trainable adapter params get state (``jlora.adapter_optimizer``).
  """
  warmup = min(warmup_steps, max(steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else learning_rate, peak_value=learning_rate, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=learning_rate * end_lr_ratio)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
  tx = adapter_optimizer(model, optax.chain(*parts), params)
  return optax.MultiSteps(tx, every_k_schedule=grad_accum) if grad_accum > 1 else tx


def _logits(model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
  """Logits ``[B, T, V]`` of a training batch, under plain causal attention.

  Training rows are right-padded (``pack`` puts every token before any pad),
  so a query that carries loss never sees a pad key under the causal mask:
  dropping ``attention_mask`` changes no trained logit and lets GPUs run
  cuDNN's fused causal attention instead of a materialised ``[T, T]`` mask.
  """
  return model(batch["tokens"], attention_mask=None)


def _forward(graphdef, params, rng, frozen, batch):
  model = nnx.merge(graphdef, params, rng, frozen, copy=True)
  logits = _logits(model, batch)
  total, count = masked_nll(logits, batch["tokens"], batch["loss_mask"])
  return total, count, nnx.state(model, LoraRngKey)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, mesh=None) -> Callable:
  """The jitted step ``jlora.train`` runs, for loops of your own.

  ``step(params, opt_state, rng, frozen, batch) -> (params, opt_state, rng, loss, tokens)``:
  ``graphdef, params, rng, frozen = split_model(model)``; ``tx`` from
  ``make_optimizer`` (or any optax transformation over ``params``, masked
  with ``adapter_optimizer``) and ``opt_state = tx.init(params)``; ``batch``
  a dict of ``tokens``, ``loss_mask`` and ``attention_mask``, each ``[B, T]``
  int. Returns the updated states, the mean masked next-token loss and the
  number of trained tokens. Write the result back with
  ``nnx.update(model, params, rng)``. Arrays keep the shardings they come in
  with (``shard_state`` / ``put_batch`` place them on a mesh); pass that
  ``mesh`` so the model is traced under its placement
  (``_sharding.MeshPlacement``: activations split over the batch axes,
  scanned layers' weights gathered one layer at a time). Nothing is donated: adapter-sized state is
  small, WLoRA upstreams may share buffers, and async checkpoints still
  read the previous step's arrays.
  """

  where = placement(mesh)

  def step(params, opt_state, rng, frozen, batch):
    def loss_fn(p):
      total, count, new_rng = _forward(graphdef, p, rng, frozen, batch)
      return total / jnp.maximum(count, 1.0), (count, new_rng)

    with placed(where):
      (loss, (count, new_rng)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, new_rng, loss, count

  return jax.jit(step)


def make_eval_step(graphdef: nnx.GraphDef, mesh=None) -> Callable:
  """``(params, rng, frozen, batch) -> (sum nll, trained tokens)``, jitted; dropout off; ``mesh`` as above."""
  where = placement(mesh)

  def step(params, rng, frozen, batch):
    model = nnx.merge(graphdef, params, rng, frozen, copy=True)
    model.eval()
    with placed(where):
      logits = _logits(model, batch)
    return masked_nll(logits, batch["tokens"], batch["loss_mask"])

  return jax.jit(step)

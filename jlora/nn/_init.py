"""Initialisers for adapter factors, matching PEFT's conventions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def kaiming_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype=jnp.float32) -> jax.Array:
  """torch's ``kaiming_uniform_(w, a=sqrt(5))``: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

  This is the default init of torch's ``nn.Linear`` and the one PEFT uses for
  LoRA A and for MoSLoRA's Kaiming mixer.
  """
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def orthogonal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """Orthogonal square matrices ``[..., r, r]`` with ``MᵀM = I``, each one on its own.

  (``jax.nn.initializers.orthogonal`` on ``[L, r, r]`` would orthogonalise one
  ``[L·r, r]`` matrix instead, so the leading dims get a key each.)
  """
  *stack, rows, cols = shape
  init = jax.nn.initializers.orthogonal()
  keys = jax.random.split(key, math.prod(stack))
  mats = jax.vmap(lambda k: init(k, (rows, cols), dtype))(keys)
  return mats.reshape(shape)


def lora_factors(
    key: jax.Array,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    fan_in: int,
    mode,
    dtype,
    *,
    embedding: bool,
) -> tuple[jax.Array, jax.Array]:
  """Initial (A, B) for one adapter; ``mode`` is ``LoraConfig.init_lora_weights``.

  Linear-like layers (PEFT): A Kaiming-uniform (``True``) or normal with std
  ``1/r`` (``"gaussian"``, PEFT's ``normal_(std=1/r)``), B zero. Embeddings
  (PEFT): A zero, B standard normal.
  ``False`` draws both at random, a debugging aid: the adapted model then
  differs from the base model from the first step.
  """
  key_a, key_b = jax.random.split(key)
  rank = a_shape[-1]
  if mode is False:
    return (kaiming_uniform(key_a, a_shape, fan_in, dtype),
            kaiming_uniform(key_b, b_shape, rank, dtype))
  if embedding:
    return jnp.zeros(a_shape, dtype), jax.random.normal(key_b, b_shape, dtype)
  if mode == "gaussian":
    a = jax.random.normal(key_a, a_shape, dtype) / rank
  else:
    a = kaiming_uniform(key_a, a_shape, fan_in, dtype)
  return a, jnp.zeros(b_shape, dtype)


# ---- data-driven and orthogonal inits (PEFT's pissa_init / olora_init / orthogonal_init) ------
#
# They see one layer's weight as PEFT does, ``W [out, in]`` (the Flax kernel transposed, the
# kernel's input dims flattened into ``in``), and return jlora factors ``A [in, r]``,
# ``B [r, out]`` with ``W ≈ scaling · (A·B)ᵀ`` (PiSSA) or ``W = QR`` columns (OLoRA). The
# caller subtracts ``scaling · A·B`` from the kernel, as PEFT rewrites the base weight.

BASE_REWRITING = ("pissa", "olora")


def rewrites_base(mode) -> bool:
  """Whether ``init_lora_weights=mode`` moves part of the base weight into the adapter."""
  return isinstance(mode, str) and (mode in BASE_REWRITING or mode.startswith("pissa_niter_"))


def pissa(weight: jax.Array, rank: int, scaling, *, niter: int | None = None,
          key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """PiSSA: ``W [out, in] ≈ U S Vᵀ``; ``A = (√(S/s) Vᵀ)ᵀ``, ``B = (U √(S/s))ᵀ`` (top ``rank``).

  ``niter=None`` uses the full SVD (``"pissa"``); an int uses torch's
  randomized ``svd_lowrank`` algorithm with that many power iterations
  (``"pissa_niter_K"``), which needs ``key``.
  """
  if niter is None:
    u, s, vh = jnp.linalg.svd(weight, full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
  else:
    u, s, vh = _svd_lowrank(key, weight, rank, niter)
  root = jnp.sqrt(s / scaling)
  return (root[:, None] * vh).T, (u * root[None, :]).T


def _svd_lowrank(key: jax.Array, m: jax.Array, q: int, niter: int):
  """torch.svd_lowrank (Halko et al. 2009, Alg. 4.4 + 5.1): a rank-``q`` SVD of ``m``."""
  omega = jax.random.normal(key, (m.shape[1], q), m.dtype)
  basis = jnp.linalg.qr(m @ omega)[0]
  for _ in range(niter):
    basis = jnp.linalg.qr(m.T @ basis)[0]
    basis = jnp.linalg.qr(m @ basis)[0]
  u, s, vh = jnp.linalg.svd(basis.T @ m, full_matrices=False)
  return basis @ u, s, vh


def olora(weight: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """OLoRA: ``W [out, in] = QR``; ``A = R[:rank]ᵀ``, ``B = Q[:, :rank]ᵀ`` (no scaling)."""
  q, r = jnp.linalg.qr(weight)
  return r[:rank].T, q[:, :rank].T


def orthogonal_factors(key: jax.Array, fan_in: int, fan_out: int, rank: int,
                       dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """PEFT's ``"orthogonal"`` init: A and B from disjoint rows of one random orthogonal matrix.

  ``A·B = 0`` (the model starts as the base model) while neither factor is
  zero. ``rank`` must be even.
  """
  key_q, key_a, key_b = jax.random.split(key, 3)
  q = jnp.linalg.qr(jax.random.normal(key_q, (rank, rank), jnp.float32))[0]
  a = jax.random.normal(key_a, (fan_in, rank // 2), jnp.float32) @ q[0::2] / 10.0
  b = q[1::2].T @ jax.random.normal(key_b, (rank // 2, fan_out), jnp.float32) / 10.0
  return a.astype(dtype), b.astype(dtype)

"""Rotary position embeddings for every ``rope_type`` transformers reads (``ROPE_TYPES``).

``inverse_frequencies`` returns what transformers' ``ROPE_INIT_FUNCTIONS``
(and each model's ``compute_default_rope_parameters``) return: the
``[rotary_dim // 2]`` float32 inverse frequencies and the attention factor
that scales ``cos`` and ``sin``. The tables are static (numpy, computed once
from the config), except for two rope types whose tables depend on how long
the sequence is:

- ``dynamic``: the base grows with the length once it passes
  ``max_position_embeddings`` (``seq_len`` argument);
- ``longrope``: ``short_factor`` up to ``original_max_position_embeddings``
  positions, ``long_factor`` beyond (``seq_len`` argument).

``rope_parameters`` turns a ``config.json`` dict into the standard
parameter dict (``rope_type``, ``rope_theta``, ...) the way transformers'
``standardize_rope_params`` does, including the old spellings
(``rope_scaling``, ``type``) and the per-layer-type dicts of Gemma 3.

All arithmetic follows transformers' order and dtypes (float32 tensors,
float64 Python scalars) so tables match to float32 rounding.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
_NEEDS_ORIGINAL = ("llama3", "yarn", "longrope")


def rope_parameters(config: Mapping[str, Any], layer_type: str | None = None) -> dict[str, Any]:
  """The standard rope parameter dict of ``config`` (a ``config.json`` dict).

  Reads ``rope_parameters`` (or the old ``rope_scaling``), fills
  ``rope_type`` (from the old ``type``, else ``"default"``), ``rope_theta``
  (from the top-level key, else 10000), ``partial_rotary_factor`` (from the
  top-level key, if any) and, for ``llama3``/``yarn``/``longrope``,
  ``original_max_position_embeddings`` (a top-level key wins, as Phi-3 saves
  it; else ``max_position_embeddings``).

  With ``layer_type`` (``"sliding_attention"`` / ``"full_attention"``), the
  nested dict of that layer type is read (Gemma 3 style); a config without
  nested dicts serves every layer type with its one dict.

  Raises:
    ValueError: an unknown ``rope_type`` (names the supported ones), or a
      ``layer_type`` the nested dict does not have.
  """
  params = config.get("rope_parameters") or config.get("rope_scaling") or {}
  layer_types = set(config.get("layer_types") or ())
  nested = [key for key in params if key in layer_types]
  if nested:
    if layer_type is None or params.get(layer_type) is None:
      raise ValueError(f"rope_parameters holds one dict per layer type ({', '.join(sorted(nested))}); "
                       f"pass one of them as layer_type, not {layer_type!r}.")
    params = params[layer_type]
  params = dict(params)
  params.setdefault("rope_type", params.get("type", "default"))
  params.setdefault("rope_theta", config.get("rope_theta") or 10000.0)
  if config.get("partial_rotary_factor") is not None:
    params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
  if params["rope_type"] in _NEEDS_ORIGINAL:
    if config.get("original_max_position_embeddings") is not None and not nested:
      params["original_max_position_embeddings"] = config["original_max_position_embeddings"]
    params.setdefault("original_max_position_embeddings", config["max_position_embeddings"])
  if params["rope_type"] not in ROPE_TYPES:
    raise ValueError(f"rope_type={params['rope_type']!r} is not supported; use one of {', '.join(ROPE_TYPES)}.")
  return params


def rotary_dim(head_dim: int, rope: Mapping[str, Any]) -> int:
  """How many leading dims of each head are rotated (``head_dim * partial_rotary_factor``)."""
  return int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))


def _exponents(dim: int) -> np.ndarray:
  """``[dim // 2]`` float32 ``(0, 2, 4, ...) / dim``, as ``torch.arange(0, dim, 2).float() / dim``."""
  return np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)


def _power(base: float, exponents: np.ndarray) -> np.ndarray:
  """float32 ``base ** exponents`` (a Python float base against a float32 tensor, as torch computes it)."""
  return np.power(np.float32(base), exponents, dtype=np.float32)


def _default(dim: int, base: float) -> np.ndarray:
  return (np.float32(1.0) / _power(base, _exponents(dim))).astype(np.float32)


def _linear(rope, dim, **_) -> tuple[np.ndarray, float]:
  return (_default(dim, rope["rope_theta"]) / np.float32(rope["factor"])).astype(np.float32), 1.0


def _dynamic(rope, dim, *, max_position_embeddings: int, seq_len: int | None, **_) -> tuple[np.ndarray, float]:
  factor = rope["factor"]
  seq_len = max_position_embeddings if seq_len is None else max(seq_len, max_position_embeddings)
  base = rope["rope_theta"] * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
  return _default(dim, base), 1.0


def yarn_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
  """YaRN's ``0.1 * mscale * log(scale) + 1`` (1 for ``scale <= 1``)."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _context_factor(rope, max_position_embeddings: int) -> tuple[int, float]:
  """``(original length, context factor)``; the factor defaults to ``max_position_embeddings / original``."""
  original = rope["original_max_position_embeddings"]
  factor = rope.get("factor")
  return original, max_position_embeddings / original if factor is None else factor


def _yarn(rope, dim, *, max_position_embeddings: int, **_) -> tuple[np.ndarray, float]:
  base = rope["rope_theta"]
  original, factor = _context_factor(rope, max_position_embeddings)
  attention_factor = rope.get("attention_factor")
  if attention_factor is None:
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if mscale and mscale_all_dim:
      attention_factor = float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
    else:
      attention_factor = yarn_mscale(factor)
  beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

  def correction_dim(rotations):
    return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if rope.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # transformers' guard against a zero-width ramp
  pos_freqs = _power(base, _exponents(dim))
  extrapolation = (np.float32(1.0) / pos_freqs).astype(np.float32)
  interpolation = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
  keep = (np.float32(1.0) - ramp).astype(np.float32)  # 1 where frequencies extrapolate (are left alone)
  inv_freq = interpolation * (np.float32(1.0) - keep) + extrapolation * keep
  return inv_freq.astype(np.float32), float(attention_factor)


def _longrope(rope, dim, *, max_position_embeddings: int, seq_len: int | None, **_) -> tuple[np.ndarray, float]:
  original, factor = _context_factor(rope, max_position_embeddings)
  attention_factor = rope.get("attention_factor")
  if attention_factor is None:
    attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
  long = seq_len is not None and seq_len > original
  ext = np.asarray(rope["long_factor" if long else "short_factor"], np.float32)
  if ext.shape != (dim // 2,):
    raise ValueError(f"rope {'long' if long else 'short'}_factor has {ext.size} entries; the rotary dim {dim} "
                     f"needs {dim // 2}.")
  inv_freq = np.float32(1.0) / (ext * _power(rope["rope_theta"], _exponents(dim)))
  return inv_freq.astype(np.float32), float(attention_factor)


def _llama3(rope, dim, **_) -> tuple[np.ndarray, float]:
  inv_freq = _default(dim, rope["rope_theta"])
  factor = float(rope["factor"])
  low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
  old_context = rope["original_max_position_embeddings"]
  low_wavelen, high_wavelen = old_context / low, old_context / high
  wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
  scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
  smooth = ((np.float32(old_context) / wavelen - np.float32(low)) / np.float32(high - low)).astype(np.float32)
  smoothed = (np.float32(1) - smooth) * scaled / np.float32(factor) + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32), 1.0


_INIT = {"linear": _linear, "dynamic": _dynamic, "yarn": _yarn, "longrope": _longrope, "llama3": _llama3}


def inverse_frequencies(rope: Mapping[str, Any], *, head_dim: int, max_position_embeddings: int,
                        seq_len: int | None = None) -> tuple[np.ndarray, float]:
  """``(inv_freq [rotary_dim // 2] float32, attention_factor)`` of the standard ``rope`` dict.

  ``seq_len``: the length of the sequence being run (the largest position
  plus one); only ``dynamic`` and ``longrope`` read it. None gives the table
  transformers builds at init (``dynamic``: the unscaled base; ``longrope``:
  the short factors). ``attention_factor`` multiplies ``cos`` and ``sin``
  (``yarn``, ``longrope``; 1.0 for the rest).
  """
  rope_type = rope.get("rope_type", "default")
  dim = rotary_dim(head_dim, rope)
  if rope_type == "default":
    return _default(dim, rope["rope_theta"]), 1.0
  if rope_type not in _INIT:
    raise ValueError(f"rope_type={rope_type!r} is not supported; use one of {', '.join(ROPE_TYPES)}.")
  return _INIT[rope_type](rope, dim, max_position_embeddings=max_position_embeddings, seq_len=seq_len)


def longrope_uses_long(rope: Mapping[str, Any], seq_len: int) -> bool:
  """Whether a ``longrope`` call of ``seq_len`` positions takes ``long_factor`` (past the original length).

  transformers decides per forward call from ``max(position_ids) + 1``; in
  generation, Phi-3 drops its cache and re-encodes the whole sequence with
  the long factors once it first passes the original length.
  """
  return seq_len > rope["original_max_position_embeddings"]



def freeze(rope: Mapping[str, Any]) -> tuple:
  """``rope`` as a sorted, hashable tuple of ``(key, value)`` (lists become tuples), for a frozen config."""
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rope.items()
                      if not isinstance(v, dict)))


def check_rope(rope: Mapping[str, Any], head_dim: int, max_position_embeddings: int) -> None:
  """Build both tables of ``rope`` once, so a bad type or factor list fails at load, not in the first step."""
  inverse_frequencies(rope, head_dim=head_dim, max_position_embeddings=max_position_embeddings)
  if rope.get("rope_type") == "longrope":
    inverse_frequencies(rope, head_dim=head_dim, max_position_embeddings=max_position_embeddings,
                        seq_len=int(rope["original_max_position_embeddings"]) + 1)


def rope_cos_sin(rope: Mapping[str, Any], positions: jax.Array, *, head_dim: int,
                 max_position_embeddings: int) -> tuple[jax.Array, jax.Array]:
  """``cos, sin [B, T, rotary_dim]`` (float32) of ``positions [B, T]`` under ``rope`` (a standard dict).

  The rope types whose table depends on the length read it as transformers
  does, from the call's largest position plus one, inside the traced
  program: ``longrope`` picks its short or long table, ``dynamic`` grows its
  base past ``max_position_embeddings``.
  """
  rope_type = rope.get("rope_type", "default")
  sizes = dict(head_dim=head_dim, max_position_embeddings=max_position_embeddings)
  inv_freq, factor = inverse_frequencies(rope, **sizes)
  seq_len = jnp.max(positions) + 1
  if rope_type == "longrope":
    original = int(rope["original_max_position_embeddings"])
    long, _ = inverse_frequencies(rope, seq_len=original + 1, **sizes)
    inv_freq = jnp.where(seq_len > original, jnp.asarray(long), jnp.asarray(inv_freq))
  elif rope_type == "dynamic":
    dim = rotary_dim(head_dim, rope)
    length = jnp.maximum(seq_len, max_position_embeddings).astype(jnp.float32)
    scale = rope["factor"] * length / max_position_embeddings - (rope["factor"] - 1)
    base = rope["rope_theta"] * scale ** (dim / (dim - 2))
    grown = 1.0 / base ** jnp.asarray(_exponents(dim))
    inv_freq = jnp.where(seq_len > max_position_embeddings, grown, jnp.asarray(inv_freq))
  return cos_sin(positions, inv_freq, factor)

def cos_sin(positions: jax.Array, inv_freq: np.ndarray, attention_factor: float = 1.0
            ) -> tuple[jax.Array, jax.Array]:
  """``cos, sin [B, T, rotary_dim]`` (float32) for integer ``positions [B, T]``, scaled by ``attention_factor``."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb) * attention_factor, jnp.sin(emb) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate the first ``rotary_dim`` dims of ``x [B, T, heads, head_dim]`` (rotate-half); pass the rest.

  ``cos, sin [B, T, rotary_dim]`` are cast to ``x``'s dtype first, as
  transformers does (Llama, Gemma, Phi-3; OLMo 2 instead rotates in float32).
  """
  rot = cos.shape[-1]
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  x_rot, x_pass = x[..., :rot], x[..., rot:]
  half = rot // 2
  rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  out = x_rot * cos + rotated * sin
  return out if rot == x.shape[-1] else jnp.concatenate([out, x_pass], axis=-1)

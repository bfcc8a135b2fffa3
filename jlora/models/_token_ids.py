"""Token ids must be rows of the embedding table.

``nnx.Embed`` looks ids up with ``jnp.take``, which fills an out-of-range row
with NaN, so one id past the vocabulary (or a negative one) makes every logit
after it NaN instead of an error. The check runs on the host, on concrete ids
only: under ``jit`` the ids are tracers and it steps aside (the caller checks
the concrete batch before the jitted call, as ``jlora.train``'s steps do).
"""

from __future__ import annotations

import jax
import numpy as np


def check_token_ids(ids, vocab_size: int | None, what: str = "input_ids") -> None:
  """Raise ``ValueError`` if concrete ``ids`` (any shape) hold a value outside ``[0, vocab_size)``.

  Tracers, arrays this process cannot read whole (a multi-host batch) and an
  unknown ``vocab_size`` (None) are not checked.
  """
  if vocab_size is None or isinstance(ids, jax.core.Tracer):
    return
  if isinstance(ids, jax.Array) and not ids.is_fully_addressable:
    return
  ids = np.asarray(ids)
  if ids.size and not (ids.min() >= 0 and ids.max() < vocab_size):
    raise ValueError(f"{what} holds token ids outside the model's vocabulary [0, {vocab_size}) (min {int(ids.min())}, "
                     f"max {int(ids.max())}); encode the text with the model's own tokenizer.")

"""``LanguageModel``: what every family's model is, and all that ``jlora.train`` may ask of one.

The explicit protocol between the models and the trainer (and ``generate``,
``jlora.io``): a family's model class subclasses it and implements
``head`` and ``_hidden``; the trainer sets the four attributes below and
calls the three methods, and asks nothing else of a ``LanguageModel``. A
model of your own that does not subclass it is trained through its plain
call, ``model(input_ids, attention_mask=None) -> logits``.
"""

from __future__ import annotations

import abc
from typing import Any

from flax import nnx

from jlora.models._attention import check_attention
from jlora.models._config import FamilyConfig
from jlora.models._remat import check_remat
from jlora.models._token_ids import check_token_ids


def check_scan_unroll(unroll: int) -> int:
  """``unroll`` if it is a positive int (layers per step of the layer loop), else ValueError with the fix."""
  if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
    raise ValueError(
        f"scan_unroll={unroll!r} is not a positive number of layers per loop step; use 1 (a rolled loop, "
        "the shortest compile), a small number such as 2, or the number of layers to unroll the loop fully.")
  return unroll


class LanguageModel(nnx.Module, abc.ABC):
  """A causal LM: ``model(input_ids [B, T], ...) -> logits [B, T, vocab]``.

  Built as ``cls(config, *, dtype, param_dtype, rngs, remat, attention, scan_unroll)``.

  Attributes (settable after building; the trainer sets them from its config):
    config: the family's ``FamilyConfig``.
    dtype: the activations' dtype.
    remat: what the backward pass keeps (``jlora.models.REMAT_POLICIES``).
    scan_unroll: layers per step of the layer loop (``scan_layers``).
    attention: the attention kernel (``jlora.models.ATTENTION``).
    max_segments: the most records a packed row holds, None when unknown;
      picks how cuDNN runs packed rows (``cudnn_packed_layout``).

  ``model(ids, attention_mask=None, positions=None, cache=None,
  segment_ids=None)`` is ``head(hidden(ids, ...))``, and with ``cache=`` it
  returns ``(logits, new_cache)``. ``hidden`` returns the final hidden
  states ``[B, T, hidden]``, ``head(h)`` their logits, so a loss can run the
  output head chunk by chunk.
  """

  config: FamilyConfig
  dtype: Any
  remat: str = "matmuls"
  scan_unroll: int = 1
  attention: str = "auto"
  max_segments: int | None = None

  def _settings(self, config: FamilyConfig, dtype, remat: str, attention: str, scan_unroll: int) -> None:
    """Store the config and the checked settings (every family's ``__init__`` starts with this)."""
    self.config = config
    self.dtype = dtype
    self.remat = check_remat(remat)
    self.scan_unroll = check_scan_unroll(scan_unroll)
    self.attention = check_attention(attention)

  def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, segment_ids=None):
    check_token_ids(input_ids, self.config.vocab_size)
    h, new_cache = self._hidden(input_ids, attention_mask, positions, cache, segment_ids)
    logits = self.head(h)
    return logits if cache is None else (logits, new_cache)

  def hidden(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
    """Final hidden states ``[B, T, hidden]`` (after the last norm), without the output head."""
    check_token_ids(input_ids, self.config.vocab_size)
    return self._hidden(input_ids, attention_mask, positions, None, segment_ids)[0]

  @abc.abstractmethod
  def head(self, h):
    """Logits ``[..., vocab]`` of hidden states ``h [..., hidden]``."""

  @abc.abstractmethod
  def _hidden(self, input_ids, attention_mask, positions, cache, segment_ids):
    """``(h [B, T, hidden], new_cache or None)`` of one call."""

"""NNX variable types that separate adapter state from the frozen base model.

Every array a LoRA layer owns carries one of these types, so one ``nnx.split``
pulls the adapter out of a model as a pytree of its own::

    graphdef, adapter, base, rest = nnx.split(model, LoraParam, nnx.Param, ...)

``LoraParam`` subclasses Flax's ``nnx.LoRAParam``, itself an ``nnx.Param`` (it
*is* a parameter), which is why the adapter filter must come before
``nnx.Param`` in a split. Trainers that select ``nnx.LoRAParam`` (tunix's
``PeftTrainer``, MaxText) therefore train jlora adapters as they are. WLoRA's
frozen upstream factors (``UpstreamLoraParam``) are adapter *buffers*, not
``nnx.LoRAParam``, so such a selection (and ``jlora.split_adapter``) leaves
them frozen while ``adapter_state`` still saves them with the adapter.
"""

from __future__ import annotations

from flax import nnx


class LoraParam(nnx.LoRAParam):
  """A trainable adapter parameter (LoRA A/B, MoSLoRA mixer, WLoRA logits)."""


class LoraBuffer(nnx.Variable):
  """Non-trainable adapter state: per-layer scaling, rank masks, routing.

  Like every array of a LoRA layer, a buffer carries the stack (scan) dims of
  the base layer's kernel in front, so a scanned model slices it per layer.
  """


class UpstreamLoraParam(LoraBuffer):
  """A frozen factor of a pretrained upstream LoRA inside a WLoRA adapter.

  Adapter state (``adapter_state`` saves it, export reads it) but a buffer,
  not an ``nnx.LoRAParam``: no ``nnx.LoRAParam`` / ``LoraParam`` filter, hence
  no NNX trainer selecting adapters that way, ever trains it.
  """


class LoraRngKey(nnx.Variable):
  """Per-layer PRNG key and counter used by LoRA dropout."""


TRAINABLE = LoraParam
"""NNX filter of the adapter params an optimizer may change (WLoRA upstreams are buffers)."""

"""NNX variable types that separate adapter state from the frozen base model.

Every array a LoRA layer owns carries one of these types, so one ``nnx.split``
pulls the adapter out of a model as a pytree of its own::

    graphdef, adapter, base, rest = nnx.split(model, LoraParam, nnx.Param, ...)

``LoraParam`` subclasses Flax's ``nnx.LoRAParam``, itself an ``nnx.Param`` (it
*is* a parameter), which is why the adapter filter must come before
``nnx.Param`` in a split. Trainers that select ``nnx.LoRAParam`` (tunix's
``PeftTrainer``, MaxText) therefore train jlora adapters as they are. Such a
selection also takes WLoRA's frozen upstream factors (``UpstreamLoraParam``);
select ``TRAINABLE`` instead, or use ``jlora.adapter_optimizer``, to keep them
frozen.
"""

from __future__ import annotations

from flax import nnx


class LoraParam(nnx.LoRAParam):
  """A trainable adapter parameter (LoRA A/B, MoSLoRA mixer, WLoRA logits)."""


class UpstreamLoraParam(LoraParam):
  """A frozen factor of a pretrained upstream LoRA inside a WLoRA adapter.

  It is part of the adapter pytree (so it is saved and exported with it) but
  the optimizer helpers mask it out, so its values never change.
  """


class LoraBuffer(nnx.Variable):
  """Non-trainable adapter state: per-layer scaling, rank masks, routing.

  Like every array of a LoRA layer, a buffer carries the stack (scan) dims of
  the base layer's kernel in front, so a scanned model slices it per layer.
  """


class LoraRngKey(nnx.Variable):
  """Per-layer PRNG key and counter used by LoRA dropout."""


TRAINABLE = nnx.All(LoraParam, nnx.Not(UpstreamLoraParam))
"""NNX filter of the adapter params an optimizer may change (all but WLoRA upstreams)."""

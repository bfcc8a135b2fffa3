"""Tiny NNX models for tests and examples: shared test doubles, no weights to download.

The names follow Hugging Face's causal LMs, so the module paths an adapter
sees are PEFT's (``model.layers.1.self_attn.q_proj``):

- ``TinyLM``: ``model.embed_tokens`` → ``model.layers`` (an ``nnx.List`` of
  ``Block``) → ``lm_head``, the layers applied one after another.
- ``TinyScannedLM``: the same blocks built once with ``nnx.vmap`` (every
  kernel carries a leading layer axis), run with ``nnx.scan`` and marked with
  ``jlora.mark_stacked``, the layout large models use to compile once.
- ``TinyConvNet``: two ``nnx.Conv`` and a linear ``head`` on ``[B, H, W, C]``.

All sizes are keyword arguments with tiny defaults; weights come from a seed.
Helpers: ``token_ids`` / ``images`` (inputs), ``randomize_adapters`` (make
fresh adapters matter), ``unstacked_copy`` (a scanned model's weights as a
list of blocks), ``module_at`` and ``adapted_names`` (inspect where adapters went).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jlora.nn import LoraParam, UpstreamLoraParam, lora_layers, mark_stacked

VOCAB = 13
HIDDEN = 8
INTERMEDIATE = 12
NUM_LAYERS = 3


class Attention(nnx.Module):
  """Attention-shaped projections (no softmax: the tests need the names, not the math)."""

  def __init__(self, hidden: int, *, rngs: nnx.Rngs):
    self.q_proj = nnx.Linear(hidden, hidden, rngs=rngs)
    self.k_proj = nnx.Linear(hidden, hidden, rngs=rngs)
    self.v_proj = nnx.Linear(hidden, hidden, rngs=rngs)
    self.o_proj = nnx.Linear(hidden, hidden, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    gate = jnp.tanh(self.q_proj(h) * self.k_proj(h))
    return self.o_proj(gate * self.v_proj(h))


class Mlp(nnx.Module):
  def __init__(self, hidden: int, intermediate: int, *, rngs: nnx.Rngs):
    self.up_proj = nnx.Linear(hidden, intermediate, rngs=rngs)
    self.down_proj = nnx.Linear(intermediate, hidden, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.gelu(self.up_proj(h)))


class Block(nnx.Module):
  """One residual block: ``h + attn(h) + mlp(h)``, ``[B, T, hidden]`` in and out."""

  def __init__(self, hidden: int, intermediate: int, *, rngs: nnx.Rngs):
    self.self_attn = Attention(hidden, rngs=rngs)
    self.mlp = Mlp(hidden, intermediate, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    return h + self.self_attn(h) + self.mlp(h)


class Backbone(nnx.Module):
  """``embed_tokens`` and a Python list of blocks."""

  def __init__(self, vocab: int, hidden: int, intermediate: int, num_layers: int, *, rngs: nnx.Rngs):
    self.embed_tokens = nnx.Embed(vocab, hidden, rngs=rngs)
    self.layers = nnx.List([Block(hidden, intermediate, rngs=rngs) for _ in range(num_layers)])

  def __call__(self, ids: jax.Array) -> jax.Array:
    h = self.embed_tokens(ids)
    for block in self.layers:
      h = block(h)
    return h


class ScannedBackbone(nnx.Module):
  """``embed_tokens`` and one stacked ``Block`` (leading layer axis) run by ``nnx.scan``."""

  def __init__(self, vocab: int, hidden: int, intermediate: int, num_layers: int, *, rngs: nnx.Rngs):
    self.embed_tokens = nnx.Embed(vocab, hidden, rngs=rngs)

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(hidden, intermediate, rngs=rngs)

    self.layers = mark_stacked(make_blocks(rngs), num_layers)

  def __call__(self, ids: jax.Array) -> jax.Array:
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(h, block):
      return block(h)

    return run(self.embed_tokens(ids), self.layers)


class TinyLM(nnx.Module):
  """A causal-LM-shaped model: ids ``[B, T]`` → logits ``[B, T, vocab]``."""

  def __init__(self, *, vocab: int = VOCAB, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE,
               num_layers: int = NUM_LAYERS, seed: int = 0, scanned: bool = False):
    self.sizes = dict(vocab=vocab, hidden=hidden, intermediate=intermediate, num_layers=num_layers)
    rngs = nnx.Rngs(seed)
    backbone = ScannedBackbone if scanned else Backbone
    self.model = backbone(vocab, hidden, intermediate, num_layers, rngs=rngs)
    self.lm_head = nnx.Linear(hidden, vocab, use_bias=False, rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return self.lm_head(self.model(ids))


def TinyScannedLM(**kwargs) -> TinyLM:
  """``TinyLM`` whose blocks are stacked and scanned (``model.layers`` marked stacked)."""
  return TinyLM(scanned=True, **kwargs)


def unstacked_copy(model: TinyLM) -> TinyLM:
  """A list-of-blocks ``TinyLM`` with the base weights of a scanned one (layer i = slice i).

  Call it before injecting adapters: it copies ``nnx.Param`` state only.
  """
  flat = TinyLM(**model.sizes)
  values = []
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[:2] == ("model", "layers"):
      values += [(path[:2] + (i,) + path[2:], variable[...][i]) for i in range(model.sizes["num_layers"])]
    else:
      values.append((path, variable[...]))
  nnx.update(flat, nnx.from_flat_state(values))
  return flat


class TinyConvNet(nnx.Module):
  """Images ``[B, H, W, C]`` → ``[B, classes]``: conv1, conv2, mean-pool, head."""

  def __init__(self, *, channels: int = 3, features: int = 4, classes: int = 5, seed: int = 0):
    rngs = nnx.Rngs(seed)
    self.conv1 = nnx.Conv(channels, features, (3, 3), padding="SAME", rngs=rngs)
    self.conv2 = nnx.Conv(features, features, (3, 3), strides=(2, 2), padding="VALID", rngs=rngs)
    self.head = nnx.Linear(features, classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(self.conv1(x))
    h = jax.nn.relu(self.conv2(h))
    return self.head(h.mean(axis=(1, 2)))


def token_ids(batch: int = 2, length: int = 5, *, vocab: int = VOCAB, seed: int = 1) -> jax.Array:
  """Deterministic random token ids ``[batch, length]``."""
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)


def images(batch: int = 2, size: int = 7, channels: int = 3, *, seed: int = 2) -> jax.Array:
  """Deterministic random images ``[batch, size, size, channels]``."""
  return jax.random.normal(jax.random.key(seed), (batch, size, size, channels))


def randomize_adapters(model: nnx.Module, seed: int = 0, scale: float = 0.5) -> None:
  """Overwrite every trainable adapter array (not WLoRA upstreams) with N(0, scale²) values.

  Freshly initialised LoRA has B = 0 (no effect), so tests that need adapters
  to change the output call this first. Scalings and rank masks are kept.
  """
  state = nnx.state(model, nnx.All(LoraParam, nnx.Not(UpstreamLoraParam)))
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(treedef, new))


def module_at(model: nnx.Module, path: str) -> nnx.Module:
  """The submodule at a dotted path such as ``"model.layers.0.self_attn.q_proj"``."""
  node = model
  for key in path.split("."):
    node = node[int(key)] if key.isdigit() else getattr(node, key)
  return node


def adapted_names(model: nnx.Module, adapter_name: str = "default") -> set[str]:
  """PEFT-style names of the (stacked) layers where ``adapter_name`` has a live update."""
  names = set()
  for _, layer in lora_layers(model):
    if adapter_name not in layer.adapters:
      continue
    adapter = layer.adapters[adapter_name]
    scaling = jnp.ravel(adapter.scaling[...]) if hasattr(adapter, "scaling") else None
    for i, name in enumerate(layer.module_names):
      if scaling is None or scaling[i] != 0:
        names.add(name)
  return names

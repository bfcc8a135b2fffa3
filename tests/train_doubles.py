"""A tiny causal LM with the ``jlora.models`` call interface, for the training-job tests.

``CausalLM(ids [B, T], attention_mask=None, positions=None) -> logits [B, T, V]``
with Hugging Face module names (``model.layers.N.self_attn.q_proj``), stacked
blocks run by ``nnx.scan``, real causal softmax attention and a
``config.max_position_embeddings``: what the job needs from a model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import jlora
from jlora.train import make_optimizer, make_train_step, split_model


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int = 258
  hidden_size: int = 16
  intermediate_size: int = 32
  num_hidden_layers: int = 2
  num_attention_heads: int = 2
  max_position_embeddings: int = 64


class Block(nnx.Module):
  def __init__(self, c: Config, *, rngs: nnx.Rngs):
    h, m = c.hidden_size, c.intermediate_size
    self.heads = c.num_attention_heads
    self.input_layernorm = nnx.RMSNorm(h, rngs=rngs)
    self.self_attn = nnx.Module()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      setattr(self.self_attn, name, nnx.Linear(h, h, use_bias=False, rngs=rngs))
    self.post_attention_layernorm = nnx.RMSNorm(h, rngs=rngs)
    self.mlp = nnx.Module()
    self.mlp.gate_proj = nnx.Linear(h, m, use_bias=False, rngs=rngs)
    self.mlp.up_proj = nnx.Linear(h, m, use_bias=False, rngs=rngs)
    self.mlp.down_proj = nnx.Linear(m, h, use_bias=False, rngs=rngs)

  def __call__(self, x, bias):
    a = self.self_attn
    y = self.input_layernorm(x)
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, -1))
    q, k, v = split(a.q_proj(y)), split(a.k_proj(y)), split(a.v_proj(y))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]) + bias
    att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v).reshape(x.shape)
    x = x + a.o_proj(att)
    y = self.post_attention_layernorm(x)
    return x + self.mlp.down_proj(jax.nn.silu(self.mlp.gate_proj(y)) * self.mlp.up_proj(y))


class Backbone(nnx.Module):
  def __init__(self, c: Config, *, rngs: nnx.Rngs):
    self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, rngs=rngs)
    self.embed_positions = nnx.Embed(c.max_position_embeddings, c.hidden_size, rngs=rngs)

    @nnx.split_rngs(splits=c.num_hidden_layers)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(rngs):
      return Block(c, rngs=rngs)

    self.layers = jlora.mark_stacked(make(rngs), c.num_hidden_layers)
    self.norm = nnx.RMSNorm(c.hidden_size, rngs=rngs)


class CausalLM(nnx.Module):
  def __init__(self, config: Config = Config(), *, seed: int = 0):
    self.config = config
    rngs = nnx.Rngs(seed)
    self.model = Backbone(config, rngs=rngs)
    self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, rngs=rngs)

  def __call__(self, input_ids, attention_mask=None, positions=None):
    b, t = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    x = self.model.embed_tokens(input_ids) + self.model.embed_positions(positions)
    allowed = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if attention_mask is not None:
      allowed = allowed & (attention_mask[:, None, None, :] > 0)
    bias = jnp.where(allowed, 0.0, -1e9).astype(x.dtype)

    @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry)
    def run(h, block, bias):
      return block(h, bias)

    return self.lm_head(self.model.norm(run(x, self.model.layers, bias)))


def tiny_job(output_dir, **overrides):
  """A ``TrainConfig`` for a few-second job on ``CausalLM`` (dotted-key overrides)."""
  from jlora.train import TrainConfig

  base = {"output_dir": str(output_dir), "steps": 12, "batch_size": 4, "eval_every": 6, "eval_batches": 2,
          "checkpoint.every": 4, "checkpoint.async_save": False, "data.seq_len": 32, "progress": False,
          "samples": 0, "optim.learning_rate": 3e-2, "optim.warmup_steps": 2}
  if overrides.get("adapter.kind", "lora") != "wlora":  # WLoRA has no rank of its own
    base["adapter.r"] = 4
  base.update(overrides)
  return TrainConfig().replace(**base)


def run_tiny_job(output_dir, **overrides):
  """``jlora.train`` on a fresh ``CausalLM`` with the byte tokenizer."""
  from jlora.train import ByteTokenizer, train

  return train(tiny_job(output_dir, **overrides), model=CausalLM(), tokenizer=ByteTokenizer())


def block_after_checkpoint(step: int, marker: str, wait: bool = True) -> None:
  """Make this process's jobs stop dead after saving checkpoint ``step``: a kill point that does not
  depend on timing.

  The save of ``step`` is started (and, with ``wait``, finished on disk); then
  the job writes ``<marker>.<process index>`` and blocks until it is killed.
  """
  import threading
  from pathlib import Path

  from jlora.train import _checkpoint

  save = _checkpoint.Checkpointer.save

  def save_then_block(self, at, state, meta):
    save(self, at, state, meta)
    if at == step:
      if wait:
        self.wait()
      Path(f"{marker}.{jax.process_index()}").write_text(str(at))
      threading.Event().wait()

  _checkpoint.Checkpointer.save = save_then_block


def wait_until_blocked(procs, marker: str, guard_s: float = 600) -> None:
  """Wait for every process of ``procs`` to reach ``block_after_checkpoint``'s point (``guard_s`` only
  turns a hung job into a failure; the point itself is set by the job's step, not by time)."""
  import time
  from pathlib import Path

  paths = [Path(f"{marker}.{i}") for i in range(len(procs))]
  give_up = time.monotonic() + guard_s
  while not all(p.exists() for p in paths):
    ended = [p for p in procs if p.poll() is not None]
    assert not ended, f"the job ended before it reached the kill point: {ended[0].communicate()[1][-3000:]}"
    assert time.monotonic() < give_up, "the job did not reach the kill point"
    time.sleep(0.05)


def lora_train_steps(model, tokens, steps: int = 4):
  """``steps`` jitted train steps (AdamW, lr 1e-2) of ``model``'s adapters on ``tokens [B, T]``.

  Returns ``(trained params, losses)``; ``nnx.update(model, params)`` applies them.
  """
  graphdef, params, rng, frozen = split_model(model)
  tx = make_optimizer(model, params, learning_rate=1e-2, steps=10, warmup_steps=0, end_lr_ratio=1.0,
                      weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=1.0, grad_accum=1)
  step = make_train_step(graphdef, tx, loss_chunk_tokens=8)
  batch = dict(tokens=tokens, loss_mask=jnp.ones_like(tokens), segment_ids=jnp.zeros_like(tokens))
  state, losses = [params, tx.init(params), rng], []
  for _ in range(steps):
    state[0], state[1], state[2], loss, _ = step(*state, frozen, batch)
    losses.append(float(loss))
  return state[0], losses

"""Pretrain the shipped base model: a byte-level Llama on stories, written to ``jlora/train/data/base``.

``python scripts/train_base.py`` draws ``--stories`` stories from the story
generator of the embedded corpus (``jlora.train._corpus.story``, seeded with
``--seed``; the corpus file's Q/A records are never seen), trains every
weight of a 4-layer, 128-wide Llama (``jlora.models.CausalLM``, 258-token
byte vocabulary) with AdamW, and writes ``config.json`` +
``model.safetensors`` (float32, ~4 MB) with ``jlora.io.save_pretrained``.
The same seed, jax version and machine give the same weights. About 5
minutes on 2 CPU cores with the defaults; the preset ``"byte-stories"``
(``jlora.train._presets``) loads the result.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jlora.io import save_pretrained
from jlora.models import CausalLM, from_hf_config
from jlora.train import ByteTokenizer, masked_nll
from jlora.train._corpus import story
from jlora.train._data import BatchStream, eval_batches, pack, split_rows

OUT = Path(__file__).resolve().parent.parent / "jlora" / "train" / "data" / "base"
ARCH = dict(vocab_size=258, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=256, pad_token_id=257)


def build_model(seed: int) -> CausalLM:
  """The base architecture with random weights (a ``LlamaConfig`` travels along for ``config.json``)."""
  from transformers import LlamaConfig

  return CausalLM(from_hf_config(LlamaConfig(**ARCH)), rngs=nnx.Rngs(seed), remat="none")


def story_rows(count: int, seq_len: int, seed: int):
  tok = ByteTokenizer()
  rng = random.Random(seed)
  examples = []
  for _ in range(count):
    ids = tok.encode(story(rng)) + [tok.eos_id]
    examples.append((ids, [1] * len(ids)))
  return pack(examples, seq_len, tok.pad_id)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stories", type=int, default=20000)
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--learning-rate", type=float, default=3e-3)
  p.add_argument("--out", type=Path, default=OUT)
  args = p.parse_args(argv)

  rows = story_rows(args.stories, args.seq_len, args.seed + 1)  # seed 0 drew the shipped corpus
  train_rows, held_rows = split_rows(rows, 0.02, args.seed)
  stream = BatchStream(train_rows, args.batch_size, args.seed)
  held = eval_batches(held_rows, args.batch_size, 8)
  model = build_model(args.seed)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.learning_rate, min(100, args.steps // 10),
                                                args.steps, args.learning_rate * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
  opt_state = tx.init(params)

  def loss_fn(params, batch):
    logits = nnx.merge(graphdef, params, rest, copy=True)(batch["tokens"])
    total, count = masked_nll(logits, batch["tokens"], batch["loss_mask"])
    return total / jnp.maximum(count, 1.0), (total, count)

  @jax.jit
  def step(params, opt_state, batch):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def evaluate(params, batch):
    return loss_fn(params, batch)[1]

  def held_out_loss(params):
    sums = [evaluate(params, b) for b in held]
    return sum(float(t) for t, _ in sums) / sum(float(c) for _, c in sums)

  print(f"{len(train_rows)} training rows of {args.seq_len} bytes; held-out loss {held_out_loss(params):.3f}")
  t0 = time.perf_counter()
  for i in range(1, args.steps + 1):
    params, opt_state, loss = step(params, opt_state, next(stream))
    if i % 100 == 0 or i == args.steps:
      print(f"step {i}: loss {float(loss):.3f}, held-out {held_out_loss(params):.3f}, "
            f"{time.perf_counter() - t0:.0f} s", flush=True)
    if not math.isfinite(float(loss)):
      raise FloatingPointError(f"loss became {float(loss)} at step {i}; lower --learning-rate.")
  nnx.update(model, params)
  save_pretrained(model, args.out)
  size = sum(f.stat().st_size for f in args.out.iterdir())
  print(f"wrote {args.out} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()

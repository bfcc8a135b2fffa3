"""Compiled train steps and logits of a small Llama on 8 simulated CPU devices, for the scale-out tests.

``on_8_devices(job, cases)`` runs this file in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (jax reads it once, at
start) and returns its JSON answer:

- ``"memory"``: per case ``(data, fsdp, tensor, remat[, scan_unroll])`` the
  compiled train step's per-device ``memory_analysis()`` (argument, temp,
  output bytes) and the result shapes of every all-gather in its HLO;
- ``"logits"``: per case ``(data, fsdp, tensor)`` the max |logit difference|
  and the loss difference of one train step against the same model on one
  device (8 rows in all).

The model is ``MODEL`` (LoRA r=8 on all seven projections, float32) with
``ROWS`` rows of ``SEQ`` tokens per data-parallel device.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
MODEL = dict(model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
             num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=64,
             rope=(("rope_theta", 10000.0), ("rope_type", "default")))
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 8
ROWS = 2
SEQ = 32


# (data, fsdp, tensor, remat) cases compiled once per test session, shared by the memory tests.
MEMORY_CASES = ((1, 1, 1, "matmuls"), (1, 2, 1, "matmuls"), (1, 4, 1, "matmuls"), (1, 8, 1, "matmuls"),
                (1, 1, 2, "matmuls"), (1, 1, 4, "matmuls"), (1, 2, 2, "matmuls"), (1, 1, 1, "none"),
                (1, 4, 1, "none"), (1, 1, 1, "full"))


# Layers per loop step compiled for the unrolling tests (one device, "matmuls"): rolled, 2, all.
UNROLLS = (1, 2, MODEL["num_hidden_layers"])


@functools.lru_cache(maxsize=None)
def compiled_memory() -> dict:
  """``on_8_devices("memory", MEMORY_CASES)``, keyed ``"DxFxT/remat"``."""
  return on_8_devices("memory", [list(c) for c in MEMORY_CASES])


@functools.lru_cache(maxsize=None)
def compiled_unrolled_memory() -> dict:
  """The one-device ``"matmuls"`` step at each of ``UNROLLS``, keyed ``"1x1x1/matmuls/u<unroll>"``."""
  return on_8_devices("memory", [[1, 1, 1, "matmuls", u] for u in UNROLLS])


def on_8_devices(job: str, cases: list) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, __file__, job, json.dumps(cases)], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _model(remat: str = "matmuls", unroll: int = 1):
  import jax.numpy as jnp
  from flax import nnx
  import jlora
  from jlora import testing
  from jlora.models import CausalLM, ModelConfig

  model = CausalLM(ModelConfig(**MODEL), dtype=jnp.float32, rngs=nnx.Rngs(0), remat=remat, scan_unroll=unroll)
  jlora.get_peft_model(model, jlora.LoraConfig(r=RANK, lora_alpha=16, target_modules=list(TARGETS)))
  testing.randomize_adapters(model, seed=1, scale=0.1)
  return model


def _setup(shape, remat="matmuls", rows=None, unroll=1):
  import jax
  import numpy as np
  from jax.sharding import Mesh
  from jlora.train import _sharding, _steps

  model = _model(remat, unroll)
  mesh = Mesh(np.asarray(jax.devices()[:int(np.prod(shape))]).reshape(shape), _sharding.AXES)
  parts = _steps.split_model(model)
  tx = _steps.make_optimizer(model, parts.params, learning_rate=1e-2, steps=10, warmup_steps=0,
                             end_lr_ratio=1.0, weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=0.0, grad_accum=1)
  params, rng, frozen = (_sharding.shard_state(s, mesh) for s in (parts.params, parts.rng, parts.frozen))
  rows = rows or ROWS * shape[0] * shape[1]
  ids = np.random.RandomState(0).randint(0, MODEL["vocab_size"], (rows, SEQ)).astype(np.int32)
  batch = _sharding.put_batch(dict(tokens=ids, attention_mask=np.ones_like(ids), loss_mask=np.ones_like(ids)),
                              mesh)
  step = _steps.make_train_step(parts.graphdef, tx, mesh=mesh)
  return model, mesh, parts, step, (params, jax.jit(tx.init)(params), rng, frozen, batch)


def memory(cases) -> dict:
  out = {}
  for d, f, t, remat, *unroll in cases:
    _, _, _, step, args = _setup((d, f, t), remat, unroll=unroll[0] if unroll else 1)
    compiled = step.lower(*args).compile()
    m = compiled.memory_analysis()
    gathers = re.findall(r"= \w+\[([\d,]*)\][^ ]* all-gather\(", compiled.as_text())
    out[f"{d}x{f}x{t}/{remat}" + "".join(f"/u{u}" for u in unroll)] = dict(argument=m.argument_size_in_bytes, temp=m.temp_size_in_bytes,
                                       output=m.output_size_in_bytes, gathers=gathers)
  return out


def logits(cases) -> dict:
  import jax
  import numpy as np
  from flax import nnx
  from jlora.models._remat import placed
  from jlora.train import _sharding

  def forward(graphdef, where):
    def run(state, ids):
      with placed(where):
        return nnx.merge(graphdef, state, copy=True)(ids)
    return jax.jit(run)

  out = {}
  for d, f, t in [(1, 1, 1)] + [tuple(c) for c in cases]:
    model, mesh, parts, step, args = _setup((d, f, t), rows=8)
    graphdef, state = nnx.split(model)
    state = _sharding.shard_state(state, mesh)
    ids = _sharding.put_batch({"tokens": np.asarray(args[-1]["tokens"])}, mesh)["tokens"]
    value = np.asarray(forward(graphdef, _sharding.placement(mesh))(state, ids))
    loss = float(step(*args)[3])
    if (d, f, t) == (1, 1, 1):
      reference = value, loss
      continue
    out[f"{d}x{f}x{t}"] = dict(logits=float(np.abs(value - reference[0]).max()),
                               scale=float(np.abs(reference[0]).max()), loss=abs(loss - reference[1]))
  return out


if __name__ == "__main__":
  job, cases = sys.argv[1], json.loads(sys.argv[2])
  print(json.dumps({"memory": memory, "logits": logits}[job](cases)))

"""Where a sharded train step's device memory goes, read from the compiled step without running it.

    python bench/memory_probe.py --shape wide70b --layers 48 --mesh 1,2,1 --remat full --out $OUT

Builds the model abstractly (``nnx.eval_shape``: no weights are allocated),
lowers and compiles ``jlora.train``'s step for the mesh with every input
given as a sharded ``ShapeDtypeStruct``, and prints XLA's per-device
``memory_analysis()`` beside the memory plan's estimate, then the largest
buffers the step makes that have a leading dimension of ``layers`` (a whole
stack of per-layer arrays: gathered or copied weights, saved residuals).
Writes the optimized HLO to ``--out`` for reading.

Works on CPU too (``XLA_FLAGS=--xla_force_host_platform_device_count=8``),
where the layouts, and so the copies, can differ from the GPU's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
         "pred": 1, "s4": 0.5, "u4": 0.5}
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\](?:\{[^}]*\})? ([\w\-]+)\(")


def stacked_buffers(hlo: str, layers: int, min_bytes: float) -> list[dict]:
  """Instructions whose result is ``[layers, ...]`` and at least ``min_bytes``, largest first.

  Parameters are left out (they are the sharded inputs); a ``fusion`` or
  ``copy`` of a weight stack is what a layout change or a hoisted gather
  costs, a ``dynamic-update-slice`` is a stack of saved residuals.
  """
  found = []
  for line in hlo.splitlines():
    match = INSTRUCTION.match(line)
    if not match:
      continue
    name, dtype, dims, op = match.groups()
    shape = [int(d) for d in dims.split(",") if d]
    if not shape or shape[0] != layers or op == "parameter" or dtype not in BYTES:
      continue
    size = BYTES[dtype] * math.prod(shape)
    if size >= min_bytes:
      found.append(dict(name=name, op=op, dtype=dtype, shape=shape, bytes=size))
  return sorted(found, key=lambda f: -f["bytes"])


def abstract_job(args):
  """``(step, abstract inputs, model)``: ``jlora.train``'s step and sharded ShapeDtypeStructs for it."""
  import bench
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import Mesh, NamedSharding
  import jlora
  from jlora.models import CausalLM, ModelConfig, from_hf_config
  from jlora.nn import set_lora_matmul
  from jlora.train import (MESH_AXES, batch_sharding, make_optimizer, make_train_step, split_model,
                           state_shardings)

  if args.shape == "wide70b":
    config = ModelConfig(num_hidden_layers=args.layers, **bench.WIDE70B)
  else:
    import transformers
    config = from_hf_config(transformers.LlamaConfig(num_hidden_layers=args.layers, **bench.SHAPES[args.shape]["hf"]))

  def make():
    model = CausalLM(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0), remat=args.remat,
                     scan_unroll=args.scan_unroll)
    jlora.get_peft_model(model, jlora.LoraConfig(r=bench.RANK, lora_alpha=2 * bench.RANK,
                                                 target_modules=list(bench.TARGETS), init_lora_weights=False))
    return model

  model = nnx.eval_shape(make)
  set_lora_matmul(model, args.lora_matmul, shared_input=bool(args.shared))
  shape = tuple(int(x) for x in args.mesh.split(","))
  mesh = Mesh(np.asarray(jax.devices()[:math.prod(shape)]).reshape(shape), MESH_AXES)
  parts = split_model(model)
  tx = make_optimizer(model, parts.params, learning_rate=1e-4, steps=1000, warmup_steps=0, end_lr_ratio=1.0,
                      weight_decay=0.01, b1=0.9, b2=0.999, grad_clip=0.0, grad_accum=1)

  def placed(state):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        state, state_shardings(state, mesh))

  params, rng, frozen = (placed(s) for s in (parts.params, parts.rng, parts.frozen))
  opt_state = jax.eval_shape(jax.jit(tx.init), params)
  rows = args.batch * shape[0] * shape[1]
  tokens = jax.ShapeDtypeStruct((rows, args.seq), jnp.int32, sharding=batch_sharding(mesh))
  batch = dict(tokens=tokens, attention_mask=tokens, loss_mask=tokens)
  step = make_train_step(parts.graphdef, tx, mesh=mesh)
  return step, (params, opt_state, rng, frozen, batch), model, shape, rows


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--shape", default="tinyllama", help="tinyllama, llama3b or wide70b")
  parser.add_argument("--layers", type=int, default=None)
  parser.add_argument("--mesh", default="1,2,1", help="data,fsdp,tensor")
  parser.add_argument("--batch", type=int, default=1, help="rows per data-parallel device")
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--remat", default="matmuls")
  parser.add_argument("--scan-unroll", type=int, default=1, help="layers per step of the layer loop")
  parser.add_argument("--lora-matmul", default="auto")
  parser.add_argument("--shared", type=int, default=0)
  parser.add_argument("--out", default=None, help="folder for the optimized HLO")
  args = parser.parse_args()
  import bench
  if args.layers is None:
    args.layers = bench.SHAPES[args.shape]["layers"] if args.shape in bench.SHAPES else 48
  bench._import_jax()
  import jax
  step, inputs, model, shape, rows = abstract_job(args)
  compiled = step.lower(*inputs).compile()
  memory = compiled.memory_analysis()
  hlo = compiled.as_text()
  plan = bench._plan_bytes(model, argparse.Namespace(seq=args.seq, remat=args.remat, scan_unroll=args.scan_unroll), shape, rows)
  figures = dict(argument=memory.argument_size_in_bytes, output=memory.output_size_in_bytes,
                 temp=memory.temp_size_in_bytes, alias=memory.alias_size_in_bytes)
  total = figures["argument"] + figures["output"] + figures["temp"] - figures["alias"]
  stacks = stacked_buffers(hlo, args.layers, min_bytes=0.01 * total)
  gib = lambda b: round(b / 2**30, 3)
  print(json.dumps(dict(vars(args), backend=jax.default_backend(), compiled_gib={k: gib(v) for k, v in figures.items()},
                        compiled_total_gib=gib(total), plan_gib=None if plan is None else gib(plan),
                        stacked=[dict(s, gib=gib(s["bytes"])) for s in stacks[:20]])), flush=True)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    name = (f"{args.shape}-{args.layers}-{args.mesh.replace(',', 'x')}-{args.remat}-{args.lora_matmul}"
            f"-unroll-{args.scan_unroll}")
    with open(os.path.join(args.out, name + ".hlo.txt"), "w") as f:
      f.write(hlo)


if __name__ == "__main__":
  main()

"""jlora vs PEFT on one GPU: training tokens/s, MFU, peak memory, compile time, forward cost.

Both frameworks run the same work in the same call: a TinyLlama-1.1B-shaped
Llama (random init, bf16 base), LoRA r=16 / alpha=32 on all 7 linear
projections, AdamW, causal-LM loss. Each measurement runs in its own
subprocess so peak-memory figures do not mix.

    python bench/bench.py run --suite train --batches 4,8 --out $OUT/results.jsonl
    python bench/bench.py report $OUT/results.jsonl > bench/RESULTS.md

MFU uses the usual 6·N·tokens training FLOPs (N = all base parameters) over
989 TFLOP/s (H100 SXM dense bf16), the convention behind the issue's anchor
numbers. LoRA training does no base weight-gradient matmuls, so the work done
is nearer 4·N·tokens; the table states both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEAK_FLOPS = 989e12
TINYLLAMA_LAYERS = 22
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)


def make_checkpoint(path: str, layers: int) -> None:
  """A random-init Llama of TinyLlama's shape, saved as HF safetensors (bf16)."""
  if os.path.exists(os.path.join(path, "config.json")):
    return
  import torch
  import transformers
  config = transformers.LlamaConfig(num_hidden_layers=layers, torch_dtype="bfloat16", **TINYLLAMA)
  torch.manual_seed(0)
  with torch.device("cuda"):
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
  model.save_pretrained(path, safe_serialization=True)


def param_count(path: str) -> int:
  from safetensors import safe_open
  import glob
  total = 0
  for file in glob.glob(os.path.join(path, "*.safetensors")):
    with safe_open(file, "np") as f:
      for key in f.keys():
        total += int(__import__("math").prod(f.get_slice(key).get_shape()))
  return total


# ---------------------------------------------------------------- PEFT side

def run_peft(args) -> dict:
  import torch
  import transformers
  import peft

  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM.from_pretrained(
      args.ckpt, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
  config_cls = peft.LoraConfig
  model = peft.get_peft_model(model, config_cls(r=16, lora_alpha=32, target_modules=TARGETS))
  step_model = torch.compile(model) if args.framework == "peft-compile" else model
  ids = torch.randint(0, TINYLLAMA["vocab_size"], (args.batch, args.seq), device="cuda")
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

  def train_step():
    out = step_model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss

  def forward():
    with torch.no_grad():
      return step_model(input_ids=ids).logits

  if args.task == "train":
    return [_time_torch(train_step, args)]
  with model.disable_adapter():
    results = [dict(_time_torch(forward, args), base_only=True)]
  results.append(_time_torch(forward, args))
  model.merge_adapter()
  results.append(dict(_time_torch(forward, args), merged=True))
  return results


def _time_torch(fn, args) -> dict:
  import torch
  torch.cuda.synchronize()
  start = time.perf_counter()
  fn()
  torch.cuda.synchronize()
  first = time.perf_counter() - start
  for _ in range(args.warmup):
    fn()
  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
  return dict(first_step_s=first, step_s=sorted(times)[len(times) // 2],
              peak_bytes=torch.cuda.max_memory_allocated())


# --------------------------------------------------------------- jlora side

def _import_jax():
  sys.path.insert(0, ROOT)
  sys.path.insert(0, HERE)
  import jax_compat
  jax_compat.patch_hijax()


def _jlora_model(args, adapter: str | None):
  import jax.numpy as jnp
  import jlora
  model = jlora.from_pretrained(args.ckpt, dtype=jnp.bfloat16)
  model.remat = args.remat
  if adapter:
    config_cls = jlora.MoSLoraConfig if adapter == "moslora" else jlora.LoraConfig
    jlora.get_peft_model(model, config_cls(r=16, lora_alpha=32, target_modules=TARGETS,
                                           init_lora_weights=False))
  return model


def run_jlora_forward(args) -> list[dict]:
  """Base, unmerged LoRA, merged LoRA and unmerged MoSLoRA forward passes, in that order."""
  _import_jax()
  import jax
  from flax import nnx
  import jlora

  ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, TINYLLAMA["vocab_size"])

  def time_forward(model):
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    return _time_jax(lambda: forward(state, ids), args)

  results = [dict(time_forward(_jlora_model(args, None)), base_only=True, merged=False, adapter="lora")]
  model = _jlora_model(args, "lora")
  results.append(dict(time_forward(model), base_only=False, merged=False, adapter="lora"))
  jlora.merge_and_unload(model)
  results.append(dict(time_forward(model), base_only=False, merged=True, adapter="lora"))
  del model
  results.append(dict(time_forward(_jlora_model(args, "moslora")), base_only=False, merged=False,
                      adapter="moslora"))
  return results


def _jlora_train_step(model, mesh=None):
  """The step ``jlora.train`` runs (masked causal-LM loss, AdamW on the adapter only), placed on ``mesh``."""
  from jlora.train import make_optimizer, make_train_step, shard_state, split_model
  parts = split_model(model)
  tx = make_optimizer(model, parts.params, learning_rate=1e-4, steps=1000, warmup_steps=0,
                             end_lr_ratio=1.0, weight_decay=0.01, b1=0.9, b2=0.999, grad_clip=0.0,
                             grad_accum=1)
  params, rng, frozen = parts.params, parts.rng, parts.frozen
  if mesh is not None:
    params, rng, frozen = (shard_state(s, mesh) for s in (params, rng, frozen))
  return make_train_step(parts.graphdef, tx, mesh), [params, tx.init(params), rng], frozen


def _time_train(model, batch: int, seq: int, args, mesh=None) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jlora.train import put_batch
  train_step, carry, frozen = _jlora_train_step(model, mesh)
  ids = np.asarray(jax.random.randint(jax.random.key(0), (batch, seq), 0, TINYLLAMA["vocab_size"]))
  host = dict(tokens=ids, attention_mask=np.ones_like(ids), loss_mask=np.ones_like(ids))
  inputs = put_batch(host, mesh) if mesh is not None else jax.tree.map(jnp.asarray, host)

  def step():
    carry[0], carry[1], carry[2], loss, _ = train_step(carry[0], carry[1], carry[2], frozen, inputs)
    return loss

  return _time_jax(step, args)


def run_jlora_train(args) -> list[dict]:
  _import_jax()
  return [_time_train(_jlora_model(args, args.adapter), args.batch, args.seq, args)]


WIDE70B = dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
               num_attention_heads=64, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
               norm_eps=1e-5, rope=(("rope_theta", 500000.0), ("rope_type", "default")))


def _wide_model(args, mesh):
  """A Llama of 70B-class width (``args.layers`` deep), created already split over ``mesh``.

  ``nnx.eval_shape`` gives the shapes, the jitted init writes each array
  straight into its shard (``out_shardings``): the whole model never exists
  on one device. bf16 base, LoRA r=16 on the seven projections.
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx
  import jlora
  from jlora.models import CausalLM, ModelConfig
  from jlora.train import state_shardings

  config = ModelConfig(num_hidden_layers=args.layers, **WIDE70B)
  make = lambda: CausalLM(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0),
                          remat=args.remat)
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  state = jax.jit(lambda: nnx.state(make()), out_shardings=state_shardings(abstract, mesh))()
  model = nnx.merge(graphdef, state)
  jlora.get_peft_model(model, jlora.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                               init_lora_weights=False))
  return model


def _plan_bytes(model, args, mesh_shape, batch: int) -> int | None:
  """The memory plan's per-device estimate for this run (``jlora.train._memory``)."""
  import jax
  from jlora.train import plan_job
  plan = plan_job(model, devices=int(__import__("math").prod(mesh_shape)), batch_size=batch,
                          seq_len=args.seq, mesh=mesh_shape, remat=args.remat, r=16, targets=TARGETS,
                          capacity_gib=1e6, backend=jax.default_backend())
  return None if plan is None else plan.total


def run_jlora_scaling(args) -> list[dict]:
  """Weak scaling: ``args.batch`` rows per data-parallel GPU on the mesh ``args.mesh`` ("data,fsdp,tensor")."""
  _import_jax()
  import jax
  import numpy as np
  from jax.sharding import Mesh
  from jlora.train import MESH_AXES
  shape = tuple(int(x) for x in args.mesh.split(","))
  devices = int(np.prod(shape))
  mesh = Mesh(np.asarray(jax.devices()[:devices]).reshape(shape), MESH_AXES)
  batch = args.batch * shape[0] * shape[1]
  model = _wide_model(args, mesh) if args.model == "wide70b" else _jlora_model(args, "lora")
  plan = _plan_bytes(model, args, shape, batch)
  result = _time_train(model, batch, args.seq, args, mesh)
  stats = [d.memory_stats() or {} for d in jax.devices()[:devices]]
  result.update(devices=devices, mesh=dict(zip(MESH_AXES, shape)), batch=batch, rows=args.batch,
                model=args.model,
                peak_bytes=max(s.get("peak_bytes_in_use", 0) for s in stats), plan_bytes=plan)
  if args.model == "wide70b":
    from jlora.models import ModelConfig
    from jlora.train import Arch
    result["params"] = Arch.of(ModelConfig(num_hidden_layers=args.layers, **WIDE70B)).base_params()
  return [result]


def _time_jax(fn, args) -> dict:
  import jax
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  for _ in range(args.warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  stats = jax.devices()[0].memory_stats() or {}
  return dict(first_step_s=first, step_s=sorted(times)[len(times) // 2],
              peak_bytes=stats.get("peak_bytes_in_use", 0))


# ------------------------------------------------------------ orchestration

def worker(args) -> None:
  if args.framework == "jlora":
    run = {"train": run_jlora_train, "forward": run_jlora_forward, "scaling": run_jlora_scaling}[args.task]
    results = run(args)
  else:
    results = run_peft(args)
  n = results[0].get("params") or param_count(args.ckpt)
  for result in results:
    result = dict(dict(framework=args.framework, task=args.task, batch=args.batch, seq=args.seq,
                       layers=args.layers, adapter=args.adapter, remat=args.remat, merged=False, base_only=False), **result)
    result["tokens_per_s"] = result["batch"] * result["seq"] / result["step_s"]
    if args.task in ("train", "scaling"):
      result["mfu_6n"] = 6 * n * result["tokens_per_s"] / PEAK_FLOPS / result.get("devices", 1)
      result["params"] = n
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args, **overrides) -> list[dict]:
  opts = dict(framework="jlora", task="train", batch=4, seq=2048, layers=22, adapter="lora",
              remat=args.remat, steps=args.steps, warmup=args.warmup)
  opts.update(overrides)
  ckpt = f"/dev/shm/tinyllama-{opts['layers']}"
  if opts.get("model", "tinyllama") == "tinyllama":
    make_checkpoint(ckpt, opts["layers"])
  cmd = [sys.executable, __file__, "worker", "--ckpt", ckpt]
  for key, value in opts.items():
    cmd += [f"--{key.replace('_', '-')}", str(value)]
  print("#", " ".join(cmd[2:]), flush=True)
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
  except subprocess.TimeoutExpired:
    return [dict(opts, error=f"timed out after {args.timeout} s")]
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if not lines or proc.returncode:
    print(proc.stdout[-2000:], proc.stderr[-4000:], flush=True)
  if not lines:
    return [dict(opts, error=(proc.stderr or proc.stdout)[-500:])]
  return [json.loads(l[len("RESULT "):]) for l in lines]


SUITES = {
    "train": lambda b: [dict(framework=f, task="train", batch=n)
                        for n in b for f in ("jlora", "peft", "peft-compile")],
    "moslora": lambda b: [dict(framework="jlora", task="train", batch=n, adapter="moslora") for n in b],
    "forward": lambda b: [dict(framework=f, task="forward", batch=n, seq=s)
                          for (n, s) in ((1, 128), (8, 1024)) for f in ("jlora", "peft")],
    # 1 GPU, then data=2, fsdp=2, tensor=2 at the same rows per data-parallel GPU (2 GPUs).
    "scaling": lambda b: [dict(framework="jlora", task="scaling", batch=n, mesh=m)
                          for n in b for m in ("1,1,1", "2,1,1", "1,2,1", "1,1,2")],
    # A Llama of 70B width, 48 layers: 43B params, 86 GB in bf16, more than one 80 GB GPU; fsdp=2.
    "wide": lambda b: [dict(framework="jlora", task="scaling", batch=1, seq=2048, model="wide70b", layers=48,
                            mesh="1,2,1", remat="full", steps=4, warmup=1)],
    "compile": lambda b: [dict(framework="jlora", task="train", batch=1, seq=2048, layers=n)
                          for n in (11, 22)],
}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["run", "worker", "report"])
  parser.add_argument("results", nargs="?")
  parser.add_argument("--suite", default="train")
  parser.add_argument("--batches", default="4,8")
  parser.add_argument("--out", default="results.jsonl")
  parser.add_argument("--framework", default="jlora")
  parser.add_argument("--task", default="train")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--layers", type=int, default=22)
  parser.add_argument("--adapter", default="lora")
  parser.add_argument("--ckpt")
  parser.add_argument("--remat", default="matmuls", help="jlora: what the backward pass keeps per layer")
  parser.add_argument("--mesh", default="1,1,1", help="scaling: data,fsdp,tensor")
  parser.add_argument("--model", default="tinyllama", help="scaling: tinyllama (checkpoint) or wide70b (sharded init)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--timeout", type=int, default=400)
  args = parser.parse_args()
  if args.mode == "worker":
    worker(args)
  elif args.mode == "run":
    batches = [int(b) for b in args.batches.split(",")]
    for suite in args.suite.split(","):
      for overrides in SUITES[suite](batches):
        for result in spawn(args, **overrides):
          with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
          print(json.dumps(result), flush=True)
  else:
    from report import render
    print(render([json.loads(l) for l in open(args.results)]))


if __name__ == "__main__":
  main()

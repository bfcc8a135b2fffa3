"""jlora vs PEFT on one GPU: training tokens/s, MFU, peak memory, compile time, forward cost.

Both frameworks run the same work in the same call: a Llama of a named shape
(TinyLlama-1.1B or Llama-3.2-3B, random init, bf16 base), LoRA r=16 / alpha=32
on all 7 linear projections, AdamW, causal-LM loss. Each measurement runs in
its own subprocess so peak-memory figures do not mix. jlora's levers are
flags, so one call compares them side by side:

    python bench/bench.py run --suite train,forward,mixed,variants --out $OUT/results.jsonl
    python bench/bench.py report $OUT/results.jsonl > bench/RESULTS.md

A suite row may carry its own per-run ``timeout`` (seconds; the larger of it
and ``--timeout`` applies), e.g. PEFT + torch.compile at the Llama-3.2-3B
shape, whose compile alone outlasts the usual limit; ``--frameworks`` runs
only the rows of the named frameworks (to split a suite over calls).

MFU (headline) counts the work a LoRA step does: ``4·N_base`` (forward and
input gradients of the frozen matmuls, no weight gradients) ``+ 3·F_attn``
(causal attention forward, backward twice that) ``+ 6·N_adapter`` per token,
over 989 TFLOP/s (H100 SXM dense bf16). ``N_base`` counts matmul weights
(the lm_head, tied or not, but not the embedding lookup). 6N and 4N with N =
all parameters are kept as extra columns for comparison with published tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEAK_FLOPS = 989e12
RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "tinyllama": dict(layers=22, hf=dict(
        hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
        vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "llama3b": dict(layers=28, hf=dict(
        hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8,
        head_dim=128, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_theta=500000.0)),
    "tiny": dict(layers=2, hf=dict(  # smoke runs on CPU
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    # Gemma-2-2B: 26 layers alternating 4096-token windows and global attention, soft-caps on, tied 256k vocab.
    "gemma2_2b": dict(layers=26, model_type="gemma2", hf=dict(
        hidden_size=2304, intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        vocab_size=256000, max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True,
        query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0)),
    # Phi-3-mini (4k): fused qkv_proj / gate_up_proj, one 2047-token window on every layer.
    "phi3_mini": dict(layers=32, model_type="phi3", targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                      hf=dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=32,
                              num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                              original_max_position_embeddings=4096, rms_norm_eps=1e-5, sliding_window=2047,
                              tie_word_embeddings=False, pad_token_id=32000)),
    "wide70b": dict(layers=48, hf=dict(  # 70B-class width; initialised sharded, no checkpoint
        hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
        head_dim=128, vocab_size=128256)),
}


def flop_counts(shape: str, layers: int, seq: int, rank: int = RANK) -> dict:
  """Per-token FLOP terms of the honest MFU: matmul weights, adapter factors, causal attention."""
  c = SHAPES[shape]["hf"]
  h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
  d = c.get("head_dim", h // c["num_attention_heads"])
  q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
  projections = [(h, q), (h, kv), (h, kv), (q, h), (h, f), (h, f), (f, h)]
  n_base = layers * sum(i * o for i, o in projections) + h * v
  n_adapter = layers * sum(rank * (i + o) for i, o in projections)
  # Per layer and query token: QK^T and PV, 2·d FLOPs per head and key each, over T/2 keys on average.
  attn_fwd = layers * 2 * 2 * c["num_attention_heads"] * d * seq / 2
  return dict(n_base=n_base, n_adapter=n_adapter, attn_fwd=attn_fwd,
              train_flops_per_token=4 * n_base + 3 * attn_fwd + 6 * n_adapter)


def make_checkpoint(path: str, shape: str, layers: int) -> None:
  """A random-init Llama of the named shape, saved as HF safetensors (bf16)."""
  if os.path.exists(os.path.join(path, "config.json")):
    return
  import torch
  import transformers
  config = transformers.AutoConfig.for_model(SHAPES[shape].get("model_type", "llama"), num_hidden_layers=layers,
                                             torch_dtype="bfloat16", **SHAPES[shape]["hf"])
  torch.manual_seed(0)
  with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
  model.save_pretrained(path, safe_serialization=True)
  del model
  if torch.cuda.is_available():
    torch.cuda.empty_cache()  # this (parent) process keeps no GPU memory from the runs it spawns


def param_count(path: str) -> int:
  from safetensors import safe_open
  import glob
  total = 0
  for file in glob.glob(os.path.join(path, "*.safetensors")):
    with safe_open(file, "np") as f:
      for key in f.keys():
        total += int(__import__("math").prod(f.get_slice(key).get_shape()))
  return total


def _vocab(args) -> int:
  return SHAPES[args.shape]["hf"]["vocab_size"]


# ---------------------------------------------------------------- PEFT side

def run_peft(args) -> dict:
  import torch
  import transformers
  import peft

  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM.from_pretrained(
      args.ckpt, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
  config_cls = peft.LoraConfig
  model = peft.get_peft_model(model, config_cls(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS,
                                                use_dora=args.adapter == "dora"))
  step_model = torch.compile(model) if args.framework == "peft-compile" else model
  ids = torch.randint(0, _vocab(args), (args.batch, args.seq), device="cuda")
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


def _jlora_model(args, adapter: str | None, matmul: str | None = None, mesh=None):
  """The checkpoint with ``adapter`` ("lora" / "moslora" / "wlora" over two LoRAs) on the 7 projections.

  ``matmul`` (default ``args.lora_matmul``) picks plain autodiff or the fused
  LoRA matmul; ``args.shared`` lets q/k/v and gate/up share one input matmul.
  ``mesh``: load each parameter's shards straight onto their devices (no whole copy on one GPU).
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx
  import jlora
  from jlora.nn import set_lora_matmul
  model = jlora.from_pretrained(args.ckpt, dtype=jnp.bfloat16, mesh=mesh)
  model.remat = args.remat
  model.scan_unroll = scan_unroll(args, model)
  model.attention = args.attention
  lora = lambda: jlora.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False)
  if adapter == "moslora":
    jlora.get_peft_model(model, jlora.MoSLoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS,
                                                    init_lora_weights=False))
  elif adapter == "wlora":
    jlora.get_peft_model(model, lora(), "up1")
    jlora.add_adapter(model, "up2", lora())
    jlora.add_adapter(model, "default", jlora.WLoraConfig(upstream_loras=["up1", "up2"]))
    jlora.set_adapter(model, "default")
  elif adapter == "dora":
    jlora.get_peft_model(model, dataclasses.replace(lora(), use_dora=True))
  elif adapter:
    jlora.get_peft_model(model, lora())
  if adapter:
    set_lora_matmul(model, matmul or args.lora_matmul, shared_input=bool(args.shared))
  if adapter and args.adapter_dtype == "bfloat16":
    params = nnx.state(model, jlora.LoraParam)
    nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))
  return model


def scan_unroll(args, model) -> int:
  """``args.scan_unroll``, with ``"auto"`` resolved as ``jlora.train`` resolves it (the memory plan of
  this run on this device: fully unrolled where it fits with margin, else 1)."""
  if args.scan_unroll != "auto":
    return int(args.scan_unroll)
  import jax
  from jlora.train import Arch, choose_scan_unroll, device_capacity
  arch = Arch.of(model.config)
  return choose_scan_unroll(arch, capacity=device_capacity(), rows_per_device=args.batch, seq_len=args.seq,
                            r=RANK, targets=TARGETS, fused_attention=jax.default_backend() == "gpu")


def _forward_timer(args, ids):
  import jax
  from flax import nnx

  def time_forward(model):
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    return _time_jax(lambda: forward(state, ids), args)

  return time_forward


def run_jlora_forward(args) -> list[dict]:
  """Base, unmerged LoRA (plain and fused matmul), merged LoRA and unmerged MoSLoRA forward passes."""
  _import_jax()
  import jax
  import jlora
  time_forward = _forward_timer(args, jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, _vocab(args)))
  results = [dict(time_forward(_jlora_model(args, None)), base_only=True, variant="base")]
  for matmul in ("plain", "auto", "exact"):
    results.append(dict(time_forward(_jlora_model(args, "lora", matmul)), variant=f"unmerged lora ({matmul})",
                        lora_matmul=matmul))
  model = _jlora_model(args, "lora")
  jlora.merge_and_unload(model)
  results.append(dict(time_forward(model), merged=True, variant="merged"))
  del model
  results.append(dict(time_forward(_jlora_model(args, "moslora", "auto")), adapter="moslora",
                      variant="unmerged moslora (auto)", lora_matmul="auto"))
  return results


def run_jlora_mixed(args) -> list[dict]:
  """8 distinct adapters, one per row group, in one batch vs one adapter for every row (unmerged)."""
  _import_jax()
  import jax
  import jlora
  time_forward = _forward_timer(args, jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, _vocab(args)))
  results = []
  for matmul in ("plain", "auto"):
    results.append(dict(time_forward(_jlora_model(args, "lora", matmul)), variant=f"single adapter ({matmul})",
                        lora_matmul=matmul))
  model = _jlora_model(args, "lora")
  names = [f"task{i}" for i in range(8)]
  for i, name in enumerate(names):
    jlora.add_adapter(model, name, jlora.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS,
                                                    init_lora_weights=False))
  rows = [names[i * len(names) // args.batch] for i in range(args.batch)]
  with jlora.per_sample_adapters(model, rows):
    results.append(dict(time_forward(model), variant=f"{len(set(rows))} adapters mixed (gathered)"))
  return results


ATTENTION_KERNELS = ("cudnn", "tokamax")  # the first is the reference the others are compared with


def run_jlora_attention(args) -> list[dict]:
  """One layer's attention alone, forward + backward, per kernel: cuDNN vs tokamax, full and packed rows.

  ``q [B, T, H, D]``, ``k, v [B, T, K, D]`` of the shape's attention (bf16);
  packed rows hold records of 100..900 tokens. Each row also reports the
  largest difference of the output and of dq from cuDNN's on the same inputs.
  """
  _import_jax()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jlora.models import AttentionMask, attend

  c = SHAPES[args.shape]["hf"]
  heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
  d = c.get("head_dim", c["hidden_size"] // heads)
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (args.batch, args.seq, heads, d), jnp.bfloat16)
  k, v = (jax.random.normal(key, (args.batch, args.seq, kv_heads, d), jnp.bfloat16) for key in keys[1:3])
  dout = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
  rng = np.random.default_rng(0)
  segments = np.zeros((args.batch, args.seq), np.int32)
  for row in segments:
    start, sid = 0, 1
    while start < args.seq:
      n = int(rng.integers(100, 900))
      row[start:start + n] = sid
      start, sid = start + n, sid + 1
  results, reference = [], {}
  for packed in (False, True):
    seg = jnp.asarray(segments) if packed else None
    for impl in ATTENTION_KERNELS:
      mask = AttentionMask(segment_ids=seg, implementation=impl)
      fwd_bwd = jax.jit(lambda q, k, v, mask=mask: _fwd_bwd(attend, mask, q, k, v, dout))
      row = dict(variant=f"{impl}{' packed' if packed else ''}", attention=impl, packed=packed)
      try:
        out, dq, _, _ = fwd_bwd(q, k, v)
        row.update(_time_jax(lambda: fwd_bwd(q, k, v), args))
      except Exception as e:  # a kernel that does not lower here is a result too
        results.append(dict(row, error=f"{type(e).__name__}: {str(e)[:400]}"))
        continue
      if impl == ATTENTION_KERNELS[0]:
        reference[packed] = (out, dq)
      elif packed in reference:
        ref_out, ref_dq = reference[packed]
        row.update(max_abs_diff_out=float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32)))),
                   max_abs_diff_dq=float(jnp.max(jnp.abs(dq.astype(jnp.float32) - ref_dq.astype(jnp.float32)))))
      results.append(row)
  return results


def _fwd_bwd(attend, mask, q, k, v, dout):
  """The attention output and its gradients ``(out, dq, dk, dv)`` for the cotangent ``dout``."""
  import jax
  out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask), q, k, v)
  return (out, *vjp(dout))


def _jlora_train_step(model, mesh=None, loss_chunk_tokens: int = 0):
  """The step ``jlora.train`` runs (masked causal-LM loss, AdamW on the adapter only), placed on ``mesh``:
  ``(step, carry = [params, opt_state, rng], frozen)``."""
  from jlora.train import make_optimizer, make_train_step, shard_state, split_model
  parts = split_model(model)
  tx = make_optimizer(model, parts.params, learning_rate=1e-4, steps=1000, warmup_steps=0,
                             end_lr_ratio=1.0, weight_decay=0.01, b1=0.9, b2=0.999, grad_clip=0.0,
                             grad_accum=1)
  params, rng, frozen = parts.params, parts.rng, parts.frozen
  if mesh is not None:
    params, rng, frozen = (shard_state(s, mesh) for s in (params, rng, frozen))
  return make_train_step(parts.graphdef, tx, loss_chunk_tokens, mesh=mesh), [params, tx.init(params), rng], frozen


def _step_fn(train_step, carry: list, frozen, batch):
  """``step() -> loss``: one optimizer step of ``train_step`` (jitted or compiled) on ``batch``, updating
  ``carry = [params, opt_state, rng]`` in place."""

  def step():
    carry[0], carry[1], carry[2], loss, _ = train_step(carry[0], carry[1], carry[2], frozen, batch)
    return loss

  return step


def _time_train(model, batch: int, seq: int, args, mesh=None, analyse: bool = False) -> dict:
  """Step time and peak memory; ``analyse`` adds XLA's compiled memory analysis (``compiled``)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jlora.train import put_batch
  train_step, carry, frozen = _jlora_train_step(model, mesh)
  ids = np.asarray(jax.random.randint(jax.random.key(0), (batch, seq), 0, _vocab(args)))
  host = dict(tokens=ids, attention_mask=np.ones_like(ids), loss_mask=np.ones_like(ids))
  inputs = put_batch(host, mesh) if mesh is not None else jax.tree.map(jnp.asarray, host)
  step = _step_fn(train_step, carry, frozen, inputs)
  if not analyse:
    return dict(_time_jax(step, args), scan_unroll=model.scan_unroll)
  memory = train_step.lower(carry[0], carry[1], carry[2], frozen, inputs).compile().memory_analysis()
  compiled = None if memory is None else dict(
      argument=memory.argument_size_in_bytes, output=memory.output_size_in_bytes,
      temp=memory.temp_size_in_bytes, alias=memory.alias_size_in_bytes)
  return dict(_time_jax(step, args), compiled=compiled)


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
                          remat=args.remat, scan_unroll=int(args.scan_unroll))
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  state = jax.jit(lambda: nnx.state(make()), out_shardings=state_shardings(abstract, mesh))()
  model = nnx.merge(graphdef, state)
  jlora.get_peft_model(model, jlora.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                               init_lora_weights=False))
  from jlora.nn import set_lora_matmul
  set_lora_matmul(model, args.lora_matmul, shared_input=bool(args.shared))
  return model


def _plan_bytes(model, args, mesh_shape, batch: int) -> int | None:
  """The memory plan's per-device estimate for this run (``jlora.train._memory``)."""
  import jax
  from jlora.train import plan_job
  plan = plan_job(model, devices=int(__import__("math").prod(mesh_shape)), batch_size=batch,
                          seq_len=args.seq, mesh=mesh_shape, remat=args.remat, r=16, targets=TARGETS,
                          capacity_gib=1e6, backend=jax.default_backend(),
                          scan_unroll=getattr(model, "scan_unroll", 1))
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
  model = _wide_model(args, mesh) if args.model == "wide70b" else _jlora_model(args, "lora", mesh=mesh)
  plan = _plan_bytes(model, args, shape, batch)
  result = _time_train(model, batch, args.seq, args, mesh, analyse=True)
  stats = [d.memory_stats() or {} for d in jax.devices()[:devices]]
  peaks = [s.get("peak_bytes_in_use", 0) for s in stats]
  result.update(devices=devices, mesh=dict(zip(MESH_AXES, shape)), batch=batch, rows=args.batch,
                model=args.model, peak_bytes=max(peaks), peak_bytes_per_device=peaks, plan_bytes=plan,
                compiled=result.pop("compiled", None))
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
  global TARGETS
  TARGETS = SHAPES[args.shape].get("targets", TARGETS)  # Phi-3's fused projections
  if args.framework == "jlora":
    run = {"train": run_jlora_train, "forward": run_jlora_forward, "scaling": run_jlora_scaling,
           "mixed": run_jlora_mixed, "attention": run_jlora_attention}[args.task]
    results = run(args)
  else:
    results = run_peft(args)
  n = results[0].get("params") or param_count(args.ckpt)
  flops = flop_counts(args.shape, args.layers, args.seq)
  for result in results:
    base = dict(framework=args.framework, task=args.task, shape=args.shape, batch=args.batch, seq=args.seq,
                layers=args.layers, adapter=args.adapter, remat=args.remat, merged=False, base_only=False)
    if os.environ.get("XLA_FLAGS"):
      base["xla_flags"] = os.environ["XLA_FLAGS"]
    if args.framework == "jlora":
      base.update(lora_matmul=args.lora_matmul, shared=bool(args.shared), adapter_dtype=args.adapter_dtype,
                  attention=args.attention, scan_unroll=args.scan_unroll)
      if args.scan_unroll == "auto":
        base["scan_unroll_setting"] = "auto"
    result = dict(base, **result)
    if "error" in result:  # one variant that failed (e.g. a kernel that does not lower here)
      print("RESULT " + json.dumps(result), flush=True)
      continue
    result["tokens_per_s"] = result["batch"] * result["seq"] / result["step_s"]
    if args.task in ("train", "scaling"):
      per_device = result["tokens_per_s"] / result.get("devices", 1)
      result.update(params=n, **flops)
      result["mfu"] = flops["train_flops_per_token"] * per_device / PEAK_FLOPS
      result["mfu_6n"] = 6 * n * per_device / PEAK_FLOPS
      result["mfu_4n"] = 4 * n * per_device / PEAK_FLOPS
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args, **overrides) -> list[dict]:
  opts = dict(framework="jlora", task="train", shape="tinyllama", batch=8, seq=2048, adapter="lora",
              remat=args.remat, lora_matmul=args.lora_matmul, shared=args.shared,
              adapter_dtype=args.adapter_dtype, attention=args.attention, scan_unroll=args.scan_unroll,
              steps=args.steps, warmup=args.warmup)
  opts.update(overrides)
  timeout = max(args.timeout, opts.pop("timeout", 0))
  opts.setdefault("layers", SHAPES[opts["shape"]]["layers"])
  ckpt = f"/dev/shm/{opts['shape']}-{opts['layers']}"
  if opts.get("model", "tinyllama") == "tinyllama":  # the wide model is initialised on the GPUs
    make_checkpoint(ckpt, opts["shape"], opts["layers"])
  cmd = [sys.executable, __file__, "worker", "--ckpt", ckpt]
  for key, value in opts.items():
    cmd += [f"--{key.replace('_', '-')}", str(value)]
  print("#", " ".join(cmd[2:]), flush=True)
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return [dict(opts, error=f"timed out after {timeout} s")]
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if not lines or proc.returncode:
    print(proc.stdout[-2000:], proc.stderr[-4000:], flush=True)
  if not lines:
    return [dict(opts, error=(proc.stderr or proc.stdout)[-500:])]
  return [json.loads(l[len("RESULT "):]) for l in lines]


FULL_UNROLL = SHAPES["tinyllama"]["layers"]
UNROLL_TIMEOUT = 300  # an unrolled layer loop compiles every layer: minutes, not seconds
FUSED = dict(lora_matmul="auto", shared=1)
AUTO = dict(lora_matmul="auto", shared=0)  # the fastest measured setting (NOTES.md entries 7-8)
PLAIN = dict(lora_matmul="plain", shared=0)
EXACT = dict(lora_matmul="exact", shared=0)
DEFAULTS = dict(PLAIN, scan_unroll="auto", timeout=UNROLL_TIMEOUT)  # jlora.train's defaults
BEST = dict(AUTO, scan_unroll="auto", timeout=UNROLL_TIMEOUT)


def _attention_suite(shape: str, batch: int, seq: int) -> list[dict]:
  """The attention kernels alone, then a fused-matmul training step on cuDNN and on tokamax."""
  run = dict(framework="jlora", shape=shape, batch=batch, seq=seq, **FUSED)
  return [dict(run, task="attention")] + [dict(run, attention=a) for a in ("cudnn", "tokamax")]


SUITES = {
    # jlora.train's defaults (plain matmul, scan_unroll="auto"), the fastest setting (auto matmul,
    # scan_unroll="auto") and PEFT + torch.compile, TinyLlama shape; "matmuls" adds each matmul rolled.
    "defaults": lambda b: [dict(framework="jlora", batch=n, **extra) for n in b for extra in (DEFAULTS, BEST)]
                          + [dict(framework="peft-compile", batch=n) for n in b],
    "default": lambda b: [dict(framework="jlora", batch=n, **DEFAULTS) for n in b],
    "matmuls": lambda b: [dict(framework="jlora", batch=n, **extra) for n in b for extra in (PLAIN, AUTO, EXACT)],
    "defaults3b": lambda b: [dict(framework="jlora", shape="llama3b", batch=2, seq=4096, **DEFAULTS)]
                            + [dict(framework="peft-compile", shape="llama3b", batch=2, seq=4096, timeout=420)],
    # jlora's matmul levers beside PEFT (eager and torch.compile), TinyLlama shape.
    "train": lambda b: [dict(framework="jlora", batch=n, **PLAIN) for n in b]
                       + [dict(framework="jlora", batch=n, lora_matmul="auto", shared=0) for n in b]
                       + [dict(framework="jlora", batch=n, **FUSED) for n in b]
                       + [dict(framework="jlora", batch=n, lora_matmul="fused", shared=1) for n in b]
                       + [dict(framework="jlora", batch=n, scan_unroll=u, timeout=UNROLL_TIMEOUT, **AUTO)
                          for n in b for u in (2, FULL_UNROLL)]
                       + [dict(framework=f, batch=n) for n in b for f in ("peft", "peft-compile")],
    # Only the layer-loop unrolling rows of "train" (1, 2 and all 22 layers per loop step).
    # The headline comparison alone: plain, auto, auto fully unrolled, PEFT+compile.
    "headline": lambda b: [dict(framework="jlora", batch=n, **PLAIN) for n in b]
                          + [dict(framework="jlora", batch=n, **AUTO) for n in b]
                          + [dict(framework="jlora", batch=n, scan_unroll=FULL_UNROLL, timeout=UNROLL_TIMEOUT, **AUTO)
                             for n in b]
                          + [dict(framework="peft-compile", batch=n) for n in b],
    # The same at the Llama-3.2-3B shape: auto rolled and fully unrolled, PEFT+compile.
    "headline3b": lambda b: [dict(framework="jlora", shape="llama3b", batch=2, seq=4096, scan_unroll=u,
                                  timeout=UNROLL_TIMEOUT, **AUTO) for u in (1, 28)]
                            + [dict(framework="peft-compile", shape="llama3b", batch=2, seq=4096, timeout=420)],
    # Llama-3.2-3B at 1, 2 and 4 layers per loop step, and fully unrolled (28).
    "unroll3b": lambda b: [dict(framework="jlora", shape="llama3b", batch=2, seq=4096, scan_unroll=u,
                                timeout=UNROLL_TIMEOUT, **AUTO) for u in (1, 2, 4, 28)],
    "unroll": lambda b: [dict(framework="jlora", batch=n, scan_unroll=u, timeout=UNROLL_TIMEOUT, **AUTO) for n in b
                         for u in (1, 2, FULL_UNROLL)],
    # Adapter kinds, remat policies and adapter dtype beside plain LoRA, all on the headline's "auto" matmul.
    "variants": lambda b: [dict(framework="jlora", batch=n, **AUTO, **extra) for n in b for extra in (
        dict(), dict(adapter="moslora"), dict(adapter="wlora"), dict(remat="none"), dict(remat="full"),
        dict(adapter_dtype="bfloat16"))],
    "moslora": lambda b: [dict(framework="jlora", batch=n, adapter="moslora", **FUSED) for n in b],
    # DoRA beside LoRA, jlora (fused matmul) and PEFT (eager).
    "dora": lambda b: [dict(framework="jlora", batch=n, adapter=a, **FUSED) for n in b for a in ("lora", "dora")]
                      + [dict(framework="peft", batch=n, adapter=a) for n in b for a in ("lora", "dora")],
    "forward": lambda b: [dict(framework=f, task="forward", batch=n, seq=s, **FUSED)
                          for (n, s) in ((1, 128), (8, 1024)) for f in ("jlora", "peft")],
    "mixed": lambda b: [dict(framework="jlora", task="mixed", batch=8, seq=1024, **FUSED)],
    # Llama-3.2-3B shape: jlora and PEFT (eager and compiled) at 2x4096, and jlora at 4x4096, which it
    # fits. torch.compile of 28 layers and a 128k vocabulary takes minutes: its row has its own limit.
    "llama3b": lambda b: [dict(framework="jlora", shape="llama3b", batch=n, seq=4096, **AUTO) for n in (2, 4)]
                         + [dict(framework="jlora", shape="llama3b", batch=2, seq=4096, **PLAIN)]
                         + [dict(framework="peft", shape="llama3b", batch=2, seq=4096),
                            dict(framework="peft-compile", shape="llama3b", batch=2, seq=4096, timeout=420)],
    # 1 GPU, then data=2, fsdp=2, tensor=2 at the same rows per data-parallel GPU (2 GPUs).
    "scaling": lambda b: [dict(framework="jlora", task="scaling", batch=n, mesh=m, **FUSED)
                          for n in b for m in ("1,1,1", "2,1,1", "1,2,1", "1,1,2")],
    # FSDP alone beside its 1-GPU baseline ("fsdp2": only the 2-GPU run, e.g. under other XLA_FLAGS).
    "fsdp": lambda b: [dict(framework="jlora", task="scaling", batch=n, mesh=m, **FUSED)
                       for n in b for m in ("1,1,1", "1,2,1")],
    "fsdp2": lambda b: [dict(framework="jlora", task="scaling", batch=n, mesh="1,2,1", **FUSED) for n in b],
    # A Llama of 70B width, 48 layers: 43B params, 86 GB in bf16, more than one 80 GB GPU; fsdp=2.
    "wide": lambda b: [dict(framework="jlora", task="scaling", shape="wide70b", model="wide70b", batch=1,
                            seq=2048, mesh="1,2,1", remat="full", steps=4, warmup=1, **FUSED)],
    # cuDNN vs tokamax's Pallas flash attention: the kernels alone (full and packed rows, with their
  # difference from cuDNN), then training steps; TinyLlama (head_dim 64), Llama-3.2-3B (head_dim 128).
  "tokamax": lambda b: _attention_suite("tinyllama", 8, 2048),
  "tokamax3b": lambda b: _attention_suite("llama3b", 2, 4096),
  # Gemma-2-2B (soft-capped attention: tokamax on GPU) and Phi-3-mini at 4x4096, LoRA r=16 on every linear
  # layer, beside PEFT + torch.compile: tokens/s, MFU, peak memory, first step.
  "gemma2": lambda b: [dict(framework="jlora", shape="gemma2_2b", batch=4, seq=4096, **AUTO)]
                      + [dict(framework="peft-compile", shape="gemma2_2b", batch=4, seq=4096, timeout=420)],
  "phi3": lambda b: [dict(framework="jlora", shape="phi3_mini", batch=4, seq=4096, **AUTO)]
                    + [dict(framework="peft-compile", shape="phi3_mini", batch=4, seq=4096, timeout=420)],
  "compile": lambda b: [dict(framework="jlora", task="train", batch=1, seq=2048, layers=n, **FUSED)
                          for n in (11, 22)],
}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["run", "worker", "report"])
  parser.add_argument("results", nargs="?")
  parser.add_argument("--suite", default="train")
  parser.add_argument("--batches", default="8")
  parser.add_argument("--out", default="results.jsonl")
  parser.add_argument("--framework", default="jlora")
  parser.add_argument("--task", default="train")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--layers", type=int, default=22)
  parser.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
  parser.add_argument("--lora-matmul", default="auto", choices=["exact", "auto", "fused", "plain"],
                      help="jlora: plain autodiff, or the fused LoRA matmul (exact: stacked; auto/fused: merged)")
  parser.add_argument("--shared", type=int, default=1, help="jlora: fuse q/k/v and gate/up input matmuls")
  parser.add_argument("--adapter-dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--scan-unroll", default="1",
                      help="jlora: layers per step of the layer loop (the layer count: fully unrolled; auto: as "
                           "jlora.train picks it from the memory plan)")
  parser.add_argument("--frameworks", default="", help="run: only rows of these frameworks (comma-separated)")
  parser.add_argument("--adapter", default="lora")
  parser.add_argument("--ckpt")
  parser.add_argument("--attention", default="auto",
                      help="jlora: attention kernel (auto = cuDNN on GPU; tokamax needs its wheel)")
  parser.add_argument("--remat", default="matmuls", help="jlora: what the backward pass keeps per layer")
  parser.add_argument("--mesh", default="1,1,1", help="scaling: data,fsdp,tensor")
  parser.add_argument("--model", default="tinyllama", help="scaling: tinyllama (checkpoint) or wide70b (sharded init)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--timeout", type=int, default=400)
  args = parser.parse_args()
  if args.mode == "run" and args.suite == "quant":  # quantized bases: bench/quant_suite.py, self-contained
    import quant_suite
    quant_suite.run(args.out, steps=args.steps, warmup=args.warmup,
                    timeout=float(os.environ.get("QUANT_RUN_TIMEOUT_S", 300)),
                    shapes=os.environ.get("QUANT_SHAPES", "tinyllama,llama3b").split(","),
                    bases=os.environ.get("QUANT_BASES", ",".join(quant_suite.BASES)).split(","),
                    budget_s=float(os.environ.get("QUANT_BUDGET_S", 540)))
    return
  if args.mode == "worker":
    worker(args)
  elif args.mode == "run":
    batches = [int(b) for b in args.batches.split(",")]
    for suite in args.suite.split(","):
      for overrides in SUITES[suite](batches):
        if args.frameworks and overrides.get("framework", "jlora") not in args.frameworks.split(","):
          continue
        for result in spawn(args, **overrides):
          with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
          print(json.dumps(result), flush=True)
  else:
    from report import render
    print(render([json.loads(l) for l in open(args.results)]))


if __name__ == "__main__":
  main()

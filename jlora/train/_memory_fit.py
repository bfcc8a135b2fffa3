"""What fits a device: its memory, defaults that fit, the fix when nothing does, and a job's plan.

Built on the estimate of ``jlora.train._memory`` (``plan_memory``):
``device_capacity`` reads the device's memory, ``plan_defaults`` picks the
smallest FSDP split and the lighter remat that fit, ``check_fits`` and
``suggestions`` turn a plan that does not fit into one error naming concrete
settings that do, and ``plan_job`` / ``auto_mesh`` apply all that to a
``jlora.train`` job (a built model, or a checkpoint's ``config.json`` before
any weight is read).
"""

from __future__ import annotations

import math

from jlora.models import REMAT_POLICIES, LanguageModel, cudnn_packed_layout
from jlora.train._memory import GiB, PROJECTIONS, Arch, MemoryPlan, human_size, plan_memory

# HBM per chip, matched against ``jax.Device.device_kind`` (lower case, first match wins).
DEVICE_MEMORY: tuple[tuple[str, float], ...] = (
    ("h200", 141e9), ("h100", 80e9), ("a100-sxm4-40gb", 40e9), ("a100 40gb", 40e9), ("a100", 80e9),
    ("l4", 24e9), ("tesla t4", 16e9), ("t4", 16e9), ("tpu v4", 32 * GiB), ("tpu v5 lite", 16 * GiB),
    ("tpu v5e", 16 * GiB), ("tpu v5p", 95 * GiB), ("tpu v5", 95 * GiB), ("tpu v6 lite", 32 * GiB),
    ("tpu v6e", 32 * GiB),
)
def device_capacity(device=None) -> int | None:
  """Bytes of memory of ``device`` (default: the first): ``memory_stats()['bytes_limit']`` where jax
  exposes it, else the known HBM of its kind (``DEVICE_MEMORY``), else None (e.g. CPU)."""
  import jax
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # backends without memory stats raise
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  kind = str(getattr(device, "device_kind", "")).lower()
  for name, size in DEVICE_MEMORY:
    if name in kind:
      return int(size)
  return None


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def suggestions(plan: MemoryPlan, arch: Arch, devices: int, batch_size: int, **kwargs) -> list[str]:
  """Concrete changes (model.scan_unroll, mesh.fsdp, model.remat, batch) under which the plan fits, best first."""
  d, f, t = plan.mesh
  out = []
  if plan.scan_unroll > 1 and plan_memory(arch, mesh=plan.mesh, remat=plan.remat, rows_per_device=plan.rows,
                                          capacity=plan.capacity, **dict(kwargs, scan_unroll=1)).fits:
    out.append("model.scan_unroll=1")
  for fsdp in _divisors(devices // t):
    if fsdp <= f or batch_size % (devices // t):
      continue
    p = plan_memory(arch, mesh=(devices // (t * fsdp), fsdp, t), remat=plan.remat,
                    rows_per_device=batch_size // (devices // t), capacity=plan.capacity, **kwargs)
    if p.fits:
      out.append(f"mesh.fsdp={fsdp}")
      break
  for remat in ("matmuls", "full"):
    if REMAT_POLICIES.index(remat) > REMAT_POLICIES.index(plan.remat):
      if plan_memory(arch, mesh=plan.mesh, remat=remat, rows_per_device=plan.rows, capacity=plan.capacity,
                     **kwargs).fits:
        out.append(f"model.remat={remat}")
        break
  rows = plan.rows
  while rows > 1 and not out:
    rows //= 2
    if plan_memory(arch, mesh=plan.mesh, remat=plan.remat, rows_per_device=rows, capacity=plan.capacity,
                   **kwargs).fits:
      k = plan.rows // rows
      out.append(f"batch_size={batch_size // k} with optim.grad_accum={k} (same tokens per step)")
  return out


def plan_defaults(arch: Arch, *, devices: int, capacity: int | None, tensor: int = 1,
                  batch_size: int | None = None, max_rows_per_device: int = 64,
                  **kwargs) -> tuple[MemoryPlan, str]:
  """Defaults that fit: the smallest ``fsdp``, then the lighter remat, then (if ``batch_size`` is None)
  the most rows per device (a power of two up to ``max_rows_per_device``).

  With ``batch_size`` given, rows per device are ``batch_size / (data * fsdp)``.
  Returns the plan and a sentence saying what was picked; when nothing
  fits, the leanest plan (it does not ``fit``) and a sentence saying so.
  """
  data_fsdp = devices // tensor
  leanest = None
  rows_options = _rows(max_rows_per_device) if batch_size is None else [None]
  for rows_wanted in rows_options:
    for fsdp in _divisors(data_fsdp):
      if batch_size is not None and batch_size % data_fsdp:
        break
      rows = rows_wanted or batch_size // data_fsdp
      for remat in ("matmuls", "full"):
        plan = plan_memory(arch, mesh=(data_fsdp // fsdp, fsdp, tensor), remat=remat, rows_per_device=rows,
                           capacity=capacity, **kwargs)
        if leanest is None or plan.total < leanest.total:
          leanest = plan
        if plan.fits:
          return plan, (f"picked mesh.fsdp={fsdp}, model.remat={remat}, {rows} rows per device: "
                        f"{human_size(plan.total)} per device" + ("" if capacity is None else f" of {human_size(capacity)}"))
  return leanest, "nothing fits even at the largest fsdp with remat=full; the leanest plan is shown"


def _rows(rows: int) -> list[int]:
  out = [max(rows, 1)]
  while out[-1] > 1:
    out.append(out[-1] // 2)
  return out


def check_fits(plan: MemoryPlan, hints: list[str]) -> None:
  """Raise ``MemoryPlanError`` with the fix when ``plan`` does not fit its device."""
  if plan.fits:
    return
  fix = f"set {' or '.join(hints)}" if hints else "use more devices (mesh.fsdp) or a smaller model"
  raise MemoryPlanError(f"the job needs {human_size(plan.total)} per device, the device has "
                        f"{human_size(plan.capacity)}: {fix}.\n{plan.describe()}")


class MemoryPlanError(ValueError):
  """The job's memory plan does not fit the device; the message names the fix."""


def check_tensor_split(arch: Arch, tensor: int) -> None:
  """Tensor parallelism splits heads, kv heads and the MLP: each must divide by ``mesh.tensor``."""
  from jlora.train._sharding import MeshError

  if tensor == 1:
    return
  for name, size in (("num_attention_heads", arch.num_attention_heads),
                     ("num_key_value_heads", arch.num_key_value_heads),
                     ("intermediate_size", arch.intermediate_size)):
    if size % tensor:
      fits = [t for t in _divisors(math.gcd(arch.num_key_value_heads, arch.num_attention_heads,
                                            arch.intermediate_size)) if t > 1]
      raise MeshError(f"mesh.tensor={tensor} does not divide the model's {name}={size}; tensor parallelism "
                      f"splits it across devices. Use mesh.tensor in {fits or [1]} (or mesh.fsdp instead).")


def model_sizes(model) -> dict | None:
  """``Arch`` and byte sizes of a built model (with its adapter), or None without a Llama-style config."""
  import jax
  import numpy as np
  from flax import nnx
  from jlora.nn import LoraParam

  arch = Arch.of(getattr(model, "config", None))
  if arch is None:
    return None
  frozen = [x for x in jax.tree.leaves(nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoraParam))))
            if np.ndim(x) >= 2]
  lora = jax.tree.leaves(nnx.state(model, LoraParam))
  act = np.dtype(model.dtype if isinstance(model, LanguageModel) else np.float32).itemsize
  return dict(arch=arch, base_bytes_per_param=sum(x.size * x.dtype.itemsize for x in frozen) /
              max(sum(x.size for x in frozen), 1), activation_bytes=act,
              adapter_bytes=lora[0].dtype.itemsize if lora else 4)


def checkpoint_sizes(config_json: str, dtype_bytes: int) -> dict | None:
  """``Arch`` and byte sizes from a Hugging Face ``config.json`` (before loading any weight)."""
  import json
  import types

  arch = Arch.of(types.SimpleNamespace(**json.loads(open(config_json).read())))
  return None if arch is None else dict(arch=arch, base_bytes_per_param=dtype_bytes,
                                        activation_bytes=dtype_bytes, adapter_bytes=4)


def _capacity(capacity_gib: float, backend: str) -> int | None:
  return int(capacity_gib * GiB) if capacity_gib > 0 else (device_capacity() if backend != "cpu" else None)


def auto_mesh(sizes: dict, *, devices: int, batch_size: int, seq_len: int, data: int, tensor: int,
              r: int, targets, capacity_gib: float = 0.0, backend: str = "cpu",
              scan_unroll: int = 1) -> tuple[tuple, str, str]:
  """``mesh.fsdp=-1``: ``((data, fsdp, tensor), remat, sentence)`` of the leanest fit (see ``plan_defaults``)."""
  if data != -1:  # the user fixed data: fsdp takes the rest
    fsdp = devices // (data * tensor)
    return (data, fsdp, tensor), "", ""
  kwargs = _plan_kwargs(sizes, seq_len, r, targets, backend, scan_unroll)
  plan, said = plan_defaults(sizes["arch"], devices=devices, capacity=_capacity(capacity_gib, backend),
                             tensor=tensor, batch_size=batch_size, **kwargs)
  return plan.mesh, plan.remat, said


def _plan_kwargs(sizes: dict, seq_len: int, r: int, targets, backend: str, scan_unroll: int = 1,
                 packed_segments: int = 0) -> dict:
  act = sizes["activation_bytes"]
  return dict(seq_len=seq_len, scan_unroll=scan_unroll, base_bytes_per_param=sizes["base_bytes_per_param"], activation_bytes=act,
              adapter_bytes=sizes["adapter_bytes"], r=r,
              targets=PROJECTIONS if isinstance(targets, str) else tuple(targets),
              fused_attention=backend in ("gpu", "tpu") and act == 2, packed_segments=packed_segments)


def cudnn_packed_slots(model, backend: str) -> int:
  """Record slots per row cuDNN's packed layout will hold for ``model``'s packed rows (0: not used)."""
  if not isinstance(model, LanguageModel) or backend != "gpu" or model.attention not in ("auto", "cudnn"):
    return 0
  slots = model.max_segments
  return slots if cudnn_packed_layout(slots) == "ragged" else 0


def plan_job(model, *, devices: int, batch_size: int, seq_len: int, mesh: tuple[int, int, int], remat: str,
             r: int, targets, capacity_gib: float = 0.0, backend: str = "cpu",
             scan_unroll: int = 1) -> MemoryPlan | None:
  """The plan of a ``jlora.train`` job on ``mesh = (data, fsdp, tensor)``, checked before any compile.

  ``scan_unroll`` is the model's layers per loop step (``model.scan_unroll``).

  None for a model without a Llama-style config. Raises ``MeshError`` for a
  tensor split the model cannot take and ``MemoryPlanError`` (with the fix)
  when it does not fit the device.
  """
  sizes = model_sizes(model)
  if sizes is None:
    return None
  arch = sizes["arch"]
  data, fsdp, tensor = mesh
  check_tensor_split(arch, tensor)
  kwargs = _plan_kwargs(sizes, seq_len, r, targets, backend, scan_unroll, cudnn_packed_slots(model, backend))
  plan = plan_memory(arch, mesh=mesh, remat=remat, rows_per_device=batch_size // (data * fsdp),
                     capacity=_capacity(capacity_gib, backend), **kwargs)
  check_fits(plan, suggestions(plan, arch, devices, batch_size, **kwargs))
  return plan


UNROLL_MARGIN = 0.85
"""``scan_unroll="auto"`` unrolls only where the unrolled plan stays below this share of the device:
the unrolled step's memory is the plan's least certain figure (``jlora.train._memory.UNROLLED_KEPT``)."""


def choose_scan_unroll(arch: Arch, *, capacity: int | None, mesh: tuple[int, int, int] = (1, 1, 1),
                       remat: str = "matmuls", rows_per_device: int = 8, **plan_kwargs) -> int:
  """``scan_unroll="auto"``: the layer count (no loop) if its plan fits within ``UNROLL_MARGIN`` of
  ``capacity``, else 1 (a rolled loop).

  Only the full unroll is a candidate: a partial one keeps the rolled loop's
  speed (the loop still stacks every layer's residuals) at more memory
  (bench/NOTES.md, entry 23). Rolled where the capacity is unknown (CPU: the
  unrolled compile is longer and nothing is gained) and under FSDP, whose
  per-layer weight gathers a loop keeps one at a time.
  """
  layers = arch.num_hidden_layers
  if capacity is None or mesh[1] > 1 or layers < 2:
    return 1
  plan = plan_memory(arch, mesh=mesh, remat=remat, rows_per_device=rows_per_device, capacity=capacity,
                     **dict(plan_kwargs, scan_unroll=layers))
  return layers if plan.total <= UNROLL_MARGIN * capacity else 1


def job_scan_unroll(model, *, batch_size: int, seq_len: int, mesh: tuple[int, int, int], remat: str, r: int,
                    targets, capacity_gib: float = 0.0, backend: str = "cpu") -> int:
  """``choose_scan_unroll`` for a ``jlora.train`` job's model on ``mesh`` (1 for a model the plan cannot size)."""
  sizes = model_sizes(model)
  if sizes is None:
    return 1
  data, fsdp, _ = mesh
  kwargs = _plan_kwargs(sizes, seq_len, r, targets, backend, 1, cudnn_packed_slots(model, backend))
  return choose_scan_unroll(sizes["arch"], capacity=_capacity(capacity_gib, backend), mesh=mesh, remat=remat,
                            rows_per_device=batch_size // (data * fsdp), **kwargs)

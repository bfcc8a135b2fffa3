"""A memory plan before compiling: per-device bytes of a LoRA train step, and what to change when it won't fit.

Pure functions of the architecture (``Arch``: a Llama-family decoder's sizes),
the mesh, the remat policy, rows per device and sequence length. The figures
follow what ``jlora.train``'s step keeps alive (see ``jlora.models.REMAT_POLICIES``
and ``jlora.train._sharding``):

- frozen base: every matrix split over ``fsdp x tensor``, norms replicated;
  ``base_bytes_per_param`` is the base's storage (2 for bf16, about 0.5 for a
  4-bit format);
- adapter ``r x (in + out)`` per targeted projection (float32 for a float32
  base, else the base dtype), split like the base; AdamW keeps two float32
  moments; the step writes new adapter and moments (no donation) and keeps
  one gradient, so the adapter-sized state counts about 4x + 2x;
- activations per layer from the remat policy (``"matmuls"`` keeps the
  projection outputs, ``"full"`` only the layer input, ``"none"`` everything
  autodiff keeps), for all layers; plus one layer's working set (its
  gathered weights under FSDP, the attention scores where XLA's attention
  materialises them) and the logits with their gradient;
- an unrolled layer loop (``scan_unroll``, see ``unrolled_kept``): a partial
  unroll keeps ``scan_unroll`` layers' working sets in flight per loop step;
  a full one (no loop) lets XLA merge the backward pass's recomputation with
  the forward pass, so part of what the remat policy drops stays alive.

It is an estimate: the tests hold it within a stated factor of XLA's
compiled ``memory_analysis()`` on CPU. What fits a given device, and the
plan of a ``jlora.train`` job, are in ``jlora.train._memory_fit``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from jlora.models import check_remat

GiB = 2**30

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Arch:
  """The sizes of a Llama-family decoder (``jlora.models.ModelConfig`` / HF config names)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  tie_word_embeddings: bool = False

  @classmethod
  def of(cls, config) -> "Arch | None":
    """From any config with the HF attribute names; None if it lacks them."""
    try:
      heads = config.num_attention_heads
      return cls(config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                 heads, getattr(config, "num_key_value_heads", None) or heads,
                 getattr(config, "head_dim", None) or config.hidden_size // heads,
                 bool(getattr(config, "tie_word_embeddings", False)))
    except AttributeError:
      return None

  def projections(self) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of each projection of one layer."""
    h, q, kv, f = self.hidden_size, self.num_attention_heads * self.head_dim, \
        self.num_key_value_heads * self.head_dim, self.intermediate_size
    return dict(q_proj=(h, q), k_proj=(h, kv), v_proj=(h, kv), o_proj=(q, h), gate_proj=(h, f),
                up_proj=(h, f), down_proj=(f, h))

  def base_params(self) -> int:
    layer = sum(i * o for i, o in self.projections().values()) + 2 * self.hidden_size
    head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
    return self.num_hidden_layers * layer + self.vocab_size * self.hidden_size + head + self.hidden_size

  def adapter_params(self, r: int, targets: Iterable[str]) -> int:
    targets = set(targets)
    layer = sum(r * (i + o) for name, (i, o) in self.projections().items() if name in targets)
    outer = sum(r * (self.vocab_size + self.hidden_size)
                for name in ("embed_tokens", "lm_head") if name in targets)
    return self.num_hidden_layers * layer + outer


def human_size(n: float) -> str:
  """``n`` bytes as GiB (MiB below 0.1 GiB), for the printed plan and its errors."""
  return f"{n / GiB:.1f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.1f} MiB"


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Estimated bytes per device of one train step (see the module doc) and the device's capacity."""

  params: int
  adapter: int
  optimizer: int
  activations: int
  working: int
  capacity: int | None
  mesh: tuple[int, int, int]
  remat: str
  rows: int
  notes: tuple[str, ...] = ()
  scan_unroll: int = 1

  @property
  def total(self) -> int:
    return self.params + self.adapter + self.optimizer + self.activations + self.working

  @property
  def fits(self) -> bool:
    return self.capacity is None or self.total <= 0.92 * self.capacity  # room for XLA/runtime buffers

  def describe(self) -> str:
    """One line per figure, e.g. for ``jlora train`` before it compiles."""
    d, f, t = self.mesh
    cap = "unknown device memory" if self.capacity is None else human_size(self.capacity)
    lines = [f"memory plan per device (mesh data={d} fsdp={f} tensor={t}, remat={self.remat}, "
             f"scan_unroll={self.scan_unroll}, {self.rows} rows per device):",
             f"  frozen params  {human_size(self.params)}", f"  adapter        {human_size(self.adapter)}",
             f"  optimizer      {human_size(self.optimizer)}",
             f"  activations    {human_size(self.activations + self.working)}",
             f"  total          {human_size(self.total)} of {cap}"]
    return "\n".join(lines + [f"  note: {n}" for n in self.notes])


UNROLLED_KEPT = 0.5
"""Share of what the remat policy recomputes that a layer loop unrolled to no loop keeps alive instead.

``jax.checkpoint`` runs with ``prevent_cse=False`` (safe while forward and
backward are separate loops); with no loop XLA's CSE merges the backward's
recomputation into the forward. On CPU the merge is whole (``"matmuls"``
and ``"none"`` compile to the same step); on GPU fusion still recomputes
cheap elementwise producers: one H100's peaks (bf16, ``"matmuls"``) rise
16.6 -> 26.2 GiB (TinyLlama 8x2048, 22 layers) and 22.4 -> 35.0 GiB
(Llama-3.2-3B 2x4096, 28 layers), 0.46 and 0.63 of the ``"none"`` minus
``"matmuls"`` kept activations. With 0.5 the plan says 30.2 and 37.4 GiB
(rolled: 19.7 and 27.3). See bench/NOTES.md, entry 16.
"""
PACKED_SLOT_BYTES = 10  # cuDNN's packed-layout backward, per record slot and [rows, T, heads, head_dim] element


def loop_remains(layers: int, unroll: int) -> bool:
  """Whether ``layers`` at ``unroll`` per step still run in a loop: jax runs ``layers // unroll`` trips
  (the remainder unrolled after it) and XLA removes a loop of one trip."""
  return layers // unroll >= 2


def unrolled_kept(policy_bytes: float, none_bytes: float, layers: int, unroll: int) -> float:
  """Activations kept for all layers with ``unroll`` layers per loop step (see ``UNROLLED_KEPT``).

  A loop that remains (``loop_remains``) keeps what the policy keeps; no
  loop keeps the policy's bytes plus ``UNROLLED_KEPT`` of what ``"none"``
  would keep beyond them.
  """
  if loop_remains(layers, unroll):
    return policy_bytes
  return policy_bytes + UNROLLED_KEPT * max(none_bytes - policy_bytes, 0)


def _activation_bytes(a: Arch, rows: int, seq: int, remat: str, act_bytes: int, r: int, n_targets: int,
                      tensor: int, fused_attention: bool, unroll: int = 1) -> tuple[int, int]:
  """``(kept for all layers, transient working set)`` in bytes, per device.

  The working set is one layer's, or ``unroll`` layers' while a loop
  remains: the backward loop step recomputes all its layers before their
  gradients free anything (the CPU step's temp grows with each extra layer
  per step).
  """
  tokens = rows * seq
  h, f = a.hidden_size, a.intermediate_size // tensor
  q, kv = a.num_attention_heads * a.head_dim // tensor, a.num_key_value_heads * a.head_dim // tensor
  projections = q + 2 * kv + 2 * f  # the matmuls policy's named outputs
  low_rank = n_targets * r
  per_layer = {"full": h, "matmuls": h + projections + low_rank + (q if fused_attention else 0),
               "none": 3 * h + 2 * projections + 2 * f + low_rank + 2 * q}
  working = tokens * (2 * (h + projections + low_rank) + 2 * f) * act_bytes
  if not fused_attention:  # XLA's attention: [rows, heads, T, T] float32 scores and probabilities
    working += 2 * rows * (a.num_attention_heads // tensor) * seq * seq * 4
  layers = a.num_hidden_layers
  kept = unrolled_kept(*(layers * tokens * per_layer[p] * act_bytes for p in (remat, "none")), layers, unroll)
  return int(kept), working * (unroll if loop_remains(layers, unroll) else 1)


def plan_memory(arch: Arch, *, mesh: tuple[int, int, int] = (1, 1, 1), remat: str = "matmuls",
                rows_per_device: int = 8, seq_len: int = 2048, base_bytes_per_param: float = 2.0,
                activation_bytes: int = 2, adapter_bytes: int = 4, r: int = 16,
                targets: Iterable[str] = PROJECTIONS, capacity: int | None = None,
                fused_attention: bool = False, scan_unroll: int = 1, packed_segments: int = 0) -> MemoryPlan:
  """Per-device bytes of a LoRA train step of ``arch`` under ``mesh = (data, fsdp, tensor)``.

  ``activation_bytes`` is the compute dtype's size, ``adapter_bytes`` the
  adapter's; ``fused_attention``: attention runs as a fused kernel (cuDNN /
  splash) that never materialises ``[rows, heads, T, T]`` scores;
  ``scan_unroll`` the model's layers per loop step (``unrolled_kept``; 1
  gives the rolled loop's figure); ``packed_segments`` the record slots per
  row of cuDNN's packed layout (0: not used), whose backward holds about
  ``PACKED_SLOT_BYTES`` per slot and query element (H100: +1.4 GiB at 8
  slots, +8.6 GiB at 32, TinyLlama 8x2048).
  """
  check_remat(remat)
  _, fsdp, tensor = mesh
  split = fsdp * tensor
  targets = tuple(targets)
  notes = [f"{name}={dim} is not divisible by fsdp={fsdp}: those weights stay replicated"
           for name, dim in (("hidden_size", arch.hidden_size), ("vocab_size", arch.vocab_size)) if dim % fsdp]
  adapter = arch.adapter_params(r, targets) / split
  kept, working = _activation_bytes(arch, rows_per_device, seq_len, remat, activation_bytes, r,
                                    sum(t in PROJECTIONS for t in targets), tensor, fused_attention, scan_unroll)
  head = arch.vocab_size * arch.hidden_size * base_bytes_per_param / tensor
  if fsdp > 1:  # one layer gathered (two while the next one arrives), and the output head
    layer = sum(i * o for i, o in arch.projections().values())
    working += 2 * layer * base_bytes_per_param / tensor + head
  working += rows_per_device * seq_len * (arch.vocab_size // tensor) * (2 * activation_bytes + 4)  # logits
  working += (packed_segments * PACKED_SLOT_BYTES * rows_per_device * seq_len
              * arch.num_attention_heads * arch.head_dim // tensor)
  return MemoryPlan(params=int(arch.base_params() * base_bytes_per_param / split),
                    adapter=int(3 * adapter * adapter_bytes),  # old, new, gradient
                    optimizer=int(2 * 2 * adapter * 4),  # two float32 moments, old and new
                    activations=int(kept), working=int(working), capacity=capacity, mesh=tuple(mesh),
                    remat=remat, rows=rows_per_device, notes=tuple(notes), scan_unroll=scan_unroll)

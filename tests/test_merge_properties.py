"""Merging is invisible: properties over random shapes, ranks and scalings (hypothesis).

For every layer type (Linear, Embed, Conv, LinearGeneral, Einsum) and adapter
kind (LoRA, MoSLoRA, WLoRA over two random LoRAs), with random nonzero factors:

- forward after ``merge_adapter`` equals the unmerged forward;
- the pure ``unmerge(merge(W))`` gives ``W`` back (eagerly and under ``jax.jit``);
- ``merge_and_unload`` returns a plain model with the adapted output.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jlora

FP32_TOL = 1e-5
LAYERS = ("linear", "embed", "conv", "linear_general", "einsum")
ADAPTERS = ("lora", "moslora", "wlora")
EINSUMS = {"bhd,hdk->bhk": "hdk", "btd,dhk->bthk": "dhk"}  # per-head (shared axis h); multi-output

# Eager JAX compiles every op for every new shape (~0.2 s each on a busy 2-core box), so each
# example costs seconds: the example counts are small, and tiny dims make shapes repeat.
def examples(n: int):
  return settings(max_examples=n, deadline=None, derandomize=True)


@dataclasses.dataclass(frozen=True)
class Case:
  """One drawn example: layer sizes, adapter hyper-parameters and seeds."""

  layer: str
  adapter: str
  dims: tuple[int, ...]  # layer sizes (in/out features, heads, channels...)
  window: int  # Conv only
  stride: int
  padding: str
  einsum: str  # Einsum only
  r: int
  lora_alpha: float
  use_rslora: bool
  seed: int


@st.composite
def cases(draw, layer: str | None = None, adapter: str | None = None) -> Case:
  dim = st.integers(1, 3)  # few distinct shapes: eager JAX compiles each new one
  return Case(
      layer=layer or draw(st.sampled_from(LAYERS)),
      adapter=adapter or draw(st.sampled_from(ADAPTERS)),
      dims=tuple(draw(dim) for _ in range(4)),
      window=draw(st.sampled_from([1, 2, 3])),
      stride=draw(st.sampled_from([1, 2])),
      padding=draw(st.sampled_from(["SAME", "VALID"])),
      einsum=draw(st.sampled_from(sorted(EINSUMS))),
      r=draw(st.integers(1, 3)),
      lora_alpha=draw(st.sampled_from([1.0, 2.0, 3.5, 8.0])),
      use_rslora=draw(st.booleans()),
      seed=draw(st.integers(0, 2**16)),
  )


class Holder(nnx.Module):
  """A model whose only module, ``layer``, is the one under test."""

  def __init__(self, layer: nnx.Module):
    self.layer = layer

  def __call__(self, x):
    return self.layer(x)


def base_model(case: Case, dtype=jnp.float32) -> tuple[Holder, jax.Array]:
  """The bare model for ``case`` and an input for it."""
  a, b, c, d = case.dims
  rngs = nnx.Rngs(case.seed)
  key = jax.random.key(case.seed + 1)
  kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
  if case.layer == "linear":
    return Holder(nnx.Linear(a, b, **kw)), jax.random.normal(key, (2, a))
  if case.layer == "embed":
    return Holder(nnx.Embed(a + 1, b, **kw)), jax.random.randint(key, (2, 3), 0, a + 1)
  if case.layer == "conv":
    conv = nnx.Conv(a, b, (case.window,) * 2, strides=case.stride, padding=case.padding, **kw)
    return Holder(conv), jax.random.normal(key, (1, 5, 5, a))
  if case.layer == "linear_general":
    layer = nnx.LinearGeneral((a, b), (c, d), axis=(-2, -1), **kw)
    return Holder(layer), jax.random.normal(key, (2, a, b))
  sizes = {"h": a, "d": b, "k": c}
  kernel_shape = tuple(sizes[axis] for axis in EINSUMS[case.einsum])
  x_shape = (2, a, b) if case.einsum.startswith("bhd") else (2, 3, b)
  return Holder(nnx.Einsum(case.einsum, kernel_shape, **kw)), jax.random.normal(key, x_shape)


def adapted_model(case: Case, dtype=jnp.float32) -> tuple[Holder, jax.Array]:
  """``base_model(case)`` with one active adapter of ``case.adapter``'s kind, all factors random."""
  model, x = base_model(case, dtype)
  kwargs = dict(r=case.r, lora_alpha=case.lora_alpha, use_rslora=case.use_rslora,
                target_modules=["layer"], init_lora_weights=False, seed=case.seed)
  if case.adapter == "lora":
    jlora.get_peft_model(model, jlora.LoraConfig(**kwargs))
  elif case.adapter == "moslora":
    jlora.get_peft_model(model, jlora.MoSLoraConfig(**kwargs))
  else:
    jlora.add_adapter(model, "a", jlora.LoraConfig(**kwargs))
    jlora.add_adapter(model, "b", jlora.LoraConfig(**{**kwargs, "r": case.r + 1, "seed": case.seed + 1}))
    jlora.get_peft_model(model, jlora.WLoraConfig(upstream_loras=["a", "b"]), "w")
  randomize_adapters(model, case.seed)
  return model, x


def randomize_adapters(model: nnx.Module, seed: int) -> None:
  """Like ``jlora.testing.randomize_adapters``, but drawn with NumPy (no per-shape compilation).

  Entries are ``±U(0.2, 0.5)``: small enough that outputs stay O(1) (so an absolute fp32
  tolerance is meaningful), away from zero so that no product of factors vanishes by chance.
  """
  rng = np.random.default_rng(seed)

  def draw(v):
    return (rng.choice([-1, 1], v.shape) * rng.uniform(0.2, 0.5, v.shape)).astype(np.float32)

  state = nnx.state(model, nnx.All(jlora.LoraParam, nnx.Not(jlora.UpstreamLoraParam)))
  nnx.update(model, jax.tree.map(draw, state))


def assert_adapter_matters(model, x, y):
  """Guard: a property that holds for a zero delta proves nothing."""
  with jlora.disable_adapters(model):
    base = model(x)
  assert np.abs(np.asarray(y, np.float32) - np.asarray(base, np.float32)).max() > 1e-4


def kernels(state: nnx.State) -> list[np.ndarray]:
  return [np.asarray(v) for v in jax.tree.leaves(state)]


def assert_restored(base: nnx.State, merged: nnx.State, restored: nnx.State) -> None:
  """``restored == base`` up to the fp32 rounding of ``(W + ΔW) - ΔW`` (a few ulps of the merged size)."""
  for w, m, r in zip(kernels(base), kernels(merged), kernels(restored)):
    rounding = 4 * np.finfo(np.float32).eps * max(1.0, np.abs(m).max())
    np.testing.assert_allclose(r, w, atol=rounding, rtol=0)


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("layer", LAYERS)
@examples(3)
@given(data=st.data())
def test_forward_after_merge_equals_unmerged_forward(layer, adapter, data):
  model, x = adapted_model(data.draw(cases(layer, adapter)))
  want = model(x)
  assert_adapter_matters(model, x, want)
  jlora.merge_adapter(model)
  np.testing.assert_allclose(model(x), want, atol=FP32_TOL, rtol=0)


@pytest.mark.parametrize("layer", LAYERS)
@examples(3)
@given(data=st.data())
def test_bf16_base_forward_after_merge_is_within_bf16_rounding(layer, data):
  """bf16 base weights: merging rounds ``W + ΔW`` to bf16 once (relative error <= 2**-9 per
  entry), while the unmerged path rounds the base output, the delta and their sum; each side
  is within a few bf16 ulps of the exact result, so the two agree to a few parts in 2**8 of
  the output's magnitude. The tolerance is 2**-5 of the largest output (about 3 %), far below
  the adapter's own effect that ``assert_adapter_matters`` requires."""
  model, x = adapted_model(data.draw(cases(layer, "lora")), dtype=jnp.bfloat16)
  want = np.asarray(model(x), np.float32)
  assert_adapter_matters(model, x, want)
  jlora.merge_adapter(model)
  got = np.asarray(model(x), np.float32)
  assert model.layer.kernel()[...].dtype == jnp.bfloat16
  np.testing.assert_allclose(got, want, atol=2**-5 * max(1.0, np.abs(want).max()), rtol=0)


@pytest.mark.parametrize("layer", LAYERS)
@examples(4)
@given(data=st.data())
def test_pure_unmerge_of_merge_restores_base_weights(layer, data):
  model, _ = adapted_model(data.draw(cases(layer)))
  graphdef, adapter, base, rest = nnx.split(model, jlora.LoraParam, nnx.Param, ...)
  merged = jlora.merge(graphdef, base, adapter, rest)
  assert_restored(base, merged, jlora.unmerge(graphdef, merged, adapter, rest))
  assert any(np.abs(m - w).max() > 1e-3 for w, m in zip(kernels(base), kernels(merged)))


@pytest.mark.parametrize("layer", LAYERS)
@examples(2)
@given(data=st.data())
def test_pure_merge_and_unmerge_work_under_jit(layer, data):
  model, x = adapted_model(data.draw(cases(layer)))
  want = model(x)
  graphdef, adapter, base, rest = nnx.split(model, jlora.LoraParam, nnx.Param, ...)
  merge = jax.jit(lambda b, a, r: jlora.merge(graphdef, b, a, r))
  unmerge = jax.jit(lambda b, a, r: jlora.unmerge(graphdef, b, a, r))
  merged = merge(base, adapter, rest)
  merged_model = nnx.merge(graphdef, adapter, merged, rest)
  with jlora.disable_adapters(merged_model):
    np.testing.assert_allclose(merged_model(x), want, atol=FP32_TOL, rtol=0)
  assert_restored(base, merged, unmerge(merged, adapter, rest))


@pytest.mark.parametrize("adapter", ADAPTERS)
@examples(5)
@given(data=st.data())
def test_merge_and_unload_keeps_the_adapted_output(adapter, data):
  model, x = adapted_model(data.draw(cases(adapter=adapter)))
  want = model(x)
  plain = jlora.merge_and_unload(model)
  assert not list(jlora.lora_layers(plain))
  assert not jax.tree.leaves(nnx.state(plain, jlora.LoraParam))
  np.testing.assert_allclose(plain(x), want, atol=FP32_TOL, rtol=0)


"""The house rules the code keeps: dependency direction, public training pieces, NNX interop."""

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from jlora import testing
from train_doubles import CausalLM

ROOT = Path(__file__).resolve().parents[1]


def imports_of(path: Path) -> list[str]:
  """Every module an ``import`` names in ``path`` (``from a import b`` gives ``a`` and ``a.b``)."""
  names = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
  return names


@pytest.mark.parametrize("path", sorted((ROOT / "jlora" / "train").glob("*.py")), ids=lambda p: p.name)
def test_train_never_imports_the_top_level_face(path):
  face = [n for n in imports_of(path) if n == "jlora" or (n.startswith("jlora.") and n.count(".") == 1
                                                           and n.split(".")[1] not in ("nn", "io", "models", "quant", "train"))]
  assert face == [], f"{path.name} imports {face}; use jlora.nn, jlora.io, jlora.models or jlora.quant"


@pytest.mark.parametrize("path", sorted((ROOT / "bench").glob("*.py")), ids=lambda p: p.name)
def test_bench_uses_only_public_training_pieces(path):
  private = [n for n in imports_of(path) if n.startswith("jlora.train._")]
  assert private == []


def test_the_train_step_is_public_and_trains_an_adapter():
  from jlora.train import make_optimizer, make_train_step, split_model

  model = jlora.get_peft_model(CausalLM(), jlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
  graphdef, params, rng, frozen = split_model(model)
  tx = make_optimizer(model, params, learning_rate=1e-2, steps=10, warmup_steps=0, end_lr_ratio=1.0,
                      weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=1.0, grad_accum=1)
  step = make_train_step(graphdef, tx)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 258, (2, 6)), jnp.int32)
  batch = dict(tokens=tokens, loss_mask=jnp.ones_like(tokens), attention_mask=jnp.ones_like(tokens))
  state, losses = [params, tx.init(params), rng], []
  for _ in range(3):
    state[0], state[1], state[2], loss, count = step(*state, frozen, batch)
    losses.append(float(loss))
  assert losses[-1] < losses[0] and int(count) == 10


# ---- LoraParam is Flax's LoRAParam ------------------------------------------------------

def test_lora_param_is_an_nnx_lora_param_and_a_param():
  assert issubclass(jlora.LoraParam, nnx.LoRAParam) and issubclass(jlora.LoraParam, nnx.Param)


def adapted_model():
  model = testing.TinyLM()
  jlora.get_peft_model(model, jlora.MoSLoraConfig(r=2, target_modules=["q_proj", "v_proj", "embed_tokens"]))
  return model


def test_selecting_nnx_lora_param_selects_exactly_the_adapter_params():
  model = adapted_model()
  selected = {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
  adapter = {path for path, _ in nnx.to_flat_state(nnx.state(model, jlora.LoraParam))}
  assert selected == adapter and any("lora_mixer" in map(str, p) for p in selected)
  assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Not(jlora.LoraParam))))


def test_an_optimizer_over_nnx_lora_param_trains_the_adapter_and_only_it():
  model = adapted_model()
  testing.randomize_adapters(model)
  base_before = jax.tree.map(np.array, nnx.state(model, nnx.Not(nnx.LoRAParam)))
  lora_before = jax.tree.map(np.array, nnx.state(model, nnx.LoRAParam))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)
  ids = testing.token_ids()
  grads = nnx.grad(lambda m: jnp.mean(m(ids) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  optimizer.update(model, grads)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), lora_before,
                         nnx.state(model, nnx.LoRAParam))
  assert all(jax.tree.leaves(changed))
  jax.tree.map(np.testing.assert_array_equal, base_before, nnx.state(model, nnx.Not(nnx.LoRAParam)))


def test_wlora_upstreams_stay_frozen_under_jloras_masks():
  model = testing.TinyLM()
  for seed, name in enumerate(("u1", "u2")):
    jlora.add_adapter(model, name, jlora.LoraConfig(r=2, target_modules=["q_proj"], seed=seed))
  testing.randomize_adapters(model)
  jlora.get_peft_model(model, jlora.WLoraConfig(upstream_loras=["u1", "u2"]), "w")
  upstream_before = jax.tree.map(np.array, nnx.state(model, jlora.UpstreamLoraParam))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=jlora.nn.TRAINABLE)
  ids = testing.token_ids()
  grads = nnx.grad(lambda m: jnp.mean(m(ids) ** 2), argnums=nnx.DiffState(0, jlora.nn.TRAINABLE))(model)
  optimizer.update(model, grads)
  jax.tree.map(np.testing.assert_array_equal, upstream_before, nnx.state(model, jlora.UpstreamLoraParam))
  assert not np.array_equal(np.zeros(2), testing.module_at(model, "model.layers.0.self_attn.q_proj").adapters["w"].logits[...])


# ---- adapter kinds: no code outside a kind's own module asks which class an adapter is --------

def _adapter_class_names() -> dict[str, Path]:
  """Name -> defining file of every registered kind's adapter class and its bases up to AdapterModule."""
  import inspect

  names = {}
  for kind in jlora.nn.registered_kinds().values():
    for klass in kind.adapter_type.__mro__:
      if klass is jlora.nn.AdapterModule or not issubclass(klass, jlora.nn.AdapterModule):
        continue
      names[klass.__name__] = Path(inspect.getfile(klass)).resolve()
  return names


def _isinstance_targets(tree: ast.AST):
  """``(line, class name)`` for every name checked by ``isinstance`` / ``issubclass`` in a module."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "issubclass") \
        and len(node.args) == 2:
      target = node.args[1]
      for item in (target.elts if isinstance(target, ast.Tuple) else [target]):
        name = item.attr if isinstance(item, ast.Attribute) else getattr(item, "id", None)
        if name:
          yield node.lineno, name


@pytest.mark.parametrize("path", sorted((ROOT / "jlora").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_adapter_class_isinstance_outside_its_kind(path):
  classes = _adapter_class_names()
  found = [f"{path.name}:{line} isinstance(..., {name})" for line, name in _isinstance_targets(ast.parse(path.read_text()))
           if name in classes and classes[name] != path.resolve()]
  assert found == [], (f"{found}: ask the adapter (folds_to_lora, output_hook, its kind's roles via "
                       "jlora.nn.kind_of) instead of its class")


def _nn_imports(path: Path) -> set[str]:
  """Every ``jlora.nn._module`` a file of jlora/nn imports, anywhere in it (TYPE_CHECKING and functions too)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "jlora.nn":
        found |= {alias.name for alias in node.names if alias.name.startswith("_")}
      elif node.module.startswith("jlora.nn._"):
        found.add(node.module.split(".")[2])
    elif isinstance(node, ast.Import):
      found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("jlora.nn._")}
  return found


def test_jlora_nn_has_no_import_circles():
  graph = {p.stem: _nn_imports(p) for p in (ROOT / "jlora" / "nn").glob("_*.py")}
  circles = []

  def visit(node, trail):
    for nxt in sorted(graph.get(node, ())):
      if nxt == trail[0]:
        circles.append(" -> ".join(trail + [nxt]))
      elif nxt not in trail and len(trail) < len(graph):
        visit(nxt, trail + [nxt])

  for start in sorted(graph):
    visit(start, [start])
  assert circles == []


# ---- model families are registered, not picked by string ---------------------------------

def _mentions_model_type(node: ast.AST) -> bool:
  """``model_type``, ``x.model_type``, ``d.get("model_type")`` or ``getattr(x, "model_type")``."""
  return any((isinstance(n, ast.Name) and n.id == "model_type") or (isinstance(n, ast.Attribute) and n.attr == "model_type")
             or (isinstance(n, ast.Constant) and n.value == "model_type") for n in ast.walk(node))


def _is_string_literal(node: ast.AST) -> bool:
  if isinstance(node, ast.Constant):
    return isinstance(node.value, str)
  return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and bool(node.elts) and all(map(_is_string_literal, node.elts))


def model_type_branches(tree: ast.AST) -> list[int]:
  """Lines that compare a ``model_type`` with string literals (``==``, ``!=``, ``in``, ``.startswith``)."""
  lines = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Compare):
      sides = [node.left, *node.comparators]
      if any(map(_mentions_model_type, sides)) and any(map(_is_string_literal, sides)):
        lines.append(node.lineno)
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr in ("startswith", "endswith") and _mentions_model_type(node.func.value)):
      lines.append(node.lineno)
  return lines


def registers_a_family(tree: ast.AST) -> bool:
  return any(isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) == "register_family"
             for n in ast.walk(tree))


def test_model_type_strings_are_compared_only_in_a_familys_own_module():
  """A module that registers a family may branch on its own model types; every other module asks the registry."""
  offenders = {}
  for path in sorted((ROOT / "jlora").rglob("*.py")):
    tree = ast.parse(path.read_text())
    if not registers_a_family(tree) and model_type_branches(tree):
      offenders[str(path.relative_to(ROOT))] = model_type_branches(tree)
  assert offenders == {}, f"model_type compared with strings outside a family's module (lines): {offenders}"


def test_the_model_type_guard_sees_the_ways_code_picks_a_family():
  caught = ['if config.model_type == "gpt2": pass', 'ok = raw.get("model_type") in ("llama", "qwen2")',
            'if model_type.startswith("qwen"): pass', 'x = getattr(c, "model_type", None) != "gpt2"']
  assert all(model_type_branches(ast.parse(code)) for code in caught)
  assert not model_type_branches(ast.parse("family = family_for(config.model_type)"))

"""The house rules the code keeps: import layering and no circles, public names across packages, one meaning
per name, public training pieces, NNX interop.

The import guards read the source (every ``import`` anywhere in a module: top level, under ``TYPE_CHECKING``,
inside functions), so a rule is broken the moment such a line is written, not when it happens to run.
"""

import ast
import json
import warnings
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


# ---- reading imports from source ---------------------------------------------------------

def module_name(path: Path) -> str:
  """``jlora/nn/_layer.py`` -> ``jlora.nn._layer``; a package's ``__init__.py`` is the package."""
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((ROOT / "jlora").rglob("*.py"))}
LAYERS = ("_deprecation", "nn", "kinds", "models", "quant", "io", "train", "_cli")  # each may import only those before it


def imported_names(tree: ast.AST, module: str = "", is_package: bool = False) -> list[str]:
  """Every dotted name an ``import`` in ``tree`` reaches, at any depth (``from a import b`` gives ``a.b``).

  Relative imports are resolved against ``module``.
  """
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
      names += [f"{base}.{alias.name}" for alias in node.names]
  return names


def imports_of(path: Path) -> list[str]:
  name = module_name(path) if path.is_relative_to(ROOT / "jlora") else ""
  return imported_names(ast.parse(path.read_text()), name, path.name == "__init__.py")


def jlora_references(tree: ast.AST) -> list[str]:
  """Dotted ``jlora.x.y`` attribute chains written out in code (``jlora.nn._inject._replace(...)``)."""
  chains = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute):
      parts, inner = [node.attr], node.value
      while isinstance(inner, ast.Attribute):
        parts.append(inner.attr)
        inner = inner.value
      if isinstance(inner, ast.Name) and inner.id == "jlora":
        chains.append(".".join(["jlora", *reversed(parts)]))
  return [c for c in chains if not any(other.startswith(c + ".") for other in chains)]  # the whole chain only


def module_of(name: str) -> str:
  """The jlora module a dotted name lives in: the longest prefix that is a module."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name


def import_graph() -> dict[str, set[str]]:
  """Module -> the jlora modules its source imports (a parent package's implicit import is not an edge)."""
  return {name: {module_of(n) for n in imports_of(path) if n.startswith("jlora.")} - {"", name}
          for name, path in MODULES.items()}


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
  """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
  index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
  for root in sorted(graph):
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = counter[0]
    counter[0] += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = counter[0]
          counter[0] += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph.get(child, ())))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = set()
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.add(member)
          if member == node:
            break
        if len(component) > 1:
          found.append(component)
  return found


def private_owner(name: str) -> str | None:
  """The package a private name belongs to: ``jlora.nn._inject._replace`` -> ``jlora.nn``; public: None."""
  parts = name.split(".")
  for i, part in enumerate(parts):
    if part.startswith("_") and not part.startswith("__"):
      return ".".join(parts[:i])
  return None


def notebook_code(path: Path) -> str:
  """A notebook's code cells as one module (shell ``!`` and ``%`` magic lines left out)."""
  cells = json.loads(path.read_text())["cells"]
  lines = [line for cell in cells if cell["cell_type"] == "code" for line in "".join(cell["source"]).splitlines()]
  return "\n".join("" if line.lstrip().startswith(("!", "%")) else line for line in lines)


def private_imports(package: str, tree: ast.AST, module: str = "", is_package: bool = False) -> list[str]:
  """The jlora names ``tree`` imports or spells out that are private to a package other than ``package``."""
  names = imported_names(tree, module, is_package) + jlora_references(tree)
  bad = []
  for name in names:
    owner = private_owner(name) if name.startswith("jlora.") else None
    if owner is not None and not (package == owner or package.startswith(owner + ".")):
      bad.append(name)
  return bad


def private_module(name: str) -> str:
  """``jlora.nn._targets.candidates`` -> ``jlora.nn._targets``: the name up to its first private part."""
  return ".".join(name.split(".")[:private_owner(name).count(".") + 2])


# ---- import layering and circles ---------------------------------------------------------

@pytest.mark.parametrize("module", sorted(n for n in MODULES if n.count(".") >= 1 and n.split(".")[1] in LAYERS))
def test_each_package_imports_only_the_packages_below_it(module):
  own = LAYERS.index(module.split(".")[1])
  above = sorted({n for n in imports_of(MODULES[module]) if n.split(".")[0] == "jlora"
                  and (n.count(".") == 0 or n.split(".")[1] not in LAYERS[:own + 1])})
  assert above == [], (f"{module} imports {above}; {LAYERS[own]} may use only {', '.join(LAYERS[:own])} "
                       "(nn knows nothing of models/io/train; models nothing of train)")


def test_no_import_circles():
  found = [sorted(c) for c in circles(import_graph())]
  assert found == [], f"import circles (a module imports one that imports it back): {found}"


def test_the_circle_finder_finds_a_circle_and_nothing_else():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
  assert circles(graph) == [{"a", "b", "c"}]


# ---- public names across packages ---------------------------------------------------------

def source_files() -> list[tuple[str, str, ast.AST, str, bool]]:
  """``(file, package, syntax tree, module, is_package)`` for jlora's modules, bench's scripts and the notebooks."""
  files = [(str(p.relative_to(ROOT)), module_name(p) if p.name == "__init__.py" else module_name(p).rpartition(".")[0],
            ast.parse(p.read_text()), module_name(p), p.name == "__init__.py") for p in MODULES.values()]
  files += [(str(p.relative_to(ROOT)), "bench", ast.parse(p.read_text()), "", False)
            for p in sorted((ROOT / "bench").glob("*.py"))]
  files += [(str(p.relative_to(ROOT)), "colab", ast.parse(notebook_code(p)), "", False)
            for p in sorted((ROOT / "colab").glob("*.ipynb"))]
  return files


def private_cross_package_imports() -> set[tuple[str, str]]:
  return {(file, private_module(name)) for file, package, tree, module, is_package in source_files()
          for name in private_imports(package, tree, module, is_package)}


def test_no_package_reaches_into_another_packages_private_modules():
  """jlora's packages, bench/ and the colab notebooks use what each package's ``__init__`` exports."""
  found = sorted(private_cross_package_imports())
  assert found == [], f"private names imported across packages (export them from the owner's __init__): {found}"


def test_the_private_import_check_sees_imports_in_functions_and_spelled_out_chains():
  tree = ast.parse("import typing\nif typing.TYPE_CHECKING:\n  from jlora.nn._layer import LoraLayer\n"
                   "def f():\n  from jlora.io import _safetensors\n  return jlora.models._sharding.AXES\n"
                   "from jlora.train import TrainConfig\n")
  assert private_imports("jlora.train", tree) == ["jlora.nn._layer.LoraLayer", "jlora.io._safetensors",
                                                  "jlora.models._sharding.AXES"]
  assert private_imports("jlora.nn", ast.parse("from jlora.nn._layer import LoraLayer")) == []


# ---- one meaning per name -----------------------------------------------------------------

def test_jlora_train_is_the_package_and_calling_it_runs_the_job():
  import sys

  import jlora.train
  from jlora.train import TrainConfig, train

  assert jlora.train is sys.modules["jlora.train"] and callable(jlora.train)
  assert jlora.train.TrainConfig is TrainConfig and jlora.train.train is train
  with pytest.raises(TypeError, match="takes a jlora.TrainConfig"):
    jlora.train("not a config")  # the call reaches train(), which checks its input first


@pytest.mark.parametrize("module, old, new", [
    ("jlora.train", "ModelConfig", "ModelSection"), ("jlora.train", "DataConfig", "DataSection"),
    ("jlora.train", "OptimConfig", "OptimSection"), ("jlora.train", "MeshConfig", "MeshSection"),
    ("jlora.train", "CheckpointConfig", "CheckpointSection"), ("jlora.train", "ReportConfig", "ReportSection"),
    ("jlora.train", "AdapterConfig", "adapter_section"),
])
def test_a_renamed_job_section_keeps_its_old_name_with_a_warning(module, old, new):
  import importlib

  package = importlib.import_module(module)
  with pytest.warns(DeprecationWarning, match=f"{old} is deprecated; use jlora.train.{new}"):
    assert getattr(package, old) is getattr(package, new)


def test_the_old_adapter_section_class_builds_the_kinds_config():
  with pytest.warns(DeprecationWarning):
    from jlora.train import AdapterConfig
  adapter = AdapterConfig(kind="moslora", r=4)
  assert isinstance(adapter, jlora.MoSLoraConfig) and (adapter.r, adapter.lora_alpha) == (4, 16.0)


def test_get_peft_model_and_merge_and_unload_have_one_public_meaning():
  assert jlora.get_peft_model is jlora.io.get_peft_model
  assert jlora.merge_and_unload is jlora.quant.merge_and_unload
  for name in ("get_peft_model", "merge_and_unload"):
    assert name not in vars(jlora.nn), f"jlora.nn.{name} is a second meaning of jlora.{name}"
    with pytest.warns(DeprecationWarning, match=f"jlora.nn.{name} is deprecated; use jlora.{name}"):
      getattr(jlora.nn, name)


def test_nns_old_merge_and_unload_still_merges():
  model = testing.TinyLM()
  jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["q_proj"]))
  testing.randomize_adapters(model)
  ids = testing.token_ids()
  adapted = model(ids)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    merged = jlora.nn.merge_and_unload(model)
  assert list(jlora.lora_layers(merged)) == []
  np.testing.assert_allclose(merged(ids), adapted, atol=1e-5)


def test_unload_with_merge_is_merge_and_unload_on_a_plain_model():
  ids = testing.token_ids()
  models = []
  for _ in range(2):
    model = testing.TinyLM()
    jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    testing.randomize_adapters(model)
    models.append(model)
  np.testing.assert_array_equal(jlora.nn.unload(models[0], merge=True)(ids), jlora.merge_and_unload(models[1])(ids))


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


# ---- public training pieces, NNX interop ----------------------------------------------------

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

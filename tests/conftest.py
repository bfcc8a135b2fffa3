"""Shared fixtures. Model builders live in ``jlora.testing`` so examples can use them too."""

from __future__ import annotations

import pytest

from jlora import testing
from jlora.nn import _registry


@pytest.fixture
def ids():
  """Token ids ``[2, 5]`` for ``testing.TinyLM``."""
  return testing.token_ids()


@pytest.fixture
def images():
  """Images ``[2, 7, 7, 3]`` for ``testing.TinyConvNet``."""
  return testing.images()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """``(dir, transformers model)``: a tiny Llama saved as a Hugging Face checkpoint (torch-side tests).

  Test modules that need more (an adapter, logits) define their own ``llama``.
  """
  import hf_doubles  # torch and transformers: imported only by the tests that ask for this

  path = tmp_path_factory.mktemp("llama")
  return path, hf_doubles.save("llama", path)


@pytest.fixture(autouse=True)
def _restore_registry():
  """Layer types a test registers do not leak into other tests."""
  saved = dict(_registry._REGISTRY)
  yield
  _registry._REGISTRY.clear()
  _registry._REGISTRY.update(saved)

"""Old public names kept working: a module ``__getattr__`` that serves each with a DeprecationWarning."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping


def deprecated_names(module: str, renamed: Mapping[str, tuple[str, Any]]) -> Callable[[str], Any]:
  """A module-level ``__getattr__`` (PEP 562) for ``module``: ``renamed[old] = (new name, object)``.

  Reading ``module.old`` (or ``from module import old``) warns that ``old``
  is deprecated in favour of the new name and returns the object.
  """

  def __getattr__(name: str) -> Any:
    if name in renamed:
      new, value = renamed[name]
      warnings.warn(f"{module}.{name} is deprecated; use {new}.", DeprecationWarning, stacklevel=2)
      return value
    raise AttributeError(f"module {module!r} has no attribute {name!r}")

  return __getattr__

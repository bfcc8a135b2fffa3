"""Safe destinations for writes: refuse files and foreign data, say what to do on permission errors."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator


def check_directory_path(path: Path, what: str) -> None:
  """``path`` is a directory or does not exist yet; anything else is a ValueError naming it."""
  if path.exists() and not path.is_dir():
    raise ValueError(f"{what} {str(path)!r} is an existing file, not a directory; pass a directory path "
                     "(a new one is created).")
  for parent in path.parents:
    if parent.exists():
      if not parent.is_dir():
        raise ValueError(f"{what} {str(path)!r} lies under {str(parent)!r}, which is a file; pass a path "
                         "under a directory.")
      break


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str) -> Iterator[None]:
  """Turn a bare ``PermissionError`` while writing ``what`` to ``path`` into one that says the fix."""
  try:
    yield
  except PermissionError as e:
    raise PermissionError(
        f"Cannot write {what} to {str(path)!r}: permission denied"
        f"{f' on {e.filename!r}' if e.filename else ''}. Choose a destination you can write to, or make "
        "it writable (e.g. chmod u+w).") from None


def fresh_dir(parent: Path, prefix: str, suffix: str) -> Path:
  """A new, empty directory ``parent/<prefix><random><suffix>`` with the umask's permissions.

  ``os.mkdir`` applies the umask (typically 755, like PEFT's and
  transformers' output directories); ``tempfile.mkdtemp`` would make it 700,
  and the directory keeps that mode once renamed into place.
  """
  while True:
    path = Path(parent) / f"{prefix}{uuid.uuid4().hex[:8]}{suffix}"
    try:
      path.mkdir()
      return path
    except FileExistsError:
      continue

"""Compile once, reuse: XLA's compiled programs and GPU autotuning results kept on disk between runs.

A restarted or resumed job, a second job of the same shape and ``jlora
generate`` then load the compiled step instead of compiling it again; on a GPU
that also skips GEMM autotuning (about a minute per start for an fp8 base).

Where: ``compile_cache_dir(root)``, a subdirectory per backend, device kind
and jax/jaxlib version (``cache_subdir``), e.g.
``~/.cache/jlora/compile/gpu-nvidia-h100-80gb-hbm3-jax0.11.2-jaxlib0.11.2``.
jax's persistent compilation cache keys each program by its HLO, compile
options, XLA flags, devices and backend version, so a stale or foreign
entry is never loaded; XLA's per-fusion autotune cache (written by jax under
the same directory, ``xla_gpu_per_fusion_autotune_cache_dir``) keys each
fusion by its HLO and the GPU's description. The per-kind, per-version
subdirectory adds a second guard for the autotune results, which are
timings of one chip: an H100's never reach an H200 or another XLA, even on a
shared disk, and one kind's cache can be dropped alone.

The cache is trusted code (jax loads executables from it): keep it in a
directory only you can write, as the default under ``~/.cache`` is.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax

AUTO = "auto"
OFF = ("none", "off", "")
MIN_COMPILE_SECONDS = 0.5
"""Programs that compiled faster than this are not written (jax's default is 1 s; the train step's
smaller companions, e.g. the optimizer's init, take about a second on a GPU)."""
AUTOTUNE_CACHE = "xla_gpu_per_fusion_autotune_cache_dir"
CACHED_BACKENDS = ("gpu", "tpu")
"""``compile_cache="auto"`` caches where compiles are long (autotuning, big programs), not on CPU."""


def default_root() -> Path:
  """``$JLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/jlora``, else ``~/.cache/jlora``; plus ``compile``."""
  if os.environ.get("JLORA_CACHE_DIR"):
    return Path(os.environ["JLORA_CACHE_DIR"]).expanduser() / "compile"
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base).expanduser() / "jlora" / "compile"


def cache_subdir(backend: str, device_kind: str, jax_version: str, jaxlib_version: str) -> str:
  """The directory name of one backend, device kind and jax/jaxlib version, in ``[a-z0-9._-]``."""
  slug = lambda s: re.sub(r"[^a-z0-9.]+", "-", s.lower()).strip("-") or "unknown"
  return f"{slug(backend)}-{slug(device_kind)}-jax{slug(jax_version)}-jaxlib{slug(jaxlib_version)}"


def compile_cache_dir(setting: str, backend: str | None = None, device_kind: str | None = None) -> Path | None:
  """Where a job's compile cache goes for ``setting`` (a job's ``compile_cache``), or None when off.

  ``"auto"``: ``default_root()`` on a GPU or TPU, off on CPU; ``"none"``
  (or ``""``, ``"off"``): off; anything else: that directory (on every backend).
  Backend and device kind default to jax's first device's.
  """
  if setting in OFF:
    return None
  backend = backend or jax.default_backend()
  if setting == AUTO and backend not in CACHED_BACKENDS:
    return None
  root = default_root() if setting == AUTO else Path(setting).expanduser()
  if device_kind is None:
    device_kind = jax.devices()[0].device_kind
  import jaxlib
  return root / cache_subdir(backend, device_kind, jax.__version__, jaxlib.__version__)


def enable_compile_cache(setting: str = AUTO) -> Path | None:
  """Turn jax's persistent compilation cache and XLA's autotune cache on for this process.

  Call before the first compile. A cache directory the user already set
  (``jax_compilation_cache_dir``, e.g. ``JAX_COMPILATION_CACHE_DIR``) wins
  and is returned as is. Returns the directory in use, or None when off.
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    return Path(current)
  path = compile_cache_dir(setting)
  if path is None:
    return None
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor: the step is large
  jax.config.update("jax_persistent_cache_enable_xla_caches", AUTOTUNE_CACHE)
  return path

"""The compile cache: on by default where compiles are long, one directory per device kind and jax version."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jlora.train import TrainConfig, compile_cache_dir, load_config
from jlora.train._compile_cache import cache_subdir, default_root

ROOT = Path(__file__).resolve().parents[1]


def test_the_subdirectory_names_backend_device_kind_and_versions_safely():
  name = cache_subdir("gpu", "NVIDIA H100 80GB HBM3", "0.11.2", "0.11.2")
  assert name == "gpu-nvidia-h100-80gb-hbm3-jax0.11.2-jaxlib0.11.2"
  assert cache_subdir("gpu", "NVIDIA H200", "0.11.2", "0.11.2") != name
  assert cache_subdir("gpu", "NVIDIA H100 80GB HBM3", "0.11.3", "0.11.2") != name
  assert "/" not in cache_subdir("gpu", "../../etc", "1", "1")


def test_auto_caches_on_gpu_and_tpu_under_the_user_cache_not_on_cpu(monkeypatch, tmp_path):
  monkeypatch.delenv("JLORA_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compile_cache_dir("auto", "cpu", "cpu") is None
  got = compile_cache_dir("auto", "gpu", "NVIDIA H100 80GB HBM3")
  assert got.parent == tmp_path / "jlora" / "compile" and got.name.startswith("gpu-nvidia-h100-80gb-hbm3-jax")
  assert compile_cache_dir("auto", "tpu", "TPU v5 lite").parent == default_root()


def test_jlora_cache_dir_overrides_the_user_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("JLORA_CACHE_DIR", str(tmp_path / "mine"))
  assert compile_cache_dir("auto", "gpu", "H100").parent == tmp_path / "mine" / "compile"


@pytest.mark.parametrize("off", ["none", "off", ""])
def test_off_turns_the_cache_off_everywhere(off):
  assert compile_cache_dir(off, "gpu", "H100") is None


def test_a_directory_setting_caches_on_every_backend(tmp_path):
  assert compile_cache_dir(str(tmp_path), "cpu", "cpu").parent == tmp_path


def test_the_job_config_defaults_to_auto_and_takes_a_path_or_none():
  assert TrainConfig().compile_cache == "auto"
  assert load_config(None, ["compile_cache=none"]).compile_cache == "none"
  assert load_config(None, ["compile_cache=/tmp/cache"]).compile_cache == "/tmp/cache"


PROGRAM = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from jlora.train import enable_compile_cache
    path = enable_compile_cache(sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache even this small program
    print(path, jax.config.jax_persistent_cache_enable_xla_caches)
    jax.jit(lambda x: jnp.sin(x) * float(sys.argv[2])).lower(jnp.ones(8)).compile()
""")


def run_program(cache, constant, env=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **(env or {}))
  out = subprocess.run([sys.executable, "-c", PROGRAM, str(cache), str(constant)], env=env, capture_output=True,
                       text=True, check=True)
  return out.stdout.split()


def cache_entries(directory):
  return sorted(p.name for p in Path(directory).rglob("*") if p.is_file())


def test_a_second_process_reuses_the_compiled_program_and_a_new_program_adds_one(tmp_path):
  path, xla_caches = run_program(tmp_path, 2.0)
  assert Path(path).parent == tmp_path and xla_caches == "xla_gpu_per_fusion_autotune_cache_dir"
  first = cache_entries(path)
  assert first
  run_program(tmp_path, 2.0)
  assert cache_entries(path) == first  # same HLO, flags and device: a hit, nothing new written
  run_program(tmp_path, 3.0)
  assert len(cache_entries(path)) > len(first)


def test_a_cache_directory_the_user_set_wins(tmp_path):
  path, _ = run_program(tmp_path / "job", 2.0, env={"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "user")})
  assert Path(path) == tmp_path / "user" and not (tmp_path / "job").exists()

"""The memory plan: per-device bytes before compiling, the device's capacity, and one clear error with the fix.

The estimate is checked against XLA's compiled ``memory_analysis()`` of the
real train step (argument + temp + output bytes per device) on 8 simulated
CPU devices: it must land within a factor of 1.6 either way, for FSDP,
tensor-parallel and every remat policy, and for an unrolled layer loop.
Unrolling is calibrated on GPU peaks (``UNROLLED_KEPT``): the plan must stay
above those measurements.
"""

import types

import pytest

from mesh_doubles import (MEMORY_CASES, MODEL, RANK, ROWS, SEQ, TARGETS, UNROLLS, compiled_memory,
                          compiled_unrolled_memory)
from jlora.train import MemoryPlanError, TrainConfig, train
from jlora.train._memory import GiB, Arch, plan_memory
from jlora.train._memory_fit import check_fits, cudnn_packed_slots, device_capacity, plan_defaults, suggestions

TEST_ARCH = Arch(**{k: MODEL[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "head_dim")})
TINYLLAMA = Arch(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, head_dim=64)
LLAMA_3B = Arch(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
LLAMA_8B = Arch(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128)
V5E = 16 * GiB


def estimate(d, f, t, remat, unroll=1):
  return plan_memory(TEST_ARCH, mesh=(d, f, t), remat=remat, rows_per_device=ROWS, seq_len=SEQ,
                     base_bytes_per_param=4, activation_bytes=4, adapter_bytes=4, r=RANK, targets=TARGETS,
                     scan_unroll=unroll)


@pytest.mark.slow
@pytest.mark.parametrize("case", MEMORY_CASES, ids=lambda c: "x".join(map(str, c[:3])) + "/" + c[3])
def test_estimate_is_within_a_factor_of_the_compiled_step(case):
  m = compiled_memory()[f"{case[0]}x{case[1]}x{case[2]}/{case[3]}"]
  compiled = m["argument"] + m["temp"] + m["output"]
  assert 1 / 1.6 < estimate(*case).total / compiled < 1.6


@pytest.mark.slow
@pytest.mark.parametrize("unroll", UNROLLS)
def test_estimate_at_each_scan_unroll_is_within_a_factor_of_the_compiled_step(unroll):
  m = compiled_unrolled_memory()[f"1x1x1/matmuls/u{unroll}"]
  assert 1 / 1.6 < estimate(1, 1, 1, "matmuls", unroll).total / (m["argument"] + m["temp"] + m["output"]) < 1.6


@pytest.mark.slow
def test_the_estimate_grows_with_unrolling_as_the_compiled_step_does():
  compiled = {u: m["argument"] + m["temp"] + m["output"]
              for u, m in zip(UNROLLS, compiled_unrolled_memory().values())}
  full = UNROLLS[-1]
  assert compiled[full] > compiled[1]
  assert estimate(1, 1, 1, "matmuls", full).total > estimate(1, 1, 1, "matmuls").total


# Peak bytes measured on one H100 (bench/RESULTS.md): bf16 base, float32 LoRA r=16 on all projections,
# remat "matmuls", cuDNN attention, at scan_unroll 1 and fully unrolled.
GPU_PEAKS_GIB = [(TINYLLAMA, 8, 2048, 1, 16.6), (TINYLLAMA, 8, 2048, 22, 26.2),
                 (LLAMA_3B, 2, 4096, 1, 22.4), (LLAMA_3B, 2, 4096, 28, 35.0)]


@pytest.mark.parametrize("arch, rows, seq, unroll, peak", GPU_PEAKS_GIB,
                         ids=lambda v: str(v) if not isinstance(v, Arch) else f"{v.num_hidden_layers}layers")
def test_the_plan_is_above_the_measured_gpu_peak_rolled_and_unrolled(arch, rows, seq, unroll, peak):
  plan = plan_memory(arch, rows_per_device=rows, seq_len=seq, fused_attention=True, scan_unroll=unroll)
  assert plan.total >= peak * GiB


def test_record_slots_of_packed_rows_raise_the_plan_above_the_measured_gpu_peak():
  # H100, TinyLlama 8x2048 with 8 record slots per row (bench/RESULTS.md, third round): 18.0 GiB.
  unpacked = plan_memory(TINYLLAMA, rows_per_device=8, seq_len=2048, fused_attention=True)
  packed = plan_memory(TINYLLAMA, rows_per_device=8, seq_len=2048, fused_attention=True, packed_segments=8)
  assert packed.total > unpacked.total and packed.total >= 18.0 * GiB


@pytest.mark.parametrize("backend, attention, max_segments, slots", [
    ("gpu", "auto", 8, 8), ("gpu", "cudnn", 16, 16), ("gpu", "auto", 32, 0), ("gpu", "auto", None, 0),
    ("gpu", "xla", 8, 0), ("tpu", "auto", 8, 0)])
def test_only_cudnn_packed_layout_jobs_plan_record_slots(backend, attention, max_segments, slots):
  from attention_doubles import tiny_llama

  model = tiny_llama()
  model.attention, model.max_segments = attention, max_segments
  assert cudnn_packed_slots(model, backend) == slots


def test_the_plan_grows_with_scan_unroll():
  totals = [plan_memory(LLAMA_8B, rows_per_device=1, scan_unroll=u).total for u in (1, 2, 32)]
  assert totals == sorted(totals) and len(set(totals)) == 3


# Totals of the plan before it counted unrolling (TinyLlama 8x2048, fsdp=2), per (remat, fused attention).
ROLLED_TOTALS = [("matmuls", True, 20194027520), ("matmuls", False, 27307567104), ("none", True, 42709051392),
                 ("full", False, 17261160448)]


@pytest.mark.parametrize("remat, fused, total", ROLLED_TOTALS)
def test_a_scan_unroll_of_one_gives_the_rolled_figure(remat, fused, total):
  plan = plan_memory(TINYLLAMA, mesh=(1, 2, 1), rows_per_device=8, seq_len=2048, remat=remat,
                     fused_attention=fused, scan_unroll=1)
  assert plan.total == total


def test_the_printed_plan_names_scan_unroll():
  assert "remat=matmuls, scan_unroll=22, 8 rows per device" in plan_memory(TINYLLAMA, scan_unroll=22).describe()


def test_an_unrolled_job_that_fits_rolled_is_told_to_roll_the_loop():
  capacity = 24 * GiB
  plan = plan_memory(TINYLLAMA, capacity=capacity, fused_attention=True, scan_unroll=22)
  assert not plan.fits
  assert suggestions(plan, TINYLLAMA, devices=1, batch_size=8, fused_attention=True,
                     scan_unroll=22)[0] == "model.scan_unroll=1"


def test_params_and_adapter_fall_with_fsdp_times_tensor():
  one, eight = estimate(1, 1, 1, "matmuls"), estimate(1, 4, 2, "matmuls")
  assert eight.params == pytest.approx(one.params / 8, rel=0.01)
  assert eight.adapter == pytest.approx(one.adapter / 8, rel=0.01)


def test_lighter_remat_keeps_fewer_activations():
  kept = [estimate(1, 1, 1, remat).activations for remat in ("none", "matmuls", "full")]
  assert kept == sorted(kept, reverse=True) and kept[0] > kept[2]


def test_capacity_is_read_from_memory_stats_where_jax_has_them():
  gpu = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", memory_stats=lambda: {"bytes_limit": 123})
  assert device_capacity(gpu) == 123


@pytest.mark.parametrize("kind, gib", [("TPU v5 lite", 16), ("TPU v4", 32), ("TPU v5p", 95), ("TPU v6 lite", 32),
                                       ("NVIDIA L4", 24e9 / GiB), ("Tesla T4", 16e9 / GiB)])
def test_capacity_of_known_chips_without_memory_stats(kind, gib):
  device = types.SimpleNamespace(device_kind=kind, memory_stats=lambda: None)
  assert device_capacity(device) == pytest.approx(gib * GiB, rel=1e-6)


def test_an_8b_model_on_one_v5e_chip_does_not_fit():
  plan = plan_memory(LLAMA_8B, rows_per_device=1, seq_len=2048, capacity=V5E, remat="full")
  assert not plan.fits


def test_defaults_for_an_8b_model_on_a_v5e_8_shard_it_and_say_so():
  plan, said = plan_defaults(LLAMA_8B, devices=8, capacity=V5E, seq_len=2048, fused_attention=True)
  assert plan.fits and plan.mesh[1] > 1
  assert said.startswith(f"picked mesh.fsdp={plan.mesh[1]}, model.remat={plan.remat}, {plan.rows} rows per device")


def test_the_error_names_the_need_the_capacity_and_a_computed_fix():
  plan = plan_memory(LLAMA_8B, mesh=(8, 1, 1), rows_per_device=1, seq_len=2048, capacity=V5E,
                     fused_attention=True)
  hints = suggestions(plan, LLAMA_8B, devices=8, batch_size=8, seq_len=2048, fused_attention=True)
  with pytest.raises(MemoryPlanError, match=r"needs \d+\.\d GiB per device, the device has 16\.0 GiB: "
                                            r"set mesh\.fsdp=\d"):
    check_fits(plan, hints)


def test_train_refuses_a_job_that_cannot_fit_before_writing_anything(tmp_path):
  cfg = TrainConfig().replace(**{"output_dir": str(tmp_path / "run"), "mesh.device_memory_gib": 0.001,
                                 "progress": False})
  with pytest.raises(MemoryPlanError, match="per device, the device has 1.0 MiB"):
    train(cfg)
  assert not (tmp_path / "run").exists()


def test_train_plans_with_the_configured_scan_unroll(tmp_path):
  cfg = TrainConfig().replace(**{"output_dir": str(tmp_path / "run"), "mesh.device_memory_gib": 0.001,
                                 "progress": False, "model.scan_unroll": 2})
  with pytest.raises(MemoryPlanError, match="scan_unroll=2"):
    train(cfg)


@pytest.mark.slow
def test_train_with_fsdp_auto_prints_the_plan_and_what_it_picked(tmp_path, capsys):
  cfg = TrainConfig().replace(**{"output_dir": str(tmp_path / "run"), "mesh.fsdp": -1, "steps": 1,
                                 "progress": False, "samples": 0, "eval_batches": 1, "data.seq_len": 32})
  train(cfg)
  out = capsys.readouterr().out
  assert "memory plan per device (mesh data=1 fsdp=1 tensor=1" in out
  assert "picked mesh.fsdp=1, model.remat=matmuls" in out


H100 = 80 * GiB
HEADLINE = dict(rows_per_device=8, seq_len=2048, fused_attention=True)


def test_auto_scan_unroll_unrolls_fully_where_the_unrolled_plan_fits_with_margin():
  from jlora.train import choose_scan_unroll
  from jlora.train._memory_fit import UNROLL_MARGIN
  unrolled = plan_memory(TINYLLAMA, scan_unroll=22, **HEADLINE).total
  assert choose_scan_unroll(TINYLLAMA, capacity=H100, **HEADLINE) == 22
  assert choose_scan_unroll(TINYLLAMA, capacity=int(unrolled / UNROLL_MARGIN) + 1, **HEADLINE) == 22
  assert choose_scan_unroll(TINYLLAMA, capacity=int(unrolled / UNROLL_MARGIN) - 1, **HEADLINE) == 1


def test_auto_scan_unroll_stays_rolled_where_only_the_rolled_plan_fits():
  from jlora.train import choose_scan_unroll
  capacity = 24 * GiB  # TinyLlama 8x2048: ~19.7 GiB rolled, ~30 GiB unrolled
  assert plan_memory(TINYLLAMA, capacity=capacity, **HEADLINE).fits
  assert not plan_memory(TINYLLAMA, capacity=capacity, scan_unroll=22, **HEADLINE).fits
  assert choose_scan_unroll(TINYLLAMA, capacity=capacity, **HEADLINE) == 1


@pytest.mark.parametrize("capacity, mesh", [(None, (1, 1, 1)), (H100, (1, 2, 1))])
def test_auto_scan_unroll_stays_rolled_without_a_known_capacity_or_under_fsdp(capacity, mesh):
  from jlora.train import choose_scan_unroll
  assert choose_scan_unroll(TINYLLAMA, capacity=capacity, mesh=mesh, **HEADLINE) == 1


def test_auto_scan_unroll_of_the_3b_shape_on_an_h100_unrolls():
  from jlora.train import choose_scan_unroll
  assert choose_scan_unroll(LLAMA_3B, capacity=H100, rows_per_device=2, seq_len=4096, fused_attention=True) == 28


@pytest.mark.parametrize("capacity_gib, backend, unroll", [(1024.0, "gpu", "layers"), (0.0, "cpu", 1),
                                                           (1e-3, "gpu", 1)])
def test_a_jobs_auto_scan_unroll_follows_its_plan(capacity_gib, backend, unroll):
  from jlora.train._memory_fit import job_scan_unroll
  from jlora.train._model import load_model
  from jlora.train._config import ModelConfig as TrainModelConfig
  model, _ = load_model(TrainModelConfig(name="tiny"))
  want = model.config.num_hidden_layers if unroll == "layers" else unroll
  assert job_scan_unroll(model, batch_size=8, seq_len=128, mesh=(1, 1, 1), remat="matmuls", r=8,
                         targets=TARGETS, capacity_gib=capacity_gib, backend=backend) == want


def test_train_with_auto_scan_unroll_plans_rolled_where_the_unrolled_step_does_not_fit(tmp_path):
  cfg = TrainConfig().replace(**{"output_dir": str(tmp_path / "run"), "mesh.device_memory_gib": 0.001,
                                 "progress": False})
  with pytest.raises(MemoryPlanError, match="scan_unroll=1,"):
    train(cfg)

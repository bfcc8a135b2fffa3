"""bench/profile_step.py's breakdown of a step's device time into categories; CPU smoke runs of the bench tools."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import memory_probe  # noqa: E402
import profile_step  # noqa: E402

HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%gemm_fusion_dot.7_computation (param_0.1: bf16[16384,2048], param_1.1: bf16[2048,16]) -> bf16[16384,16] {
  %param_0.1 = bf16[16384,2048]{1,0} parameter(0)
  %param_1.1 = bf16[2048,16]{1,0} parameter(1)
  ROOT %dot.3 = bf16[16384,16]{1,0} dot(%param_0.1, %param_1.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (x: bf16[16384,2048], w: bf16[2048,2048], a: bf16[2048,16]) -> f32[] {
  %x = bf16[16384,2048]{1,0} parameter(0)
  %w = bf16[2048,2048]{1,0} parameter(1)
  %a = bf16[2048,16]{1,0} parameter(2)
  %custom-call.1 = (bf16[16384,2048]{1,0}, s8[1024]{0}) custom-call(%x, %w), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"beta":0}}
  %custom-call.2 = (bf16[2048,2048]{1,0}, s8[1024]{0}) custom-call(%a, %w), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"beta":1}}
  %gemm_fusion_dot.7 = bf16[16384,16]{1,0} fusion(%x, %a), kind=kCustom, calls=%gemm_fusion_dot.7_computation
  %custom-call.9 = (bf16[8,32,2048,64]{3,2,1,0}, u8[0]{0}) custom-call(%x, %x, %x), custom_call_target="__cudnn$fmhaSoftmax"
  %loop_dynamic_update_slice_fusion.3 = bf16[22,16384,2048]{2,1,0} fusion(%x), kind=kLoop, calls=%c
  %loop_add_fusion.2 = bf16[16384,2048]{1,0} fusion(%x, %x), kind=kLoop, calls=%d
  %all-gather-start.1 = bf16[4096,2048]{1,0} all-gather-start(%w), dimensions={0}
  ROOT %r = f32[] constant(0)
}
"""


@pytest.fixture(scope="module")
def hlo():
  return profile_step.parse_hlo(HLO)


@pytest.mark.parametrize("op, kernel, category", [
    ("custom-call.1", "nvjet_sm90_tst_192x192", "gemm"),
    ("custom-call.2", "nvjet_sm90_tst_128x64", "low_rank"),  # the A·B of a merge: rank 16 inside
    ("gemm_fusion_dot.7", "gemm_fusion_dot_7", "low_rank"),  # x @ A, found through the fused dot
    ("custom-call.9", "cudnn_generated_fort_native_sdpa", "attention"),
    ("loop_dynamic_update_slice_fusion.3", "loop_dynamic_update_slice_fusion_3", "copy"),
    ("loop_add_fusion.2", "loop_add_fusion_2", "elementwise"),
    ("all-gather-start.1", "ncclDevKernel_AllGather", "collective"),
    ("unknown.4", "MemcpyD2D", "copy"),
    ("unknown.5", "some_kernel", "other"),
])
def test_each_op_lands_in_its_category(hlo, op, kernel, category):
  assert profile_step.categorize(op, kernel, *hlo) == category


def test_gemms_with_a_matrix_epilogue_are_counted():
  assert profile_step.epilogue_gemms(HLO) == 1


def test_breakdown_gives_ms_share_of_the_step_and_idle_time():
  table = [(6.0, 2, "custom-call.1", "k", "gemm"), (2.0, 1, "loop_add_fusion.2", "k", "elementwise")]
  out = profile_step.breakdown(table, step_ms=10.0)
  assert out["gemm"] == dict(ms=6.0, pct=60.0, calls=2)
  assert out["idle"]["ms"] == pytest.approx(2.0) and out["attention"]["ms"] == 0.0


def test_a_trace_without_gpu_streams_falls_back_to_host_op_events(hlo):
  events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "X", "pid": 1, "name": "loop_add_fusion.2", "dur": 5},
            {"ph": "X", "pid": 1, "name": "PjitFunction(step)", "dur": 50}]
  where, kept = profile_step.op_events(events, hlo[0])
  assert where == "host" and [e["name"] for e in kept] == ["loop_add_fusion.2"]


@pytest.mark.slow
def test_profile_runs_on_cpu_at_the_tiny_shape(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  subprocess.run([sys.executable, str(ROOT / "bench" / "profile_step.py"), "--shape", "tiny", "--batch", "1",
                  "--seq", "16", "--steps", "1", "--warmup", "0", "--ckpt", str(tmp_path / "ckpt"),
                  "--scan-unroll", "2", "--out", str(tmp_path)], check=True, env=env, capture_output=True)
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert set(summary["categories"]) == set(profile_step.CATEGORIES) | {"idle"}
  assert summary["scan_unroll"] == 2 and summary["while_loops"] == 0 and summary["events"] > 0


@pytest.mark.slow
def test_bench_worker_trains_on_cpu_at_the_tiny_shape_with_its_levers(tmp_path):
  import bench
  bench.make_checkpoint(str(tmp_path / "ckpt"), "tiny", 2)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "worker", "--shape", "tiny", "--layers",
                         "2", "--batch", "1", "--seq", "16", "--steps", "1", "--warmup", "0", "--scan-unroll", "2",
                         "--lora-matmul", "auto", "--shared", "0", "--ckpt", str(tmp_path / "ckpt")],
                        check=True, env=env, capture_output=True, text=True)
  (line,) = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  result = json.loads(line[len("RESULT "):])
  assert result["scan_unroll"] == 2 and result["lora_matmul"] == "auto" and result["tokens_per_s"] > 0


STACKS_HLO = """
  %p.1 = bf16[4,256,128]{2,1,0} parameter(0)
  %dynamic-update-slice.3 = f32[4,8,64]{2,1,0} dynamic-update-slice(%a, %b, %c, %d, %e)
  %copy.7 = bf16[4,256,128]{1,2,0} copy(%p.1)
  ROOT %fusion.2 = bf16[4,16]{1,0} fusion(%p.1), kind=kLoop, calls=%f
  %small.9 = f32[4,2]{1,0} add(%x, %y)
  %other.5 = f32[3,256,128]{2,1,0} add(%x, %y)
  %tuple.1 = (f32[4,8]{1,0}, f32[4,8]{1,0}) tuple(%x, %y)
"""


def test_stacked_buffers_lists_layer_stacks_largest_first_without_parameters():
  found = memory_probe.stacked_buffers(STACKS_HLO, layers=4, min_bytes=64)
  assert [(f["name"], f["op"], f["shape"], f["bytes"]) for f in found] == [
      ("copy.7", "copy", [4, 256, 128], 2 * 4 * 256 * 128),
      ("dynamic-update-slice.3", "dynamic-update-slice", [4, 8, 64], 4 * 4 * 8 * 64),
      ("fusion.2", "fusion", [4, 16], 2 * 4 * 16)]

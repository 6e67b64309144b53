"""bench_linear's model columns: our rows carry the FLOP / byte model of the path they run and
its roofline time at the ceilings measured on the GPU, so a GPU run compares measured time to it;
peers carry none."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_linear

N, H, V = 16384, 5120, 151936
H200 = {"gemm_flops_per_s": 770e12, "bytes_per_s": 4.3e12}  # measured once on an H200


def test_model_fields_per_impl():
    single = bench_linear.model_fields("aepo-linear", N, H, V, torch.bfloat16, H200)
    two = bench_linear.model_fields("aepo-linear-2pass", N, H, V, torch.bfloat16, H200)
    assert single["model_flops"] == 6 * N * H * V and two["model_flops"] == 8 * N * H * V
    floor_ms = 1e3 * 6 * N * H * V / 770e12  # the GEMMs alone at 770 TF/s
    assert floor_ms <= single["model_ms"] < two["model_ms"]
    assert {k["name"] for k in single["model_kernels"]} >= {"dX_r = dz W", "forward row kernel"}
    assert bench_linear.model_fields("liger", N, H, V, torch.bfloat16, H200) == {}


def test_model_fields_take_the_measured_ceilings():
    """A slower GEMM (an H100's ~600 TF/s, say) predicts a longer compute-bound time."""
    fast = bench_linear.model_fields("aepo-linear", N, H, V, torch.bfloat16, H200)
    slow_gemm = H200 | {"gemm_flops_per_s": 385e12}
    slow = bench_linear.model_fields("aepo-linear", N, H, V, torch.bfloat16, slow_gemm)
    assert slow["model_tflops"] == 385 and fast["model_tflops"] == 770
    assert 1.5 < slow["model_ms"] / fast["model_ms"] <= 2.0  # the GEMMs dominate

"""bench_linear's model columns: our rows carry the FLOP / byte model of the path they run and
its H200 roofline time, so the first GPU run compares measured time to it; peers carry none."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_linear

N, H, V = 16384, 5120, 151936


def test_model_fields_per_impl():
    single = bench_linear.model_fields("aepo-linear", N, H, V, torch.bfloat16)
    two = bench_linear.model_fields("aepo-linear-2pass", N, H, V, torch.bfloat16)
    assert single["model_flops"] == 6 * N * H * V and two["model_flops"] == 8 * N * H * V
    floor_ms = 1e3 * 6 * N * H * V / 770e12  # the GEMMs alone at 770 TF/s
    assert floor_ms <= single["model_ms"] < two["model_ms"]
    assert {k["name"] for k in single["model_kernels"]} >= {"dX_r = dz W", "forward row kernel"}
    assert bench_linear.model_fields("liger", N, H, V, torch.bfloat16) == {}

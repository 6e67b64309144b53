"""Every launch configuration benchmarks/sweep_kernels.py times compiles for sm_90 without
spilling registers, so a GPU session spends none of its minutes on configurations that cannot
win; checked on CPU with the compile gate (:func:`aepo.kernels.compile_gate.sweep_resources`).

The compiles run in one subprocess without TRITON_INTERPRET (interpreted kernels cannot be
compiled); Triton's cache makes reruns fast (cold: about 35 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import sweep_kernels  # noqa: E402

GRIDS = {"logits": sweep_kernels.LOGITS_GRID}
# Outside the logits grid: 65536 values a row block on 4 warps (512 per thread) spill on sm_90.
SPILLING = {"BLOCK_V": 65536, "num_warps": 4}

_SCRIPT = """
import json, sys
from aepo.kernels import _resources, compile_gate
grids, out = json.loads(sys.argv[1]), {}
for family, configs in grids.items():
    rows = compile_gate.sweep_resources(family, configs, "sm_90")
    out[family] = [
        {k: {"ok": r.ok, "error": r.error, "clean": compile_gate.compiles_clean(r),
             "spilled": _resources.spilled(r.resources) if r.ok else None,
             "registers": r.resources.get("registers"), "constexprs": r.variant.constexprs,
             "options": r.variant.options} for k, r in kernels.items()}
        for kernels in rows
    ]
open(sys.argv[2], "w").write(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """family -> one {kernel: resources} per configuration: the grids, then SPILLING."""
    grids = {"logits": [*GRIDS["logits"], SPILLING]}
    out = tmp_path_factory.mktemp("sweep") / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(grids), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def problems(config: dict, kernels: dict) -> list[str]:
    """One line per kernel of ``config`` that fails to compile or spills on sm_90."""
    lines = []
    for name, r in kernels.items():
        if not r["ok"]:
            lines.append(f"{config}: {name} does not compile for sm_90: {r['error'][-300:]}")
        elif not r["clean"]:
            lines.append(
                f"{config}: {name} spills {r['spilled']} B/thread ({r['registers']} registers)"
            )
    return lines


@pytest.mark.parametrize("family", sorted(GRIDS))
def test_no_sweep_configuration_spills_on_sm90(compiled, family):
    grid = GRIDS[family]
    rows = zip(grid, compiled[family][: len(grid)], strict=True)
    found = [line for config, kernels in rows for line in problems(config, kernels)]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("family", sorted(GRIDS))
def test_each_configuration_compiles_its_own_launch(compiled, family):
    """The compiled variants carry the swept tiles, warps and stages (not the shipped default),
    forward and backward with both upstream gradients, as the sweep launches them."""
    grid = GRIDS[family]
    for config, kernels in zip(grid, compiled[family][: len(grid)], strict=True):
        swept = {k: v for k, v in kernels.items() if "merge" not in k}
        assert len(swept) == 2, kernels.keys()
        for name, r in swept.items():
            assert r["options"]["num_warps"] == config["num_warps"], name
            if "num_stages" in config:
                assert r["options"]["num_stages"] == config["num_stages"], name
            tiles = {k: v for k, v in config.items() if k.startswith("BLOCK")}
            assert tiles.items() <= r["constexprs"].items(), (name, r["constexprs"])
            if "bwd" in name or "dz" in name:
                assert r["constexprs"]["HAS_LOGP_GRAD"] and r["constexprs"]["HAS_ENTROPY_GRAD"]


def test_grids_hold_the_shipped_default():
    from aepo.kernels import logprob_entropy

    block, warps = logprob_entropy.GPU_CONFIGS[2]  # bf16, what the sweep times
    assert {"BLOCK_V": block, "num_warps": warps} in sweep_kernels.LOGITS_GRID


def test_check_fails_on_a_spilling_configuration(compiled):
    """The check can fail: a configuration dropped from the grid is reported, kernel by kernel."""
    found = problems(SPILLING, compiled["logits"][-1])
    assert any(" spills " in line for line in found), found

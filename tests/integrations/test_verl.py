"""aepo.integrations.verl against the real verl 0.9.1, in a process of its own.

verl pins what this environment cannot share (transformers < 5.11; ray, tensordict, hydra), so
it is installed, without its dependencies, into a directory of its own that only the worker
process (verl_worker.py) puts on PYTHONPATH; this test session never imports verl::

    .venv/bin/pip install --no-deps --target .venv/verl-site verl==0.9.1 ray==2.60.0 \\
        tensordict==0.10.0 pyvers==0.2.3 omegaconf==2.3.0 hydra-core==1.3.8 \\
        antlr4-python3-runtime==4.9.3 codetiming==1.4.0 orjson==3.13.0

AEPO_VERL_SITE points elsewhere. The checks themselves are in verl_worker.py; each one is a test
here, so a failure shows the worker's traceback.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VERL_SITE = Path(os.environ.get("AEPO_VERL_SITE", ROOT / ".venv" / "verl-site"))
WORKER = Path(__file__).with_name("verl_worker.py")
CHECKS = (
    "registry",
    "vanilla_parity",
    "aepo_parity",
    "variants",
    "options",
    "microbatch_accumulation",
    "ppo_loss_handover",
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (VERL_SITE / "verl" / "__init__.py").is_file(),
        reason=f"verl 0.9.1 is not installed in {VERL_SITE} (see this file's docstring)",
    ),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Run every verl check once, in a subprocess with verl on its path."""
    out = tmp_path_factory.mktemp("verl") / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(VERL_SITE), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if not out.is_file():
        pytest.fail(f"verl worker died (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(out.read_text())


def test_worker_ran_every_check(results):
    assert sorted(results) == sorted(CHECKS)


@pytest.mark.parametrize("check", CHECKS)
def test_verl(results, check):
    result = results[check]
    assert result["ok"], result["error"]
    print(json.dumps(result["figures"], indent=1))

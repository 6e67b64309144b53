"""The numeric suites under other CPUs' kernels: ``make test-matrix``.

Machines of the project's kind come with different CPUs (AMD EPYC, Intel Xeon with AVX-512 and
AMX), and torch, oneDNN and MKL pick different kernels on each, so float results differ in the
last bits. This runs the numeric suites once per configuration that emulates another CPU or
thread count on this machine, and prints a table of what passed and what failed under each::

    python -m tests.matrix                      # every configuration, the numeric suites
    python -m tests.matrix --configs omp1 avx2  # some of them
    python -m tests.matrix -- -k tree           # extra arguments go to pytest

Each configuration is a fresh ``pytest`` process (the variables must be set before torch is
imported); its JUnit XML lands in ``--out`` and the table in ``--out/matrix.md``. Not part of
``make test``: about 15 minutes a configuration on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SUITES = ("tests/kernels", "tests/objectives", "tests/train", "tests/integrations")

# name -> environment. ATEN_CPU_CAPABILITY picks torch's own vectorised kernels, the oneDNN and
# MKL caps the ISA of the GEMM / convolution libraries, OMP_NUM_THREADS the reduction split.
CONFIGS: dict[str, dict[str, str]] = {
    "native": {},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten-avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "onednn-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "mkl-avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "omp1": {"OMP_NUM_THREADS": "1"},
    "omp2": {"OMP_NUM_THREADS": "2"},
}


PROBE = (
    "import os, torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(),"
    " os.environ.get('ONEDNN_MAX_CPU_ISA'), os.environ.get('MKL_ENABLE_INSTRUCTIONS'))"
)


def fingerprint(name: str) -> str:
    """What configuration ``name`` gives torch on this machine: its kernel set, thread count and
    library caps. Configurations with the same fingerprint run the same kernels (``aten-avx512``
    is ``native`` on an AVX-512 CPU, ``omp2`` on 2 cores), so only the first of them runs."""
    env = dict(os.environ, **CONFIGS[name])
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
    return out.stdout.strip() or f"unknown ({out.stderr.strip()[-200:]})"


@dataclass
class Outcome:
    """One configuration's pytest run, read from its JUnit XML."""

    name: str
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    returncode: int = 0
    failures: list[str] = field(default_factory=list)
    same_as: str = ""  # the configuration that already ran the same kernels, if any


def read_junit(path: Path, outcome: Outcome) -> Outcome:
    """Fill ``outcome``'s counts and failing test ids from a JUnit XML file."""
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome.failed += 1
            outcome.failures.append(test_id)
        elif case.find("skipped") is not None:
            outcome.skipped += 1
        else:
            outcome.passed += 1
    return outcome


def run_config(name: str, suites: list[str], out: Path, extra: list[str]) -> Outcome:
    """Run ``suites`` under configuration ``name`` in a fresh pytest process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **CONFIGS[name])
    xml = out / f"{name}.xml"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=15"]
    cmd.append(f"--junitxml={xml}")
    start = time.monotonic()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.run([*cmd, *suites, *extra], cwd=ROOT, env=env, stdout=log, stderr=log)
    outcome = Outcome(name, seconds=time.monotonic() - start, returncode=proc.returncode)
    if not xml.exists():  # pytest died before writing it: one failure, named by the log
        outcome.failed, outcome.failures = 1, [f"pytest exited {proc.returncode}, see {name}.log"]
        return outcome
    return read_junit(xml, outcome)


def table(outcomes: list[Outcome]) -> str:
    """The markdown table of outcomes, failing test ids listed per configuration."""
    lines = [
        "| configuration | environment | passed | failed | skipped | minutes | failing tests |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        env = " ".join(f"{k}={v}" for k, v in CONFIGS[o.name].items()) or "(as is)"
        if o.same_as:
            lines.append(f"| {o.name} | {env} | = {o.same_as} on this machine | | | | |")
            continue
        fails = "<br>".join(o.failures) or "-"
        lines.append(
            f"| {o.name} | {env} | {o.passed} | {o.failed} | {o.skipped} "
            f"| {o.seconds / 60:.1f} | {fails} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--suites", nargs="+", default=list(SUITES))
    parser.add_argument("--out", type=Path, default=ROOT / ".test-matrix")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed on to pytest")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    outcomes, seen = [], {}
    for name in args.configs:
        key = fingerprint(name)
        if key in seen:
            print(f"[matrix] {name}: torch sees {key!r}, as under {seen[key]}: not rerun")
            outcomes.append(Outcome(name, same_as=seen[key]))
            continue
        seen[key] = name
        print(f"[matrix] {name}: {CONFIGS[name] or 'as is'} ({key}) ...", flush=True)
        outcome = run_config(name, args.suites, args.out, args.pytest_args)
        print(
            f"[matrix] {name}: {outcome.passed} passed, {outcome.failed} failed, "
            f"{outcome.skipped} skipped in {outcome.seconds / 60:.1f} min",
            flush=True,
        )
        outcomes.append(outcome)
        (args.out / "matrix.md").write_text(table(outcomes) + "\n")
    print(table(outcomes))
    return 1 if any(o.failed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())

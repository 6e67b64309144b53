"""tests/matrix.py (``make test-matrix``): JUnit counting, the table, a real run of one config."""

from __future__ import annotations

from tests import matrix

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
  <testcase classname="tests.kernels.test_a" name="test_ok[0]" time="0.1"/>
  <testcase classname="tests.kernels.test_a" name="test_bad" time="0.1">
    <failure message="assert">x</failure></testcase>
  <testcase classname="tests.train.test_b" name="test_skip" time="0.0">
    <skipped message="needs a CUDA GPU"/></testcase>
  <testcase classname="tests.train.test_b" name="test_err" time="0.0">
    <error message="fixture">y</error></testcase>
</testsuite></testsuites>
"""


def test_read_junit_counts_and_names_failures(tmp_path):
    path = tmp_path / "x.xml"
    path.write_text(JUNIT)
    out = matrix.read_junit(path, matrix.Outcome("omp1"))
    assert (out.passed, out.failed, out.skipped) == (1, 2, 1)
    assert out.failures == ["tests/kernels/test_a.py::test_bad", "tests/train/test_b.py::test_err"]


def test_table_lists_environment_and_failures():
    ok = matrix.Outcome("native", passed=5, seconds=90.0)
    bad = matrix.Outcome("aten-avx2", passed=3, failed=1, failures=["tests/a.py::t"])
    text = matrix.table([ok, bad])
    rows = text.splitlines()
    assert rows[2] == "| native | (as is) | 5 | 0 | 0 | 1.5 | - |"
    assert rows[3] == "| aten-avx2 | ATEN_CPU_CAPABILITY=avx2 | 3 | 1 | 0 | 0.0 | tests/a.py::t |"


def test_every_config_sets_what_it_names():
    assert matrix.CONFIGS["omp1"] == {"OMP_NUM_THREADS": "1"}
    assert {env.get("ATEN_CPU_CAPABILITY") for env in matrix.CONFIGS.values()} >= {
        "default",
        "avx2",
        "avx512",
    }
    assert matrix.CONFIGS["onednn-avx2"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_run_config_applies_the_environment(tmp_path, monkeypatch):
    """One configuration end to end: a throwaway suite that passes only when the configuration's
    variable reached the pytest process, and one that fails, both counted from the XML."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_env.py").write_text(
        "import os\n"
        "def test_sees_config():\n"
        "    assert os.environ['OMP_NUM_THREADS'] == '1'\n"
        "def test_fails():\n"
        "    assert False\n"
    )
    monkeypatch.setattr(matrix, "ROOT", tmp_path)
    out = matrix.run_config("omp1", [str(suite)], tmp_path, [])
    assert (out.passed, out.failed) == (1, 1), (tmp_path / "omp1.log").read_text()
    assert out.failures == ["suite/test_env.py::test_fails"]
    assert out.returncode == 1


def test_configs_with_the_same_kernels_run_once(tmp_path, monkeypatch, capsys):
    """On a 2-core AVX-512 machine omp2 and aten-avx512 are native: counted as such, not rerun."""
    prints = {"native": "AVX512 2", "aten-avx512": "AVX512 2", "omp1": "AVX512 1"}
    monkeypatch.setattr(matrix, "fingerprint", prints.get)
    ran = []
    monkeypatch.setattr(
        matrix, "run_config", lambda name, *a: ran.append(name) or matrix.Outcome(name, passed=2)
    )
    code = matrix.main(["--configs", *prints, "--out", str(tmp_path)])
    assert code == 0 and ran == ["native", "omp1"]
    table = (tmp_path / "matrix.md").read_text()
    assert "| aten-avx512 | ATEN_CPU_CAPABILITY=avx512 | = native on this machine |" in table

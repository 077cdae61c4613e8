"""tests/gpu/quick_validate.sh (the 10-minute GPU validation run) is not broken: its --dry-run runs every
stage on the CPU (Triton interpreter, tiny shapes) and must pass and print its summary last."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "gpu" / "quick_validate.sh"


def test_quick_validate_dry_run(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path / "logs"), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "== quick_validate: PASSED (dry run: CPU only)"
    summary = lines[lines.index(next(l for l in lines if l.startswith("== quick_validate summary"))) + 1:-1]
    assert [line.split()[0] for line in summary] == ["build", "correctness", "benchmark", "sanitize-cases"]
    assert all(line.split()[1] == "PASS" for line in summary), summary
    for name in ("build", "correctness", "benchmark", "sanitize-cases"):
        assert (tmp_path / "logs" / f"{name}.log").exists()
    assert "PASS triton" in (tmp_path / "logs" / "correctness.log").read_text()


def test_quick_validate_rejects_unknown_arguments(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--bogus"], cwd=ROOT, env=dict(os.environ, OUT=str(tmp_path)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stdout

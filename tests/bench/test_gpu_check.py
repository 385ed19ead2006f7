"""bench/gpu/check.sh runs where no GPU is: its --dry-run goes through every step on the CPU with a tiny
model (equivalence checks, onepass and TRL runs in their own processes, the summary), so the script a
GPU machine runs has not rotted."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_gpu_check_dry_run_passes_its_equivalence_checks_and_prints_one_summary(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "bench/gpu/check.sh"), "--dry-run", "--out", str(tmp_path / "s.json")],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "== onepass GPU check on cpu (dry run)" in result.stdout
    assert result.stdout.count("[PASS]") == 6 and "[FAIL]" not in result.stdout  # two models, packed SDPA on the CPU
    assert "onepass / TRL:" in result.stdout

"""Benchmark scripts run in smoke mode (tiny sizes, nothing written): they must not rot."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("module", ["benchmarks.vit_forward", "benchmarks.loss_scaling", "benchmarks.input_pipeline", "benchmarks.clustering", "benchmarks.train_step", "benchmarks.ablation"])
def test_benchmark_smoke(module):
    res = subprocess.run([sys.executable, "-m", module, "--smoke"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{\"benchmark\"")]
    assert lines and lines[-1]["benchmark"].endswith("_smoke")

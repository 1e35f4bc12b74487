"""`benchmarks.kernel_speed` on a machine without CUDA: it says the GPU section was not run and times the CPU path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
def test_cpu_report_says_gpu_not_run_and_times_moe_both_ways(tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_speed", "--quick", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report
    assert report["gpu"]["run"] is False and "CUDA" in report["gpu"]["reason"]
    rows = report["cpu"]["moe_grouped_vs_dense"]
    assert {(r["dim"], r["experts"]) for r in rows} == {(64, 4), (128, 8)}
    for row in rows:
        assert row["grouped_ms"] > 0 and row["dense_ms"] > 0
        assert row["grouped_over_dense"] == pytest.approx(row["grouped_ms"] / row["dense_ms"], rel=1e-2)

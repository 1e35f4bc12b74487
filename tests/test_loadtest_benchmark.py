"""`python -m benchmarks.serving --quick` runs end to end on the demo model and writes a valid report.

One row (items mode, beam 32) against all three servers keeps it to a minute or two; the full
`--quick` run covers four rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_serving_benchmark_quick_writes_a_valid_report(demo_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.serving", "--quick", "--model-store", str(demo_store),
         "--modes", "items", "--beams", "32", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report  # the same JSON on stdout
    assert report["benchmark"] == "serving" and report["quick"] is True
    assert report["command"].startswith("python -m benchmarks.serving --quick")  # what reruns it
    assert report["workload"]["history_length"] > 0
    assert "random" in report["alternatives"]["weights"]
    assert report["rows"], "no rows"
    for row in report["rows"]:
        assert row["mode"] in ("items", "session") and row["beam_width"] > 0
        for side in ("onerec", "hf_generate", "hf_batched"):
            measured = row[side]
            assert measured["single_p50_ms"] > 0, side
            assert measured["curve"], side
            for step in measured["curve"]:
                assert step["offered_rps"] > 0 and step["requests"] > 0
            passing = [s["offered_rps"] for s in measured["curve"] if s["pass"]]
            assert measured["sustainable_rps"] == (max(passing) if passing else 0.0)
        hf_rps = row["hf_generate"]["sustainable_rps"]
        if hf_rps > 0:
            assert row["rps_ratio"] == pytest.approx(row["onerec"]["sustainable_rps"] / hf_rps, rel=1e-2)
        assert row["latency_ratio"] == pytest.approx(
            row["hf_generate"]["single_p50_ms"] / row["onerec"]["single_p50_ms"], rel=1e-2
        )
    assert "x hf1" in proc.stderr and "x hfB" in proc.stderr  # the human-readable table

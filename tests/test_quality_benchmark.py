"""`benchmarks.quality`: the report carries the model's own recorded metrics and judges the goal right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks import quality
from onerec.build import sequence_file_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_reuse_reports_the_manifest_metrics_without_beauty_references(demo_store: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality", "--store", str(demo_store), "--reuse"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    manifest = json.loads((demo_store / "demo" / "1" / "manifest.json").read_text())
    for key in ("recall@10", "ndcg@10"):
        assert report["test"]["ours"][key] == manifest["metrics"]["test"][key]
        assert report["test"]["most popular (same run)"][key] == manifest["metrics"]["test_most_popular"][key]
    assert set(report["test"]) == {"ours", "most popular (same run)"}  # TIGER's figures are for Beauty only
    assert report["goal"] is None and report["meets_goal"] is None
    assert "ours" in proc.stderr  # the human-readable table


def beauty_manifest(recall10: float, ndcg10: float) -> dict:
    ours = {"recall@5": 0.05, "ndcg@5": 0.03, "recall@10": recall10, "ndcg@10": ndcg10}
    return {
        "name": "beauty",
        "version": 3,
        "dataset": {"kind": "sequence_file", "path": "/data/amazon-beauty/sequences.txt"},
        "metrics": {"test": ours, "valid": ours, "test_most_popular": dict.fromkeys(ours, 0.01)},
    }


def test_goal_needs_both_recall_and_ndcg_and_ratios_are_to_tiger() -> None:
    assert quality.GOAL == {"recall@10": 0.085, "ndcg@10": 0.050}  # DESIGN.md section 9
    r, n = quality.GOAL["recall@10"], quality.GOAL["ndcg@10"]
    met = quality.report(beauty_manifest(r + 0.001, n + 0.001), seconds=None)
    assert met["meets_goal"] is True
    assert met["ratio_to_tiger"]["recall@10"] == round((r + 0.001) / 0.0648, 3)
    assert "TIGER (Rajput et al. 2023)" in met["test"]
    assert quality.report(beauty_manifest(r + 0.001, n - 0.001), seconds=None)["meets_goal"] is False
    assert quality.report(beauty_manifest(r - 0.001, n + 0.001), seconds=None)["meets_goal"] is False


def test_beating_the_baselines_needs_both_metrics_against_every_measured_one() -> None:
    row = {"recall@5": 0.04, "ndcg@5": 0.03, "recall@10": 0.07, "ndcg@10": 0.04}
    baselines = {"kNN": dict(row), "most popular": {k: v / 4 for k, v in row.items()}}
    assert quality.report(beauty_manifest(0.071, 0.041), None, baselines)["beats_every_measured_baseline"] is True
    for ours in ((0.071, 0.039), (0.069, 0.041), (0.070, 0.041)):  # a tie does not beat
        rep = quality.report(beauty_manifest(*ours), None, baselines)
        assert rep["beats_every_measured_baseline"] is False
        assert rep["beats"]["most popular"] == {"recall@10": True, "ndcg@10": True}
    assert set(rep["test"]) >= {"ours", "kNN", "most popular", "TIGER (Rajput et al. 2023)"}


def test_baselines_only_measures_every_baseline_with_the_sasrec_seed_asked_for(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = [" ".join(str(x) for x in [u, *rng.choice(40, size=8, replace=False) + 1]) for u in range(1, 61)]
    dataset = tmp_path / "sequences.txt"
    dataset.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality", "--dataset", str(dataset), "--baselines-only",
         "--sasrec-seed", "3", "--quiet"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert set(report["test"]) == {"most popular", "co-occurrence item-kNN", quality.DIRECTED_KNN,
                                   quality.FADED_KNN, "SASRec (full softmax CE)"}  # fmt: skip
    directed = report["baselines"][quality.DIRECTED_KNN]
    recall = directed["valid_candidate_recall_by_backward"]
    assert str(directed["backward"]) in recall and recall[str(directed["backward"])] == max(recall.values())
    faded = report["baselines"][quality.FADED_KNN]
    ndcg = faded["valid_candidate_ndcg_by_decay"]
    assert faded["backward"] == directed["backward"] and len(ndcg) == len(quality.CANDIDATE_DECAY_LENGTHS)
    assert str(faded["decay"]) in ndcg and ndcg[str(faded["decay"])] == max(ndcg.values())
    assert all(0.0 <= row[k] <= 1.0 for row in report["test"].values() for k in quality.METRICS)
    assert report["baselines"]["SASRec (full softmax CE)"]["config"]["seed"] == 3


def test_train_step_benchmark_times_both_batch_orders_and_the_sorted_one_pads_less(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    seq = tmp_path / "sequences.txt"
    n_long = sequence_file_config(str(seq)).model.history_window + 10  # more than the recipe's encoder window
    sizes = [n_long if u < 20 else 5 for u in range(420)]  # many short users and a few long ones
    lines = [" ".join([f"u{u}"] + [str(i) for i in rng.choice(200, n, replace=False)]) for u, n in enumerate(sizes)]
    seq.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_step", "--dataset", str(seq),
         "--steps", "2", "--rounds", "2", "--chunk-batches", "2"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["rounds"] == 2 and report["chunk_batches"] == 2
    assert report["samples"] == 20 * (n_long - 3) + 400 * 2
    for order in ("random", "length_sorted"):
        assert 0 < report[order]["ms_per_step_min"] <= report[order]["ms_per_step_median"]
    assert report["random"]["mean_padded_width"] == report["history_window"]  # a long user in every batch
    assert report["length_sorted"]["mean_padded_width"] < report["history_window"]
    ratio = report["random"]["ms_per_step_median"] / report["length_sorted"]["ms_per_step_median"]
    assert abs(report["speedup_median"] - ratio) < 1e-9

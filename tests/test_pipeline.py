"""The offline pipeline end to end: build, publish, load, evaluate, recommend (CLI included)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from onerec.data import SyntheticConfig, leave_one_out, make_synthetic

ONEREC = [sys.executable, "-m", "onerec"]


def most_popular_recall_at_10() -> float:
    """The baseline, computed here from the regenerated world rather than taken from the build."""
    split = leave_one_out(make_synthetic(SyntheticConfig()).data)
    counts = np.bincount(np.concatenate(split.train), minlength=split.n_items)
    top10 = set(np.argsort(-counts, kind="stable")[:10].tolist())
    return float(np.mean([t in top10 for t in split.test.targets]))


def test_demo_build_beats_most_popular_by_a_clear_margin(demo_build) -> None:
    store, summary = demo_build
    baseline = most_popular_recall_at_10()
    recall = summary["metrics"]["test"]["recall@10"]
    assert recall >= 3 * baseline and recall - baseline >= 0.2, (recall, baseline)
    assert summary["metrics"]["legality_constrained"] == 1.0
    manifest = json.loads((store / "demo" / "1" / "manifest.json").read_text())
    assert manifest["metrics"]["test"]["recall@10"] == recall
    assert manifest["dataset"]["synthetic_config"]["seed"] == 0


def test_eval_cli_regenerates_the_synthetic_world(demo_build) -> None:
    store, summary = demo_build
    out = subprocess.run(
        [
            *ONEREC,
            "eval",
            "--model",
            str(store / "demo" / "1"),
            "--dataset",
            "synthetic",
            "--k",
            "5",
            "10",
            "--beam",
            "20",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout)
    np.testing.assert_allclose(report["metrics"]["recall@10"], summary["metrics"]["test"]["recall@10"], atol=1e-9)
    assert report["most_popular"]["recall@10"] == most_popular_recall_at_10()


def test_recommend_cli_prints_the_http_response_shape(demo_bundle, demo_store: Path) -> None:
    history = [demo_bundle.item_id(i) for i in (3, 17, 5)]
    for mode, n in (("items", 7), ("session", 8)):
        out = subprocess.run(
            [
                *ONEREC,
                "recommend",
                "--store",
                str(demo_store),
                "--history",
                ",".join(history),
                "--mode",
                mode,
                "--beam-width",
                "16",
                "--num-items",
                str(n),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        doc = json.loads(out.stdout)
        assert doc["model"] == {"name": "demo", "version": "1"}
        ids = [it["item_id"] for it in doc["items"]]
        assert len(ids) == n and len(set(ids)) == n and not set(ids) & set(history)
        for it in doc["items"]:
            index = demo_bundle.item_index(it["item_id"])
            assert list(demo_bundle.catalog.trie.path_of_item(index)) == it["semantic_id"]


def test_build_cli_publishes_a_new_version(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            *ONEREC,
            "build",
            "--dataset",
            "synthetic",
            "--out",
            str(tmp_path),
            "--name",
            "tiny",
            "--epochs",
            "1",
            "--eval-users",
            "40",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["version"] == 1 and (tmp_path / "tiny" / "1" / "model.safetensors").is_file()
    assert "R@10" in out.stderr  # the human-readable summary table


def test_build_cli_rejects_a_missing_dataset(tmp_path: Path) -> None:
    out = subprocess.run(
        [*ONEREC, "build", "--dataset", str(tmp_path / "nope.txt"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "nope.txt" in out.stderr

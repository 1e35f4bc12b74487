"""Data-parallel training (onerec.data_parallel): two processes must train what one would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from onerec.build import SAMPLE_DECAY_LENGTH
from onerec.data import leave_one_out, load_sequence_file
from onerec.data_parallel import GradientGroup, usable_processes
from onerec.model import OneRecModel
from onerec.train import TrainConfig, train_model
from tests.test_quality import training_world, write_catalogue


def test_shards_cover_the_batch_once_in_order() -> None:
    idx = np.arange(11) * 3
    shards = [GradientGroup(rank, 3, [], "").shard(idx) for rank in range(3)]
    assert [len(s) for s in shards] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(shards), idx)
    assert len(GradientGroup(1, 2, [], "").shard(idx[:1])) == 0  # a one-sample batch leaves rank 1 nothing


def test_processes_are_capped_by_the_cores_and_one_off_the_cpu() -> None:
    cores = len(os.sched_getaffinity(0))
    assert usable_processes(64, "cpu") == min(64, cores)
    assert usable_processes(2, "cuda") == 1
    assert usable_processes(1, "cpu") == 1


def train(tmp_path: Path, processes: int) -> tuple[dict[str, torch.Tensor], object]:
    data, split, codes, cfg = training_world(tmp_path)
    # one slot and no dropout: every sample weighs the same and the forward is deterministic, so the
    # mean of the shards' gradients is the whole batch's; no balance term, which is not a mean over samples
    cfg = replace(cfg, session_items=1, dropout=0.0)
    torch.manual_seed(0)
    model = OneRecModel(cfg)
    tcfg = TrainConfig(epochs=2, batch_size=50, lr=3e-3, holdout_share=0.0, threads=1, balance_weight=0.0,
                       processes=processes)  # fmt: skip
    report = train_model(model, split.train, data.user_ids, codes, tcfg, progress=False, selection=split.valid)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, report


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="data-parallel training needs two cores")
def test_two_processes_train_the_weights_one_process_would(tmp_path: Path) -> None:
    alone, alone_report = train(tmp_path / "one", 1)
    paired, paired_report = train(tmp_path / "two", 2)
    assert paired_report.processes == 2 and alone_report.processes == 1
    assert paired_report.steps == alone_report.steps > 10
    untrained = OneRecModel(replace(training_world(tmp_path / "x")[3], session_items=1, dropout=0.0)).state_dict()
    moved = 0
    for name, weight in alone.items():
        torch.testing.assert_close(paired[name], weight, rtol=0.0, atol=5e-4, msg=name)  # float order: 1e-4 apart
        moved += int(not torch.allclose(weight, untrained[name]))
    # Adam moves every trained weight by up to lr per step; without the sum, the two runs part by 0.05
    assert moved > len(alone) // 2
    assert paired_report.train_loss == pytest.approx(alone_report.train_loss, rel=1e-4)
    # each process scored half of the validation rows; their mean is the one process's score
    assert paired_report.holdout_loss == pytest.approx(alone_report.holdout_loss, rel=1e-4)
    assert paired_report.best_epoch == alone_report.best_epoch


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="data-parallel training needs two cores")
def test_build_trains_in_two_processes_and_only_the_caller_publishes(tmp_path: Path) -> None:
    """`onerec build --processes 2` on a sequence file: the peer must leave when training ends, never reaching the
    rest of the build (a second version, a second summary on stdout)."""
    seq = write_catalogue(tmp_path / "data", with_content=False)
    store = tmp_path / "store"
    out = subprocess.run(
        [sys.executable, "-m", "onerec", "build", "--dataset", str(seq), "--out", str(store), "--epochs", "2",
         "--processes", "2", "--eval-users", "20", "--quiet"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)  # one JSON document: the peer printed nothing
    manifest = json.loads((store / "sequences" / "1" / "manifest.json").read_text())
    assert manifest["train"]["processes"] == 2 and manifest["train_config"]["processes"] == 2
    assert manifest["train"]["steps"] > 0 and summary["version"] == 1
    assert sorted(p.name for p in (store / "sequences").iterdir() if p.name.isdigit()) == ["1"]
    # the recipe fades the training samples at SAMPLE_DECAY_LENGTH mean training sequences, choosing no scale
    train = leave_one_out(load_sequence_file(seq)).train
    want = round(SAMPLE_DECAY_LENGTH * float(np.mean([len(s) for s in train])), 3)
    assert manifest["train_config"]["sample_decay"] == want > 0 and "decay" not in manifest["candidates"]


def test_build_rejects_fewer_than_one_process(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "onerec", "build", "--out", str(tmp_path), "--processes", "0", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode != 0 and "--processes 0" in out.stderr
    assert not any(tmp_path.iterdir())  # nothing was built

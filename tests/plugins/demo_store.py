"""Session fixtures: one small synthetic demo model, built once and shared by every test that needs it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


def small_demo_config(name: str = "demo"):
    """The demo model with fewer epochs: enough to beat most-popular by far, fast enough for CI."""
    from onerec.build import demo_config

    cfg = demo_config()
    cfg.name = name
    cfg.train.epochs = 3
    return cfg


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    import torch

    from onerec.build import build

    torch.set_num_threads(1)  # two threads fight each other and whatever else loads a busy CI host
    store = tmp_path_factory.mktemp("demo-store")
    _, summary = build(small_demo_config(), store, progress=False)
    yield store, summary


@pytest.fixture(scope="session")
def demo_store(demo_build: tuple[Path, dict]) -> Path:
    """A model store holding model 'demo', version 1. Tests must not modify it (copy it first)."""
    return demo_build[0]


@pytest.fixture(scope="session")
def demo_bundle(demo_store: Path):
    from onerec.bundle import load_newest_bundle

    bundle, _ = load_newest_bundle(demo_store, "demo")
    return bundle

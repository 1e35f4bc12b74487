"""A published model version round-trips through the store into a working generator."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from onerec.bundle import load_bundle, load_newest_bundle
from onerec.generate import RecRequest
from onerec.model import ModelConfig


def test_bundle_round_trip_gives_identical_weights_and_answers(demo_bundle, demo_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(demo_store, store)
    again, rejected = load_newest_bundle(store)
    assert rejected == [] and again.version == 1
    for (k, a), (_, b) in zip(demo_bundle.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k
    req = [RecRequest(history=[1, 2, 3], num_items=5, mode="session", beam_width=8)]
    assert demo_bundle.generator.generate(req)[0][0].items == again.generator.generate(req)[0][0].items


def test_corrupt_newer_version_is_skipped_and_the_older_one_loads(demo_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(demo_store, store)
    shutil.copytree(store / "demo" / "1", store / "demo" / "2")
    manifest = (store / "demo" / "2" / "manifest.json").read_text().replace('"version": 1', '"version": 2')
    (store / "demo" / "2" / "manifest.json").write_text(manifest)
    weights = store / "demo" / "2" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF
    weights.write_bytes(bytes(raw))
    bundle, rejected = load_newest_bundle(store, "demo")
    assert bundle.version == 1
    assert [r.version for r in rejected] == [2] and "sha256" in rejected[0].reason


def test_catalogue_changes_apply_without_retraining(demo_bundle) -> None:
    catalog = demo_bundle.catalog
    req = RecRequest(history=[4, 9], num_items=5, mode="items", beam_width=8)
    (before,), _ = demo_bundle.generator.generate([req])
    top = demo_bundle.item_id(before.items[0].item)
    catalog.withdraw([top])
    try:
        (after,), _ = demo_bundle.generator.generate([req])
        assert top not in [demo_bundle.item_id(it.item) for it in after.items]
        assert len(after.items) == 5
    finally:
        path = list(catalog.trie.path_of_item(catalog.index(top)))
        catalog.add(top, path)
    (restored,), _ = demo_bundle.generator.generate([req])
    assert restored.items == before.items
    with pytest.raises(ValueError, match="already names"):
        catalog.add("brand-new", list(catalog.trie.path_of_item(0)))


def _copy_as_version_2(store: Path, edit) -> None:  # type: ignore[no-untyped-def]
    shutil.copytree(store / "demo" / "1", store / "demo" / "2")
    manifest = json.loads((store / "demo" / "2" / "manifest.json").read_text())
    manifest["version"] = 2
    edit(manifest)
    (store / "demo" / "2" / "manifest.json").write_text(json.dumps(manifest))


def test_newer_version_whose_d_model_does_not_fit_its_weights_falls_back(demo_store: Path, tmp_path: Path) -> None:
    """Issue 12: the build used to run after the fallback loop, so a config mismatch could not fall back."""
    store = tmp_path / "store"
    shutil.copytree(demo_store, store)
    _copy_as_version_2(store, lambda m: m["model_config"].update(d_model=m["model_config"]["d_model"] * 2))
    bundle, rejected = load_newest_bundle(store, "demo")
    assert bundle.version == 1
    assert [r.version for r in rejected] == [2] and "does not fit the weights" in rejected[0].reason
    with pytest.raises(ValueError, match="version 2: model_config does not fit the weights"):
        load_bundle(store / "demo" / "2")  # what an engine told to load it says


def test_a_manifest_with_the_first_name_of_history_window_still_loads(demo_store: Path, tmp_path: Path) -> None:
    """Versions published before the rename store the encoder window as ``max_history``."""
    store = tmp_path / "store"
    shutil.copytree(demo_store, store)

    def old_name(manifest: dict[str, Any]) -> None:
        config = manifest["model_config"]
        config["max_history"] = config.pop("history_window")

    _copy_as_version_2(store, old_name)
    assert "max_history" in json.loads((store / "demo" / "2" / "manifest.json").read_text())["model_config"]
    old, rejected = load_newest_bundle(store, "demo")
    assert old.version == 2 and rejected == []
    new = load_bundle(store / "demo" / "1")
    assert old.history_window == new.history_window == new.config.history_window
    req = [RecRequest(history=[1, 2, 3], num_items=5, mode="items", beam_width=8)]
    assert old.generator.generate(req)[0][0].items == new.generator.generate(req)[0][0].items


def test_a_model_config_with_both_names_of_the_window_is_refused() -> None:
    with pytest.raises(ValueError, match="both 'max_history' and its new name 'history_window'"):
        ModelConfig.from_dict({"max_history": 20, "history_window": 20})
    assert ModelConfig.from_dict({"max_history": 7}).history_window == 7
    assert "max_history" not in ModelConfig().to_dict()


def test_catalogue_that_does_not_fit_the_config_falls_back(demo_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(demo_store, store)
    _copy_as_version_2(store, lambda m: None)
    catalog = store / "demo" / "2" / "catalog.json"
    doc = json.loads(catalog.read_text())
    doc["popular"] = [len(doc["item_ids"]) + 5]  # would answer the popularity fallback with no item
    raw = json.dumps(doc).encode()
    catalog.write_bytes(raw)
    manifest = json.loads((store / "demo" / "2" / "manifest.json").read_text())
    manifest["files"]["catalog.json"] = {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
    (store / "demo" / "2" / "manifest.json").write_text(json.dumps(manifest))
    bundle, rejected = load_newest_bundle(store, "demo")
    assert bundle.version == 1 and "popular" in rejected[0].reason

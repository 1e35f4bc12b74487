"""Model store: atomic publish, verification and newest-valid selection."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from model_store import (
    CorruptVersionError,
    NoValidVersionError,
    list_models,
    list_versions,
    load_newest_valid,
    publish_version,
    read_verified_file,
    verify_version,
)


def weights(scale: float = 1.0) -> bytes:
    return save(
        {
            "encoder.weight": np.full((4, 3), scale, dtype=np.float32),
            "codes": np.arange(6, dtype=np.int64).reshape(2, 3),
        }
    )


def publish(store: Path, scale: float = 1.0, name: str = "demo") -> Path:
    files = {"model.safetensors": weights(scale), "catalog.json": json.dumps({"items": ["a", "b"]}).encode()}
    meta = {"model_config": {"d_model": 8}, "catalog_size": 2, "metrics": {"recall@10": 0.5 * scale}, "seed": 1}
    return publish_version(store, name, files, meta).path


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_round_trip(tmp_path: Path) -> None:
    published = publish_version(
        tmp_path,
        "demo",
        {"model.safetensors": weights(), "catalog.json": b"[]"},
        {"model_config": {"d_model": 8}, "catalog_size": 2},
    )
    assert (published.name, published.version, published.path) == ("demo", 1, tmp_path / "demo" / "1")
    verified = verify_version(published.path)
    manifest = verified.manifest
    assert (verified.name, verified.version) == ("demo", 1)
    assert manifest["schema_version"] == 1 and manifest["model_config"] == {"d_model": 8}
    assert manifest["tensors"] == {
        "codes": {"dtype": "I64", "shape": [2, 3]},
        "encoder.weight": {"dtype": "F32", "shape": [4, 3]},
    }
    assert set(manifest["files"]) == {"model.safetensors", "catalog.json"}
    assert read_verified_file(verified, "model.safetensors") == weights()
    assert list_models(tmp_path) == ["demo"]


def test_versions_number_one_two_three(tmp_path: Path) -> None:
    paths = [publish(tmp_path, scale=float(i)) for i in range(3)]
    assert [p.name for p in paths] == ["1", "2", "3"]
    assert list_versions(tmp_path, "demo") == [1, 2, 3]
    newest, rejected = load_newest_valid(tmp_path, "demo")
    assert newest.version == 3 and rejected == []
    pinned, _ = load_newest_valid(tmp_path, "demo", pin=2)
    assert pinned.version == 2


def test_flipped_byte_refused_older_still_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    publish(tmp_path, 1.0)
    bad = publish(tmp_path, 2.0)
    flip_byte(bad / "model.safetensors")
    with pytest.raises(CorruptVersionError) as info:
        verify_version(bad)
    assert info.value.path == bad and "sha256" in info.value.reason
    with caplog.at_level(logging.WARNING, logger="model_store"):
        chosen, rejected = load_newest_valid(tmp_path, "demo")
    assert chosen.version == 1
    assert [(r.version, r.path) for r in rejected] == [(2, bad)]
    logged = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "model_store"]
    assert logged and logged[-1]["event"] == "model_version_rejected" and logged[-1]["version"] == 2
    with pytest.raises(NoValidVersionError):
        load_newest_valid(tmp_path, "demo", pin=2)  # a pinned bad version does not silently fall back


def test_flipped_byte_in_catalog_refused(tmp_path: Path) -> None:
    path = publish(tmp_path)
    flip_byte(path / "catalog.json", offset=2)
    with pytest.raises(CorruptVersionError, match="catalog.json"):
        verify_version(path)


def test_leftover_temp_dir_is_invisible(tmp_path: Path) -> None:
    publish(tmp_path)
    leftover = tmp_path / "demo" / ".tmp-crashed"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(weights(9.0)[:20])
    (tmp_path / "demo" / "notes").mkdir()
    assert list_versions(tmp_path, "demo") == [1]
    assert load_newest_valid(tmp_path, "demo")[0].version == 1
    assert publish(tmp_path).name == "2"  # numbering ignores the temp dir too


def test_version_missing_files_is_never_loaded(tmp_path: Path) -> None:
    publish(tmp_path, 1.0)
    half = publish(tmp_path, 2.0)
    (half / "catalog.json").unlink()
    chosen, rejected = load_newest_valid(tmp_path, "demo")
    assert chosen.version == 1 and "catalog.json missing" in rejected[0].reason
    (half / "manifest.json").unlink()
    with pytest.raises(CorruptVersionError, match="manifest.json missing"):
        verify_version(half)


def test_shape_mismatch_between_manifest_and_header_refused(tmp_path: Path) -> None:
    path = publish(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["tensors"]["encoder.weight"]["shape"] = [3, 4]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptVersionError, match="encoder.weight"):
        verify_version(path)


def test_header_inconsistent_with_data_refused(tmp_path: Path) -> None:
    """A header that promises more bytes than the file holds is refused even with matching hashes."""
    good = weights()
    length = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + length])
    header["encoder.weight"]["shape"] = [40, 3]
    raw = json.dumps(header).encode()
    bad = len(raw).to_bytes(8, "little") + raw + good[8 + length :]
    with pytest.raises(ValueError, match="safetensors"):
        publish_version(tmp_path, "demo", {"model.safetensors": bad}, {})


def test_unlisted_file_refused(tmp_path: Path) -> None:
    path = publish(tmp_path)
    (path / "extra.bin").write_bytes(b"x")
    with pytest.raises(CorruptVersionError, match="extra.bin"):
        verify_version(path)


def test_no_valid_version_names_the_model(tmp_path: Path) -> None:
    with pytest.raises(NoValidVersionError, match="no published versions"):
        load_newest_valid(tmp_path, "demo")
    flip_byte(publish(tmp_path) / "model.safetensors")
    with pytest.raises(NoValidVersionError) as info:
        load_newest_valid(tmp_path, "demo")
    assert info.value.path == tmp_path / "demo" and len(info.value.rejections) == 1


def test_publish_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        publish_version(tmp_path, "../escape", {"model.safetensors": weights()}, {})
    with pytest.raises(ValueError):
        publish_version(tmp_path, "demo", {"catalog.json": b"{}"}, {})
    with pytest.raises(ValueError):
        publish_version(tmp_path, "demo", {"model.safetensors": weights()}, {"version": 7})
    with pytest.raises(ValueError):
        publish_version(tmp_path, "demo", {"model.safetensors": weights()}, {"metrics": {"r": float("nan")}})
    assert list_versions(tmp_path, "demo") == []
    assert list((tmp_path / "demo").glob(".tmp-*")) == []  # a refused publish leaves nothing behind


def test_concurrent_publishers_never_clobber(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            publish(tmp_path, scale=float(i))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert list_versions(tmp_path, "demo") == list(range(1, 9))
    manifests = [json.loads((tmp_path / "demo" / str(v) / "manifest.json").read_text()) for v in range(1, 9)]
    scales = sorted(m["metrics"]["recall@10"] for m in manifests)
    assert scales == [0.5 * i for i in range(8)]
    assert all(verify_version(tmp_path / "demo" / str(v)) for v in range(1, 9))

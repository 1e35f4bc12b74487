"""Model store: atomic publish, verification and newest-valid selection."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from model_store import (
    CorruptVersionError,
    HeaderError,
    NoValidVersionError,
    VerifiedVersion,
    list_models,
    list_versions,
    load_newest_valid,
    parse_header,
    publish_version,
    read_verified_file,
    select_version,
    verify_version,
    version_fingerprint,
)
from model_store.store import MAX_MANIFEST_BYTES


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


# ---- issue 12: nothing about a version escapes as an exception, nothing outside it is read --------------


def _nested(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode()


def test_deeply_nested_manifest_is_refused_and_the_older_version_loads(tmp_path: Path) -> None:
    publish(tmp_path, 1.0)
    bad = publish(tmp_path, 2.0)
    (bad / "manifest.json").write_bytes(b'{"files": ' + _nested(200_000) + b"}")
    with pytest.raises(CorruptVersionError, match="nested too deeply"):
        verify_version(bad)
    chosen, rejected = load_newest_valid(tmp_path, "demo")
    assert chosen.version == 1 and [r.version for r in rejected] == [2]


def test_oversized_manifest_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = publish(tmp_path)
    with (path / "manifest.json").open("ab") as handle:
        handle.truncate(MAX_MANIFEST_BYTES + 1)
    with pytest.raises(CorruptVersionError, match="more than"):
        verify_version(path)


def test_deeply_nested_safetensors_header_is_a_header_error() -> None:
    raw = b'{"a": ' + _nested(200_000) + b"}"
    with pytest.raises(HeaderError, match="nested too deeply"):
        parse_header(len(raw).to_bytes(8, "little") + raw, 8 + len(raw))


def _republish_with_link(tmp_path: Path, store: Path, fname: str, target: Path) -> Path:
    """Version 2 = a copy of version 1 whose `fname` is a symlink to `target` (same bytes, same sha256)."""
    src, dst = store / "demo" / "1", store / "demo" / "2"
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["version"] = 2
    (dst / "manifest.json").write_text(json.dumps(manifest))
    (dst / fname).unlink()
    os.symlink(target, dst / fname)
    return dst


def test_catalog_symlinked_out_of_the_store_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    publish(store)
    outside = tmp_path / "catalog.json"
    shutil.copy(store / "demo" / "1" / "catalog.json", outside)
    bad = _republish_with_link(tmp_path, store, "catalog.json", outside)
    with pytest.raises(CorruptVersionError, match="catalog.json resolves outside the version directory"):
        verify_version(bad)
    assert load_newest_valid(store, "demo")[0].version == 1


def test_weights_symlinked_into_another_version_are_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    publish(store)
    bad = _republish_with_link(tmp_path, store, "model.safetensors", Path("..") / "1" / "model.safetensors")
    with pytest.raises(CorruptVersionError, match="model.safetensors resolves outside"):
        verify_version(bad)
    chosen, rejected = load_newest_valid(store, "demo")
    assert chosen.version == 1 and "outside the version directory" in rejected[0].reason


def test_fifo_in_place_of_a_file_is_refused_without_blocking(tmp_path: Path) -> None:
    path = publish(tmp_path)
    (path / "catalog.json").unlink()
    os.mkfifo(path / "catalog.json")
    with pytest.raises(CorruptVersionError, match="not a regular file"):
        verify_version(path)  # and it does not block on the FIFO


def test_symlinked_version_directory_is_refused(tmp_path: Path) -> None:
    publish(tmp_path)
    os.symlink(tmp_path / "demo" / "1", tmp_path / "demo" / "2")
    chosen, rejected = load_newest_valid(tmp_path, "demo")
    assert chosen.version == 1 and "symlink" in rejected[0].reason


def test_file_replaced_after_verification_is_read_no_further_than_its_size(tmp_path: Path) -> None:
    verified = verify_version(publish(tmp_path))
    (verified.path / "catalog.json").write_bytes(b"x" * 10_000_000)
    with pytest.raises(CorruptVersionError, match="changed after verification"):
        read_verified_file(verified, "catalog.json")


def test_pinned_version_that_does_not_exist_is_not_a_rejection(tmp_path: Path) -> None:
    publish(tmp_path)
    with pytest.raises(NoValidVersionError, match="pinned version 5 does not exist") as info:
        load_newest_valid(tmp_path, "demo", pin=5)
    assert info.value.rejections == []


def test_any_exception_in_prepare_refuses_that_version_only(tmp_path: Path) -> None:
    publish(tmp_path, 1.0)
    publish(tmp_path, 2.0)
    publish(tmp_path, 3.0)
    failures: dict[int, BaseException] = {3: RecursionError("deep"), 2: MemoryError()}

    def prepare(verified: VerifiedVersion) -> int:
        if verified.version in failures:
            raise failures[verified.version]
        return verified.version

    selected = select_version(tmp_path, "demo", prepare)
    assert selected.value == 1
    assert [(r.version, r.reason) for r in selected.rejections] == [
        (3, "nested too deeply to parse (RecursionError)"),
        (2, "MemoryError: "),
    ]


def test_fingerprint_follows_the_files(tmp_path: Path) -> None:
    path = publish(tmp_path)
    first = version_fingerprint(path)
    assert version_fingerprint(path) == first
    (path / "catalog.json").write_bytes((path / "catalog.json").read_bytes())
    assert version_fingerprint(path) != first
    assert version_fingerprint(tmp_path / "demo" / "9")  # a missing version still has one (never raises)

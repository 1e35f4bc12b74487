"""Unit tests of the service's small parts: settings and flags, capture writer, stubs, feature stores."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from onerec_proto import generate as proto_gen
from service.capture import CaptureWriter
from service.cli import settings_from_args
from service.features import EmbeddedFeatureStore, FeatureStoreError, RedisFeatureStore, history_key
from service.metrics import ServiceMetrics
from service.settings import Settings
from tests.plugins.servers import RedisServer


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from service.cli import register

    monkeypatch.setenv("ONEREC_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("ONEREC_REDIS_URL", "redis://env:6379/0")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--redis-url", "redis://flag:6379/0", "--http-port", "9001"])
    settings = settings_from_args(args)
    assert settings.max_batch_size == 7  # from the environment
    assert settings.redis_url == "redis://flag:6379/0"  # the flag wins
    assert settings.http_port == 9001
    assert Settings().admin_token is None


def test_request_history_limit_reads_its_first_env_name_and_its_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from service.cli import register

    monkeypatch.setenv("ONEREC_MAX_HISTORY", "77")  # the setting's first name (before history_window existed)
    assert Settings().max_request_history == 77
    monkeypatch.setenv("ONEREC_MAX_REQUEST_HISTORY", "88")
    assert Settings().max_request_history == 88  # the current name wins
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--max-request-history", "99"])
    assert settings_from_args(args).max_request_history == 99


def test_kernel_backend_setting_takes_the_spellings_kernels_used_to_read(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().kernels == "auto"
    monkeypatch.setenv("ONEREC_KERNELS", " Triton ")
    assert Settings().kernels == "triton"
    monkeypatch.setenv("ONEREC_KERNELS", "")
    assert Settings().kernels == "auto"
    monkeypatch.setenv("ONEREC_KERNELS", "cuda")
    with pytest.raises(ValueError, match="kernels"):
        Settings()


def test_inconsistent_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="default_beam_width"):
        Settings(default_beam_width=64, max_beam_width=32)


def _read_records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_capture_samples_writes_jsonl_and_rotates(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    metrics = ServiceMetrics(process_collectors=False)
    writer = CaptureWriter(path, rate=1.0, max_bytes=2048, metrics=metrics)
    for i in range(60):
        assert writer.offer({"user_id": f"u{i}", "num_items": 10, "mode": "session", "beam_width": 32})
        time.sleep(0.001)
    writer.close()
    current, rotated = _read_records(path), _read_records(tmp_path / "trace.jsonl.1")
    assert rotated, "the file never rotated at its size cap"
    assert path.stat().st_size <= 2048
    # rotation keeps one old file: the newest records are all there, in order, with growing t
    kept = rotated + current
    users = [int(str(r["user_id"])[1:]) for r in kept]
    assert users == sorted(users) and users[-1] == 59
    times = [float(r["t"]) for r in kept]  # type: ignore[arg-type]
    assert times == sorted(times) and times[0] >= 0
    assert metrics.capture_records.labels("written")._value.get() == 60


def test_capture_rate_samples_a_share(tmp_path: Path) -> None:
    writer = CaptureWriter(tmp_path / "t.jsonl", rate=0.25, max_bytes=1 << 20, seed=7)
    taken = sum(writer.offer({"user_id": "u"}) for _ in range(2000))
    writer.close()
    assert 400 < taken < 600
    assert len(_read_records(tmp_path / "t.jsonl")) == taken


def test_capture_drops_instead_of_blocking_when_queue_full(tmp_path: Path) -> None:
    metrics = ServiceMetrics(process_collectors=False)
    writer = CaptureWriter(tmp_path / "t.jsonl", rate=1.0, max_bytes=1 << 20, metrics=metrics, queue_size=1)
    started = time.perf_counter()
    results = [writer.offer({"user_id": "u", "pad": "x" * 1000}) for _ in range(5000)]
    elapsed = time.perf_counter() - started
    writer.close()
    assert elapsed < 2.0
    dropped = metrics.capture_records.labels("dropped")._value.get()
    assert dropped == results.count(False) and dropped > 0


def test_stubs_regenerate_when_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "_generated"
    monkeypatch.setattr(proto_gen, "OUT_DIR", out)
    monkeypatch.setattr(proto_gen, "STAMP_FILE", out / "STAMP")
    assert not proto_gen.stubs_current()
    proto_gen.ensure_stubs()
    assert proto_gen.stubs_current()
    grpc_module = (out / "recommender_pb2_grpc.py").read_text()
    assert "from . import recommender_pb2" in grpc_module  # never the project's `onerec` package
    (out / "STAMP").write_text("stale\n")
    assert not proto_gen.stubs_current()
    proto_gen.ensure_stubs()
    assert proto_gen.stubs_current()


def test_check_reports_missing_stubs_without_making_them(tmp_path: Path) -> None:
    """`python -m onerec_proto.generate --check` imports the package first: that must not regenerate."""
    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root / "proto", tmp_path / "proto")
    shutil.copytree(root / "onerec_proto", tmp_path / "onerec_proto", ignore=shutil.ignore_patterns("_generated"))
    check = subprocess.run(
        [sys.executable, "-m", "onerec_proto.generate", "--check"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 1, check.stdout + check.stderr
    assert "missing or stale" in check.stdout
    assert not (tmp_path / "onerec_proto" / "_generated").exists()


def test_checked_out_stubs_match_the_proto() -> None:
    from onerec_proto import pb2

    assert proto_gen.stubs_current()
    fields = {f.name for f in pb2.RecommendRequest.DESCRIPTOR.fields}
    from service.schemas import RecommendBody

    assert fields == set(RecommendBody.model_fields)  # the gRPC request mirrors the HTTP body
    item_fields = {f.name for f in pb2.Item.DESCRIPTOR.fields}
    assert item_fields == {"item_id", "score", "semantic_id"}


def test_embedded_store_trims_and_reports_misses() -> None:
    async def scenario() -> tuple[list[str] | None, list[str], list[str] | None]:
        store = EmbeddedFeatureStore(ServiceMetrics(process_collectors=False))
        miss = await store.get_history("nobody", 5)
        stored = await store.append_events("u", [str(i) for i in range(8)], limit=5)
        got = await store.get_history("u", 3)
        return miss, stored, got

    miss, stored, got = asyncio.run(scenario())
    assert miss is None
    assert stored == ["3", "4", "5", "6", "7"]
    assert got == ["5", "6", "7"]


def test_redis_store_layout_timeouts_and_recovery(tmp_path: Path) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server binary not found: apt-get install -y redis-server", pytrace=False)
    redis_server = RedisServer(binary, tmp_path)
    redis_server.start()

    async def scenario() -> None:
        import redis.asyncio as aioredis

        store = RedisFeatureStore(redis_server.url, timeout_s=0.05, retry_after_s=0.1)
        assert await store.append_events("u1", ["a", "b", "c"], limit=2) == ["b", "c"]
        raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        assert await raw.lrange(history_key("u1"), 0, -1) == ["b", "c"]
        assert await store.load_histories({"u2": ["x", "y", "z"]}, limit=2) == 1
        assert await store.get_history("u2", 10) == ["y", "z"]
        await raw.aclose()
        redis_server.kill()
        started = time.perf_counter()
        with pytest.raises(FeatureStoreError):
            await store.get_history("u1", 10)
        with pytest.raises(FeatureStoreError) as skipped:
            await store.get_history("u1", 10)
        assert skipped.value.kind == "skipped"
        assert time.perf_counter() - started < 1.0  # bounded by the timeout, never hangs
        redis_server.start()
        await asyncio.sleep(0.15)
        assert await store.get_history("u1", 10) is None  # restarted empty, reachable again
        await store.close()

    try:
        asyncio.run(scenario())
    finally:
        redis_server.stop()

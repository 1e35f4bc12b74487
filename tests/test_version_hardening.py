"""A bad model version never takes the service down (issue 12, items 1-4), fuzzed and end to end.

Most tests use a tiny model built in milliseconds (no training: the weights only have to fit the config)
and drive ``ModelManager`` with a fake engine pool that builds and warms the version in-process, as an
engine would. The last test starts a real ``onerec serve`` on the demo store.

How allocation is bounded, honestly: ``TensorGuard`` is a ``TorchDispatchMode``, so every tensor any
aten op creates in this thread (parameters, ``torch.empty``, ``randn``, safetensors' tensors, trie and
search buffers) passes through it; it records the largest storage and raises past the limit, right
after the (lazy, untouched) allocation and before anything fills it. ``tracemalloc`` bounds the
Python side (JSON parsing, bytes read, numpy). The front end's thread work is run inline so both see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from model_store import (
    NoValidVersionError,
    RefusalMemory,
    parse_header,
    publish_version,
    select_version,
    tensor_specs,
)
from onerec.bundle import (
    Catalog,
    check_model_config,
    expected_tensors,
    load_bundle,
    load_newest_bundle,
    select_version_info,
)
from onerec.model import ModelConfig, OneRecModel
from service.engine.client import EngineRefused, ServingModel
from service.errors import Conflict
from service.metrics import ServiceMetrics
from service.models import ENGINE_ATTEMPTS, ModelManager
from service.settings import Settings
from tests.plugins.servers import ServiceLauncher, copy_store, metric, scrape

NAME = "tiny"
TINY = ModelConfig(
    level_sizes=[4, 3],
    session_items=2,
    history_window=4,
    d_model=8,
    n_heads=2,
    n_encoder_layers=1,
    n_decoder_layers=1,
    d_ff=8,
    n_experts=2,
    experts_top_k=1,
    user_buckets=4,
    dropout=0.0,
)
TENSOR_LIMIT = 1 << 20  # the tiny model's largest tensor is well under 1 kB; 10**7 user buckets is 320 MB
PYTHON_LIMIT = 32 << 20  # tracemalloc peak while selecting, building and warming one store


# ---- a tiny valid model and crafted versions beside it ---------------------------------------------


def _tiny_files() -> tuple[dict[str, bytes], dict[str, Any]]:
    torch.manual_seed(0)
    model = OneRecModel(TINY)
    codes = np.array([[i % 4, i // 4] for i in range(12)], dtype=np.int64)
    catalog = Catalog.from_codes([f"item-{i}" for i in range(12)], codes, TINY.level_sizes, list(range(12)))
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    files = {"model.safetensors": save(state), "catalog.json": catalog.to_json()}
    return files, {"model_config": TINY.to_dict(), "catalog_size": 12}


FILES, META = _tiny_files()


def publish_tiny(store: Path) -> int:
    """Publish the tiny model as the next version, the normal way."""
    return publish_version(store, NAME, dict(FILES), dict(META)).version


def _manifest_for(version: int, files: dict[str, bytes]) -> dict[str, Any]:
    """The manifest a publisher would write for these bytes (tensors from the header when it parses)."""
    weights = files.get("model.safetensors", b"")
    try:
        tensors = tensor_specs(parse_header(weights, len(weights)))
    except ValueError:
        tensors = tensor_specs(parse_header(FILES["model.safetensors"], len(FILES["model.safetensors"])))
    return {
        "schema_version": 1,
        "name": NAME,
        "version": version,
        "created": "2026-12-02T00:00:00+00:00",
        "files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for n, b in sorted(files.items())},
        "tensors": tensors,
        **META,
        "model_config": TINY.to_dict(),
    }


def write_version(
    store: Path,
    version: int,
    files: dict[str, bytes] | None = None,
    edit: Callable[[dict[str, Any]], None] | None = None,
    manifest_bytes: bytes | None = None,
    links: dict[str, Path] | None = None,
) -> Path:
    """Write version `version` by hand, as an attacker or an unlucky operator might.

    The manifest records checksums of whatever `files` hold, so only the checks after the checksums
    can refuse it; `edit` changes the manifest after that; `links` turns files into symlinks (the
    manifest still records the linked bytes, so a store that follows links would accept them).
    """
    files = dict(FILES if files is None else files)
    path = store / NAME / str(version)
    path.mkdir(parents=True)
    manifest = _manifest_for(version, files)
    if edit is not None:
        edit(manifest)
    for name, data in files.items():
        if links and name in links:
            os.symlink(links[name], path / name)
        else:
            (path / name).write_bytes(data)
    raw = manifest_bytes if manifest_bytes is not None else json.dumps(manifest).encode()
    (path / "manifest.json").write_bytes(raw)
    return path


def _weights_with(change: Callable[[dict[str, torch.Tensor]], None]) -> bytes:
    from safetensors.torch import load

    state = load(FILES["model.safetensors"])
    change(state)
    return save(state)


def nested(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode()


def touch_files(path: Path) -> None:
    """Rewrite a version's files with the same bytes: the content is unchanged, the fingerprint is not."""
    time.sleep(0.01)  # mtimes in ns, but some filesystems round
    for file in path.iterdir():
        file.write_bytes(file.read_bytes())


# ---- the engine pool, faked: it builds and warms the version in this process ------------------------


class FakeEngines:
    """What ``ModelManager`` needs of ``EnginePool``; ``load`` does what an engine's load thread does."""

    def __init__(self, refuse: set[int] | None = None) -> None:
        self.slots = [object()]
        self.refuse = set(refuse or ())
        self.calls: list[int] = []
        self.model: ServingModel | None = None

    def ready_engines(self) -> int:
        return 1

    async def load(self, model: ServingModel, timeout_s: float = 600.0) -> None:
        self.calls.append(model.version)
        if model.version in self.refuse:
            raise EngineRefused(f"engine 0: warm-up of version {model.version} failed")
        try:
            load_bundle(model.path).warmup()
        except Exception as exc:  # as service/engine/scheduler.py does
            raise EngineRefused(f"engine 0: {type(exc).__name__}: {exc}") from None
        self.model = model


def make_manager(store: Path, engines: FakeEngines | None = None) -> ModelManager:
    settings = Settings(model_store=store, model_name=NAME, poll_interval_s=0)
    return ModelManager(settings, ServiceMetrics(process_collectors=False), engines or FakeEngines())  # type: ignore[arg-type]


def rejected_total(manager: ModelManager) -> float:
    return manager.metrics.registry.get_sample_value("onerec_model_versions_rejected_total") or 0.0


async def _inline(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    return func(*args, **kwargs)


def run(coro: Any) -> Any:
    """Run a manager coroutine with its thread work inline (so TensorGuard sees every allocation)."""
    with mock.patch.object(asyncio, "to_thread", _inline):
        return asyncio.run(coro)


class AllocationTooLarge(Exception):
    pass


class TensorGuard(TorchDispatchMode):
    """Records the largest tensor storage created by any aten op; raises past `limit` (see module doc)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.largest = 0
        self.op = ""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                size = leaf.untyped_storage().nbytes()
                if size > self.largest:
                    self.largest, self.op = size, str(func)
                if size > self.limit:
                    raise AllocationTooLarge(f"{func} made a {size}-byte tensor")
        return out


_warmed: list[bool] = []


def _warm_once() -> None:
    """First uses of the dispatch mode, the generator and the manager import modules (tens of MB, seconds
    under tracemalloc): pay for that once, outside the measured region, so the bound measures loading only."""
    if not _warmed:
        with tempfile.TemporaryDirectory() as tmp, TensorGuard(TENSOR_LIMIT):  # the mode's first use imports too
            publish_tiny(Path(tmp))
            load_newest_bundle(Path(tmp), NAME)[0].warmup()
            run(make_manager(Path(tmp)).reload())
        _warmed.append(True)


@contextlib.contextmanager
def bounded() -> Iterator[TensorGuard]:
    """Track the largest tensor and the Python heap's peak; the caller asserts on both after the block."""
    _warm_once()
    guard = TensorGuard(TENSOR_LIMIT)
    tracemalloc.start()
    try:
        with guard:
            yield guard
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        guard.python_peak = peak  # type: ignore[attr-defined]


def assert_bounded(guard: TensorGuard) -> None:
    assert guard.largest <= TENSOR_LIMIT, f"largest tensor {guard.largest} bytes ({guard.op})"
    peak = guard.python_peak  # type: ignore[attr-defined]
    assert peak <= PYTHON_LIMIT, f"Python heap peaked at {peak} bytes"


# ---- item 1: any failure refuses the version, the next older valid one serves ------------------------


def test_version_whose_config_does_not_fit_its_weights_falls_back_at_start(tmp_path: Path) -> None:
    publish_tiny(tmp_path)
    write_version(tmp_path, 2, edit=lambda m: m["model_config"].update(d_model=16))
    engines = FakeEngines()
    manager = make_manager(tmp_path, engines)
    outcome = run(manager.reload())
    assert outcome.result == "loaded" and manager.current is not None and manager.current.version == 1
    assert [r["version"] for r in outcome.rejected] == [2]
    assert "does not fit the weights" in outcome.rejected[0]["reason"]
    assert engines.calls == [1]  # the front end refused it: no engine was asked to build it
    assert rejected_total(manager) == 1


def test_deeply_nested_manifest_falls_back(tmp_path: Path) -> None:
    publish_tiny(tmp_path)
    write_version(tmp_path, 2, manifest_bytes=b'{"a": ' + nested(200_000) + b"}")
    manager = make_manager(tmp_path)
    assert run(manager.reload()).result == "loaded"
    assert manager.current is not None and manager.current.version == 1


def test_engine_refusal_falls_back_and_is_not_retried_until_files_change(tmp_path: Path) -> None:
    publish_tiny(tmp_path)
    publish_tiny(tmp_path)
    engines = FakeEngines(refuse={2})
    manager = make_manager(tmp_path, engines)
    outcome = run(manager.reload())
    assert manager.current is not None and manager.current.version == 1, outcome
    assert engines.calls == [2, 1]
    assert "refused by the engines (1 of 3 tries)" in outcome.rejected[0]["reason"]
    assert rejected_total(manager) == 0  # could be transient: tried again on the next polls
    for _ in range(ENGINE_ATTEMPTS - 1):
        assert run(manager.poll_once()) is not None
    assert engines.calls == [2, 1, 2, 2] and rejected_total(manager) == 1
    for _ in range(3):  # from now on, polls and plain reloads neither re-verify nor rebuild it
        assert run(manager.poll_once()) is None
        assert run(manager.reload()).result == "unchanged"
    assert engines.calls == [2, 1, 2, 2]
    assert rejected_total(manager) == 1 and manager.current.version == 1
    engines.refuse.clear()
    touch_files(tmp_path / NAME / "2")  # an operator republished the files: worth another try
    assert run(manager.poll_once()) is not None
    assert manager.current.version == 2 and engines.calls == [2, 1, 2, 2, 2]


def test_transient_engine_failure_at_start_does_not_refuse_the_only_version(tmp_path: Path) -> None:
    """An engine restarting while the first version loads must not get that version remembered as bad."""
    publish_tiny(tmp_path)
    engines = FakeEngines(refuse={1})
    manager = make_manager(tmp_path, engines)
    for _ in range(ENGINE_ATTEMPTS + 1):
        assert run(manager.reload()).result == "refused" and manager.current is None
    engines.refuse.clear()  # the engine is back
    assert run(manager.reload()).result == "loaded"
    assert manager.current is not None and manager.current.version == 1
    assert rejected_total(manager) == 0


def test_remembered_refusal_is_not_verified_again(tmp_path: Path) -> None:
    publish_tiny(tmp_path)
    publish_tiny(tmp_path)
    memory, prepared = RefusalMemory(), []

    def prepare(verified: Any) -> int:
        prepared.append(verified.version)
        if verified.version == 2:
            raise ValueError("version 2: will not build")
        return int(verified.version)

    first = select_version(tmp_path, NAME, prepare, memory=memory)
    assert first.value == 1 and [(r.version, r.remembered) for r in first.rejections] == [(2, False)]
    again = select_version(tmp_path, NAME, prepare, memory=memory)
    assert again.value == 1 and [(r.version, r.remembered) for r in again.rejections] == [(2, True)]
    assert prepared == [2, 1, 1]
    touch_files(tmp_path / NAME / "2")
    select_version(tmp_path, NAME, prepare, memory=memory)
    assert prepared == [2, 1, 1, 2, 1]


# ---- item 2: the config is checked before anything is allocated -------------------------------------


def test_huge_user_buckets_refused_without_a_big_allocation(tmp_path: Path) -> None:
    publish_tiny(tmp_path)
    write_version(tmp_path, 2, edit=lambda m: m["model_config"].update(user_buckets=10**7))
    with bounded() as guard:
        bundle, rejected = load_newest_bundle(tmp_path, NAME)  # the engine's path: verify, check, build
        manager = make_manager(tmp_path)
        run(manager.reload())  # the front end's path
    assert bundle.version == 1 and [r.version for r in rejected] == [2]
    assert "user.weight" in rejected[0].reason
    assert manager.current is not None and manager.current.version == 1
    assert_bounded(guard)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("user_buckets", 10**9),
        ("d_model", 0),
        ("n_decoder_layers", 10**6),
        ("n_experts", -1),
        ("d_model", True),
        ("d_model", "8"),
        ("level_sizes", [4] * 100),
        ("level_sizes", [4, 0]),
        ("dropout", 1.5),
        ("n_heads", 3),
        ("experts_top_k", 3),
        ("candidate_sources", True),  # TINY has no scored candidates to split
        ("candidate_mass", True),
        ("candidate_transitions", True),
        ("candidate_directions", True),
        ("candidate_recency", 1.0),  # needs candidate_sources
        ("candidate_recency", float("nan")),
        ("candidate_decay", -1.0),
        ("candidate_backward", float("inf")),
    ],
)
def test_config_outside_sane_limits_is_refused(key: str, value: Any) -> None:
    raw = {**TINY.to_dict(), key: value}
    with pytest.raises(ValueError, match="version 7"):
        check_model_config(raw, 7)
    assert check_model_config(TINY.to_dict(), 7) == TINY


# ---- item 3: a refused pin is undone; a missing version is not a rejected one ------------------------


def test_refused_pin_is_undone_and_newer_versions_still_load(tmp_path: Path) -> None:
    publish_tiny(tmp_path)
    manager = make_manager(tmp_path)
    run(manager.reload())
    with pytest.raises(Conflict, match="version 5"):
        run(manager.admin_reload(5))
    assert manager.pinned is None and manager.describe()["pinned"] is None
    assert rejected_total(manager) == 0  # version 5 does not exist: nothing was rejected
    publish_tiny(tmp_path)
    assert run(manager.poll_once()) is not None
    assert manager.current is not None and manager.current.version == 2


def test_refused_pin_restores_the_previous_pin(tmp_path: Path) -> None:
    publish_tiny(tmp_path)
    write_version(tmp_path, 2, edit=lambda m: m["model_config"].update(d_model=16))
    publish_tiny(tmp_path)
    manager = make_manager(tmp_path)
    run(manager.admin_reload(1))
    assert manager.pinned == 1 and manager.current is not None and manager.current.version == 1
    with pytest.raises(Conflict, match="version 2"):
        run(manager.admin_reload(2))
    assert manager.pinned == 1 and manager.current.version == 1
    assert rejected_total(manager) == 1  # version 2 exists and is broken: that one counts


def test_pinning_a_missing_version_is_not_a_rejection(tmp_path: Path) -> None:
    publish_tiny(tmp_path)
    with pytest.raises(NoValidVersionError, match="does not exist") as info:
        select_version_info(tmp_path, NAME, pin=5)
    assert info.value.rejections == []


# ---- item 4: nothing outside the version directory is read --------------------------------------------


@pytest.mark.parametrize("target", ["outside", "other_version"])
def test_files_symlinked_out_of_the_version_are_refused(tmp_path: Path, target: str) -> None:
    store = tmp_path / "store"
    publish_tiny(store)
    if target == "outside":
        outside = tmp_path / "elsewhere.json"
        outside.write_bytes(FILES["catalog.json"])
        links = {"catalog.json": outside}
    else:
        links = {"model.safetensors": store / NAME / "1" / "model.safetensors"}
    write_version(store, 2, links=links)
    selected = select_version_info(store, NAME)
    assert selected.value.version == 1
    assert "outside the version directory" in selected.rejections[0].reason
    bundle, rejected = load_newest_bundle(store, NAME)
    assert bundle.version == 1 and [r.version for r in rejected] == [2]


# ---- the fuzz test ----------------------------------------------------------------------------------

SHAPE_KEYS = ["d_model", "user_buckets", "history_window", "session_items", "n_encoder_layers", "n_decoder_layers",
              "d_ff", "n_experts"]  # fmt: skip
ALL_KEYS = [*SHAPE_KEYS, "n_heads", "experts_top_k", "dropout", "level_sizes"]
WRONG_TYPES = st.sampled_from(["8", None, [8], {"a": 1}, 1.5, True, -1])


def _config_change() -> st.SearchStrategy[dict[str, Any]]:
    """A model_config edit that makes the version unservable (shape-changing value or wrong type)."""
    shape_change = st.sampled_from(SHAPE_KEYS).flatmap(
        lambda key: (
            st.integers(min_value=-3, max_value=10**7 if key == "user_buckets" else 10**5)
            .filter(lambda v, key=key: v != getattr(TINY, key))
            .map(lambda v, key=key: {key: v})
        )
    )
    levels = st.lists(st.integers(0, 10**6), min_size=0, max_size=20).filter(lambda v: v != TINY.level_sizes)
    return st.one_of(
        shape_change,
        st.builds(lambda k, v: {k: v}, st.sampled_from(ALL_KEYS), WRONG_TYPES),
        levels.map(lambda v: {"level_sizes": v}),
        st.just({"not_a_key": 1}),
    )


def _broken_version() -> st.SearchStrategy[tuple[str, Any]]:
    return st.one_of(
        st.tuples(st.just("config"), _config_change()),
        st.tuples(st.just("header"), st.sampled_from(["length", "not_json", "nested", "truncated", "reshaped"])),
        st.tuples(st.just("tensors"), st.sampled_from(["drop", "extra", "int_dtype"])),
        st.tuples(st.just("nesting"), st.tuples(st.sampled_from(["manifest", "catalog"]), st.integers(2_000, 100_000))),
        st.tuples(st.just("symlink"), st.sampled_from(["catalog_out", "weights_other_version", "version_dir"])),
        st.tuples(st.just("catalog"), st.sampled_from(["levels", "code_range", "popular", "duplicate", "ragged"])),
    )


def _header_variant(kind: str) -> bytes:
    good = FILES["model.safetensors"]
    length = int.from_bytes(good[:8], "little")
    header, body = json.loads(good[8 : 8 + length]), good[8 + length :]

    def pack(raw: bytes) -> bytes:
        return len(raw).to_bytes(8, "little") + raw + body

    if kind == "length":
        return (2**63).to_bytes(8, "little") + good[8:]
    if kind == "not_json":
        return pack(b"{" + b"x" * 10)
    if kind == "nested":
        return pack(b'{"a": ' + nested(50_000) + b"}")
    if kind == "truncated":
        return good[: len(good) // 2]
    header["user.weight"]["shape"] = header["user.weight"]["shape"][::-1]  # same bytes, other shape
    return pack(json.dumps(header).encode())


def _catalog_variant(kind: str) -> bytes:
    doc = json.loads(FILES["catalog.json"])
    if kind == "levels":
        doc["level_sizes"] = [4, 4]
    elif kind == "code_range":
        doc["codes"][0] = [9, 0]
    elif kind == "popular":
        doc["popular"] = [0, 99]
    elif kind == "duplicate":
        doc["item_ids"][1] = doc["item_ids"][0]
    else:
        doc["codes"][3] = [1]
    return json.dumps(doc).encode()


def craft(store: Path, version: int, spec: tuple[str, Any] | None, scratch: Path) -> None:
    """Write version `version`: a valid copy when `spec` is None, else broken the way it says."""
    if spec is None:
        write_version(store, version)
        return
    kind, detail = spec
    files = dict(FILES)
    if kind == "config":
        write_version(store, version, edit=lambda m: m["model_config"].update(detail))
    elif kind == "header":
        files["model.safetensors"] = _header_variant(detail)
        write_version(store, version, files)
    elif kind == "tensors":
        change: dict[str, Callable[[dict[str, torch.Tensor]], None]] = {
            "drop": lambda s: s.pop("user.weight"),
            "extra": lambda s: s.update(extra=torch.zeros(3)),
            "int_dtype": lambda s: s.update({"user.weight": s["user.weight"].to(torch.int32)}),
        }
        files["model.safetensors"] = _weights_with(change[detail])
        write_version(store, version, files)
    elif kind == "nesting":
        where, depth = detail
        if where == "manifest":
            write_version(store, version, manifest_bytes=b'{"a": ' + nested(depth) + b"}")
        else:
            files["catalog.json"] = nested(depth)
            write_version(store, version, files)
    elif kind == "symlink":
        if detail == "catalog_out":
            outside = scratch / f"catalog-{version}.json"
            outside.write_bytes(FILES["catalog.json"])
            write_version(store, version, links={"catalog.json": outside})
        elif detail == "weights_other_version":
            write_version(store, version, links={"model.safetensors": store / NAME / "1" / "model.safetensors"})
        else:
            os.symlink(store / NAME / "1", store / NAME / str(version))
    else:
        files["catalog.json"] = _catalog_variant(detail)
        write_version(store, version, files)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
@given(st.lists(st.one_of(st.none(), _broken_version()), min_size=1, max_size=3))
def test_fuzz_newest_valid_version_serves_and_allocation_is_bounded(specs: list[tuple[str, Any] | None]) -> None:
    """Versions 2.. are crafted (None = a valid copy) beside a valid version 1: the newest valid one serves."""
    expected = max([1] + [v for v, spec in enumerate(specs, start=2) if spec is None])
    with tempfile.TemporaryDirectory() as tmp:
        store, scratch = Path(tmp) / "store", Path(tmp) / "scratch"
        scratch.mkdir()
        publish_tiny(store)
        for version, spec in enumerate(specs, start=2):
            craft(store, version, spec, scratch)
        engines = FakeEngines()
        with bounded() as guard:
            assert select_version_info(store, NAME).value.version == expected
            bundle, _ = load_newest_bundle(store, NAME)
            assert bundle.version == expected
            manager = make_manager(store, engines)
            outcome = run(manager.reload())
        assert_bounded(guard)
        assert manager.current is not None and manager.current.version == expected, outcome
        broken = {v for v, spec in enumerate(specs, start=2) if spec is not None and v > expected}
        assert {r["version"] for r in outcome.rejected} == broken
        assert rejected_total(manager) == len(broken)
        calls = list(engines.calls)
        assert run(manager.poll_once()) is None  # refused versions are not tried again
        assert engines.calls == calls and rejected_total(manager) == len(broken)


# ---- end to end: a real `onerec serve` becomes ready on the older version ---------------------------


def test_service_becomes_ready_on_v1_beside_a_broken_v2(
    service_launcher: ServiceLauncher, demo_store: Path, tmp_path: Path
) -> None:
    store = copy_store(demo_store, tmp_path / "store")
    shutil.copytree(store / "demo" / "1", store / "demo" / "2")
    manifest = json.loads((store / "demo" / "2" / "manifest.json").read_text())
    manifest["version"] = 2
    manifest["model_config"]["d_model"] = manifest["model_config"]["d_model"] * 2
    (store / "demo" / "2" / "manifest.json").write_text(json.dumps(manifest))
    handle = service_launcher.start(store, env={"ONEREC_POLL_INTERVAL_S": "0.2"})
    try:
        models = httpx.get(f"{handle.http_url}/v1/models", timeout=10).json()
        assert models["version"] == "1"
        time.sleep(1.0)  # several polls: version 2 is refused once, not retried
        samples = scrape(handle.http_url)
        assert metric(samples, "onerec_model_versions_rejected_total") == 1
        answer = httpx.post(f"{handle.http_url}/v1/recommend", json={"user_id": "u", "history": ["1"]}, timeout=60)
        assert answer.status_code == 200 and answer.json()["model"]["version"] == "1"
        refused = [line for line in handle.log_text().splitlines() if "model version refused" in line]
        assert len(refused) == 1 and '"version":2' in refused[0].replace(" ", ""), refused
        assert "does not fit the weights" in refused[0]
    finally:
        service_launcher.stop(handle)


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        ModelConfig(),
        ModelConfig(level_sizes=[5, 7, 3], session_items=3, n_encoder_layers=0, n_decoder_layers=3, d_ff=16,
                    n_experts=3, d_model=12, n_heads=3, user_buckets=9, history_window=7),
        ModelConfig(level_sizes=[5, 7], catalogue_items=11, candidate_tokens=4, embedding_dropout=0.3),
        ModelConfig(level_sizes=[5, 7], catalogue_items=9, candidate_tokens=2, candidate_scores=True,
                    tie_code_embeddings=True, copy_head=True),
        ModelConfig(level_sizes=[5, 7], catalogue_items=9, candidate_tokens=2, candidate_scores=True,
                    candidate_sources=True),
        ModelConfig(level_sizes=[5, 7], catalogue_items=9, candidate_tokens=2, candidate_scores=True,
                    candidate_sources=True, candidate_mass=True),
        ModelConfig(level_sizes=[5, 7], catalogue_items=9, candidate_tokens=2, candidate_scores=True,
                    candidate_sources=True, candidate_transitions=True),
        ModelConfig(level_sizes=[5, 7], catalogue_items=9, candidate_tokens=2, candidate_scores=True,
                    candidate_sources=True, candidate_directions=True),
        ModelConfig(level_sizes=[5, 7], catalogue_items=9, candidate_tokens=2, candidate_scores=True,
                    candidate_sources=True, candidate_directions=True, candidate_recency=3.0),
        ModelConfig(level_sizes=[5, 7], catalogue_items=9, candidate_tokens=2, candidate_scores=True,
                    tie_code_embeddings=True, copy_head=True, item_vectors=True),
        ModelConfig(level_sizes=[5, 7], catalogue_items=9, candidate_tokens=2, candidate_scores=True,
                    tie_code_embeddings=True, copy_head=True, head_bias=True, node_bias=True),
    ],
)  # fmt: skip
def test_expected_tensors_follow_the_model(config: ModelConfig) -> None:
    """The computed shapes the config check uses must be exactly those of the model's state dict."""
    actual = {name: list(t.shape) for name, t in OneRecModel(config).state_dict().items()}
    assert expected_tensors(config) == actual

"""The pure logic of the serving benchmark that the HF batched alternative and the CPU split rest on.

No server is started: the grouping, the queue (with a fake model), the per-process CPU split (on a
fake /proc and on this process), and, when transformers is installed, a tiny random HF model that
must answer the same in a padded batch as alone, each batch row under its own bans.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from benchmarks.hf_baseline import HFRecommender, StaticBatcher, effective_beams, take_batch
from benchmarks.process_cpu import CLOCK_TICK, CpuMonitor, cpu_split, process_tree_cpu
from benchmarks.server_metrics import batch_histogram_delta
from benchmarks.serving import compare, saturation_cores, table
from benchmarks.workload import Row

# ---- grouping ------------------------------------------------------------------------------------


def shape_of(request: tuple[str, str, int]) -> tuple[str, int]:
    return request[1], request[2]


def take(waiting: list[tuple[str, str, int]], max_requests: int = 16, max_rows: int = 2048):
    return take_batch(waiting, shape_of, lambda r: r[2], max_requests, max_rows)


def test_a_batch_is_the_oldest_requests_group_in_arrival_order() -> None:
    waiting = [("a", "session", 32), ("b", "items", 32), ("c", "session", 32), ("d", "session", 128),
               ("e", "session", 32), ("f", "items", 32)]  # fmt: skip
    batch, rest = take(waiting)
    assert [r[0] for r in batch] == ["a", "c", "e"]
    assert [r[0] for r in rest] == ["b", "d", "f"]
    batch, rest = take(rest)
    assert [r[0] for r in batch] == ["b", "f"] and [r[0] for r in rest] == ["d"]


def test_a_batch_stops_at_the_request_and_row_limits_without_overtaking() -> None:
    waiting = [(str(i), "items", 128) for i in range(6)]
    batch, rest = take(waiting, max_requests=4)
    assert [r[0] for r in batch] == ["0", "1", "2", "3"] and [r[0] for r in rest] == ["4", "5"]
    batch, rest = take(waiting, max_rows=300)  # 2 x 128 fit, a third would not
    assert [r[0] for r in batch] == ["0", "1"] and [r[0] for r in rest] == ["2", "3", "4", "5"]
    mixed = [("big", "items", 256), ("small", "items", 32)]
    batch, rest = take_batch(mixed, lambda r: r[1], lambda r: r[2], 16, 260)
    # "small" would fit the rows left, but it arrived after "big", which did not: it does not overtake.
    assert [r[0] for r in batch] == ["big"] and [r[0] for r in rest] == ["small"]


def test_the_oldest_request_goes_even_alone_over_the_row_budget() -> None:
    batch, rest = take([("huge", "session", 512), ("next", "session", 512)], max_rows=100)
    assert [r[0] for r in batch] == ["huge"] and [r[0] for r in rest] == ["next"]
    assert take([]) == ([], [])


def test_effective_beams_fill_num_items() -> None:
    assert effective_beams("items", 8, 10, 5) == 10
    assert effective_beams("items", 32, 10, 5) == 32
    assert effective_beams("session", 1, 10, 5) == 2
    assert effective_beams("session", 32, 10, 5) == 32


# ---- the queue of the batched server ----------------------------------------------------------------


def test_static_batcher_groups_what_queued_during_a_batch_and_answers_each_request() -> None:
    started = threading.Event()
    release = threading.Event()
    batches: list[list[str]] = []

    def run_batch(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        batches.append([b["id"] for b in bodies])
        if len(batches) == 1:
            started.set()
            assert release.wait(10)
        return [{"answer": b["id"]} for b in bodies]

    def shape(body: dict[str, Any]) -> tuple[str, int]:
        return body["mode"], body["beams"]

    async def scenario() -> list[dict[str, Any]]:
        with ThreadPoolExecutor(max_workers=1) as worker:
            batcher = StaticBatcher(run_batch, shape, 3, 2048, worker)
            driver = asyncio.create_task(batcher.run())
            first = asyncio.create_task(batcher.submit({"id": "first", "mode": "items", "beams": 32}))
            await asyncio.to_thread(started.wait, 10)
            later = [
                asyncio.create_task(batcher.submit({"id": name, "mode": mode, "beams": 32}))
                for name, mode in [("s1", "session"), ("i1", "items"), ("s2", "session"), ("s3", "session"),
                                   ("s4", "session")]
            ]  # fmt: skip
            await asyncio.sleep(0.05)  # all queued behind the running batch
            release.set()
            answers = await asyncio.wait_for(asyncio.gather(first, *later), 10)
            driver.cancel()
            assert dict(batcher.batch_sizes) == {1: 3, 3: 1}
            return answers

    answers = asyncio.run(scenario())
    assert [a["answer"] for a in answers] == ["first", "s1", "i1", "s2", "s3", "s4"]
    assert batches == [["first"], ["s1", "s2", "s3"], ["i1"], ["s4"]]


def test_static_batcher_fails_every_request_of_a_failed_batch_and_keeps_serving() -> None:
    def run_batch(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if any(b.get("boom") for b in bodies):
            raise RuntimeError("generate failed")
        return [{"ok": True} for _ in bodies]

    async def scenario() -> None:
        with ThreadPoolExecutor(max_workers=1) as worker:
            batcher = StaticBatcher(run_batch, lambda b: ("items", 8), 4, 2048, worker)
            driver = asyncio.create_task(batcher.run())
            with pytest.raises(RuntimeError, match="generate failed"):
                await asyncio.wait_for(batcher.submit({"boom": True}), 10)
            assert await asyncio.wait_for(batcher.submit({}), 10) == {"ok": True}
            driver.cancel()

    asyncio.run(scenario())


# ---- per-process CPU ------------------------------------------------------------------------------


def fake_proc(root: Path, pid: int, ticks: int, cmdline: list[str], children: dict[int, list[int]]) -> None:
    """/proc/<pid>/{stat,cmdline,task/<tid>/children}: utime = ticks, stime = ticks (so 2*ticks in all)."""
    base = root / str(pid)
    base.mkdir(parents=True)
    # The command name holds a space and a parenthesis, as real ones may.
    (base / "stat").write_text(f"{pid} (py thon) x) S 1 1 1 0 -1 0 0 0 0 0 {ticks} {ticks} 0 0 20 0 3 0 1 1 1\n")
    (base / "cmdline").write_bytes(b"\0".join(a.encode() for a in cmdline) + b"\0")
    for tid, kids in children.items():
        (base / "task" / str(tid)).mkdir(parents=True)
        (base / "task" / str(tid) / "children").write_text(" ".join(map(str, kids)) + (" " if kids else ""))


def test_process_tree_finds_engines_forked_by_any_thread_and_names_them(tmp_path: Path) -> None:
    tick = CLOCK_TICK
    engine = ["python", "-m", "service.engine.core", json.dumps({"index": 1, "generation": 3})]
    fake_proc(tmp_path, 100, tick, ["python", "-m", "service", "serve"], {100: [200], 101: [300]})
    fake_proc(tmp_path, 200, 2 * tick, engine[:3] + [json.dumps({"index": 0})], {200: []})
    fake_proc(tmp_path, 300, 3 * tick, engine, {300: [400]})
    fake_proc(tmp_path, 400, tick, ["sh", "-c", "true"], {400: []})
    tree = process_tree_cpu(100, tmp_path)
    assert tree == {
        100: ("front_end", pytest.approx(2.0)),
        200: ("engine0", pytest.approx(4.0)),
        300: ("engine1", pytest.approx(6.0)),
        400: ("child", pytest.approx(2.0)),
    }
    assert process_tree_cpu(999, tmp_path) == {}


def test_cpu_split_is_per_role_and_counts_a_restarted_engine_from_zero() -> None:
    before = {1: ("front_end", 10.0), 2: ("engine0", 50.0), 3: ("engine1", 5.0)}
    after = {1: ("front_end", 12.0), 2: ("engine0", 53.0), 4: ("engine1", 1.0), 5: ("child", 0.5), 6: ("child", 0.5)}
    split = cpu_split(before, after, wall_s=2.0)
    assert split == {"child": 0.5, "engine0": 1.5, "engine1": 0.5, "front_end": 1.0}


def test_process_tree_of_this_process_sees_a_busy_child() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 20\nwhile time.time() < end: pass"]
    )
    try:
        deadline = time.monotonic() + 10
        tree: dict[int, tuple[str, float]] = {}
        while time.monotonic() < deadline:
            tree = process_tree_cpu(os.getpid())
            if child.pid in tree and tree[child.pid][1] > 0.05:
                break
            time.sleep(0.05)
        assert tree[os.getpid()][0] == "front_end"
        assert tree[child.pid][0] == "child" and tree[child.pid][1] > 0.05
    finally:
        child.kill()
        child.wait(10)


def test_cpu_monitor_reports_the_split_and_the_load() -> None:
    monitor = CpuMonitor(os.getpid())
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    cores = monitor.cores()
    assert set(cores) >= {"machine", "server", "server_processes", "client", "other", "loadavg_1m"}
    assert cores["server_processes"]["front_end"] > 0
    assert cores["server"] == pytest.approx(sum(cores["server_processes"].values()), abs=0.02)


# ---- report ---------------------------------------------------------------------------------------


def measured(sustainable: float, saturated: float, p50: float = 50.0, server_cores: float | None = None) -> dict:
    curve = [{"offered_rps": saturated * 2, "saturation_step": True,
              "cpu_cores": {"server": server_cores, "server_processes": {"front_end": 0.5}}}]  # fmt: skip
    sweep = {"sustainable_rps": sustainable, "p99_at_sustainable_ms": 80.0, "saturated_throughput_rps": saturated,
             "curve": curve}  # fmt: skip
    return {"sweep": sweep, "single_request_ms": {"p50": p50, "p99": p50}, "budget_ms": 100.0}


def test_compare_reports_both_alternatives_with_their_goals() -> None:
    row = Row(device="cpu", mode="items", beam_width=32)
    out = compare(row, measured(100.0, 150.0, server_cores=1.7), measured(5.0, 6.0, p50=100.0), 4, 5,
                        hf_batched=measured(40.0, 45.0))  # fmt: skip
    assert out["rps_ratio"] == pytest.approx(20.0) and out["goal_10x_rps_met"]
    assert out["latency_ratio"] == pytest.approx(2.0)
    assert out["vs_hf_batched"]["rps_ratio"] == pytest.approx(2.5)
    assert not out["goal_3x_vs_batched_rps_met"]
    assert out["hf_batched"]["sustainable_rps"] == 40.0
    assert out["onerec"]["cpu_cores_at_saturation"]["server"] == 1.7
    cores = saturation_cores([out])
    assert cores["max_server_cores"] == 1.7 and cores["goal_met"]
    low = compare(row, measured(100.0, 150.0, server_cores=1.2), measured(5.0, 6.0), 4, 5)
    assert "hf_batched" not in low and not saturation_cores([low])["goal_met"]
    assert "x hfB" in table([out, low])


def test_batch_histogram_delta() -> None:
    delta = batch_histogram_delta({"1": 5, "4": 1}, {"1": 7, "4": 3, "16": 1})
    assert delta == {"by_size": {"1": 2, "4": 2, "16": 1}, "batches": 5, "mean_size": 5.2, "max_size": 16}
    assert batch_histogram_delta({"1": 1}, {"1": 1})["mean_size"] is None


# ---- HF generate, batched: same answers as alone, each row under its own bans ---------------------------


def tiny_spec() -> dict[str, Any]:
    """A random 40-item catalogue; encoder and decoder equally deep (transformers 5's T5 cache sizes the
    decoder's by the encoder's depth)."""
    level_sizes = [4, 4, 3]
    codes = [[a, b, c] for a in range(4) for b in range(4) for c in range(3)][:40]
    return {
        "name": "tiny",
        "version": 1,
        "model_config": {"level_sizes": level_sizes, "session_items": 3, "history_window": 8, "user_buckets": 16,
                         "d_model": 16, "n_heads": 2, "d_ff": 32, "n_encoder_layers": 2, "n_decoder_layers": 2},
        "item_ids": [f"i{k}" for k in range(len(codes))],
        "codes": codes,
        "live": [True] * len(codes),
    }  # fmt: skip


@pytest.fixture(scope="module")
def hf() -> Any:
    pytest.importorskip("transformers")
    import torch

    torch.set_num_threads(1)
    return HFRecommender(tiny_spec())


def item_ids(answer: dict[str, Any]) -> list[str]:
    return [item["item_id"] for item in answer["items"]]


@pytest.mark.parametrize("mode", ["items", "session"])
def test_hf_batch_gives_each_request_what_it_gets_alone(hf: Any, mode: str) -> None:
    """Histories of different lengths (so the batch is padded), each request under its own bans."""
    bodies = [
        {"user_id": "u1", "history": ["i1", "i2", "i3", "i4", "i5", "i6"], "mode": mode, "beam_width": 8,
         "num_items": 6},
        {"user_id": "u2", "history": ["i7"], "mode": mode, "beam_width": 8, "num_items": 6,
         "exclude": ["i10", "i11", "i12", "i13"]},
        {"user_id": "u3", "history": [], "mode": mode, "beam_width": 8, "num_items": 6},
    ]  # fmt: skip
    alone = [hf.recommend(body) for body in bodies]
    together = hf.recommend_batch(bodies)
    for one, batched in zip(alone, together, strict=True):
        assert item_ids(batched) == item_ids(one)
        assert [i["score"] for i in batched["items"]] == pytest.approx([i["score"] for i in one["items"]], abs=1e-4)
    for body, answer in zip(bodies, together, strict=True):
        banned = set(body["history"]) | set(body.get("exclude", []))
        assert len(item_ids(answer)) == 6 and not banned & set(item_ids(answer))


def test_hf_batch_applies_each_rows_bans_to_that_row_only(hf: Any) -> None:
    """The same user and history twice in one batch; only the second bans what the first recommends."""
    base = {"user_id": "u9", "history": ["i0"], "mode": "items", "beam_width": 8, "num_items": 4}
    first_alone = item_ids(hf.recommend(base))
    banned = {**base, "exclude": first_alone[:2]}
    banned_alone = item_ids(hf.recommend(banned))
    assert not set(first_alone[:2]) & set(banned_alone)
    for order in ([base, banned], [banned, base]):
        answers = hf.recommend_batch(order)
        assert [item_ids(a) for a in answers] == [first_alone if b is base else banned_alone for b in order]


def test_hf_batch_refuses_mixed_shapes(hf: Any) -> None:
    with pytest.raises(ValueError, match="share mode and beam width"):
        hf.recommend_batch([{"user_id": "a", "mode": "items", "beam_width": 8},
                            {"user_id": "b", "mode": "items", "beam_width": 16}])  # fmt: skip

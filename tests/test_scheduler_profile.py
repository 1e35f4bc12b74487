"""The scheduler benchmarks: the profile answers every request under both schedulers and times the phases; step_mix
measures decodes with rows at one level and at many; neither leaves StepSearch patched."""

from __future__ import annotations

from pathlib import Path

from benchmarks.scheduler_profile import arrivals, run
from onerec.bundle import ModelBundle
from onerec.generate import StepSearch


def test_profile_answers_every_request_and_times_the_phases(demo_store: Path) -> None:
    before = {name: getattr(StepSearch, name) for name in ("_relayout", "_encode", "_decode", "_finish")}
    traffic = arrivals(rate=40.0, seconds=0.5, items_share=0.5, catalogue=50, seed=3)
    assert {kind for _, kind, _ in traffic} == {"items", "session"}
    for mode in ("continuous", "batch"):
        result = run(demo_store, "demo", mode, traffic, beam=4)
        assert result["requests"] == len(traffic)
        assert result["items"]["n"] + result["session"]["n"] == len(traffic)
        assert result["items"]["p99_ms"] >= result["items"]["p50_ms"] > 0
        assert result["phases"]["_decode"]["calls"] == result["steps"] > 0
        assert 0 < result["phases"]["_decode"]["share_of_busy"] <= 1
    assert {name: getattr(StepSearch, name) for name in before} == before  # the timers were taken off


def test_step_mix_measures_decodes_at_one_level_and_at_many(demo_bundle: ModelBundle) -> None:
    from benchmarks.step_mix import measure, mixed, one_level

    gen = demo_bundle.generator
    original, relayout = StepSearch._decode, StepSearch._relayout
    steady = measure(mixed(gen, every=1, steps=24, seed=0), warm=8)
    lockstep = measure(one_level(gen, requests=2, steps=24, seed=0), warm=0)
    assert steady["decodes"] == 24 - 8 and steady["mean_levels"] > 1.5  # rows spread over the levels
    assert lockstep["mean_levels"] == 1 and lockstep["mean_requests"] <= 2
    for result in (steady, lockstep):
        assert result["aten_ops_per_decode"] > 50 and result["median_cpu_us_per_decode"] > 0
    assert steady["aten_ops_per_relayout"] > 0 and steady["aten_ops_per_encode"] > 0
    assert steady["relayouts_per_decode"] > lockstep["relayouts_per_decode"]  # a join at every step
    assert StepSearch._decode is original and StepSearch._relayout is relayout  # the timers were taken off

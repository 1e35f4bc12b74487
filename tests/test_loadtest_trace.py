"""Trace format (read/write/validation) and trace synthesis (`onerec traffic synth`)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from loadtest.cli import main as loadtest_main
from loadtest.synth import (
    UserPool,
    arrival_times,
    load_user_pool,
    parse_int_list,
    parse_mode_mix,
    synthesize,
)
from loadtest.trace import TraceError, TraceRecord, read_trace, write_trace


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    records = [
        TraceRecord(t=0.0, user_id="u1"),
        TraceRecord(
            t=0.5,
            user_id="u2",
            history=("3", "17"),
            num_items=5,
            mode="items",
            beam_width=128,
            exclude=("9",),
            timeout_ms=200,
        ),
    ]
    path = tmp_path / "trace.jsonl"
    assert write_trace(path, records) == 2
    assert read_trace(path) == records
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {"t": 0.0, "user_id": "u1"}  # unset optional fields are not written


def test_read_sorts_by_time_and_ignores_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text('{"t": 2, "user_id": "b", "request_id": "x"}\n\n{"t": 1, "user_id": "a", "history": [5]}\n')
    records = read_trace(path)
    assert [r.user_id for r in records] == ["a", "b"]
    assert records[0].history == ("5",)  # integer ids are accepted and become strings
    assert records[1].extra == {"request_id": "x"}


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "invalid JSON"),
        ('{"user_id": "u"}', "missing 't'"),
        ('{"t": -1, "user_id": "u"}', "'t' must be"),
        ('{"t": 1}', "'user_id'"),
        ('{"t": 1, "user_id": "u", "mode": "bulk"}', "'mode'"),
        ('{"t": 1, "user_id": "u", "history": "17"}', "'history'"),
        ('{"t": 1, "user_id": "u", "history": [1.5]}', "history[0]"),
        ('{"t": 1, "user_id": "u", "num_items": 0}', "'num_items'"),
        ('{"t": 1, "user_id": "u", "beam_width": true}', "'beam_width'"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_bad_line_names_its_line_number(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text('{"t": 0, "user_id": "ok"}\n{"t": 0.1, "user_id": "ok2"}\n' + bad_line + "\n")
    with pytest.raises(TraceError) as caught:
        read_trace(path)
    assert caught.value.line == 3
    assert f"{path}:3:" in str(caught.value)
    assert message in str(caught.value)


def test_arrivals_are_poisson_at_the_rate() -> None:
    rng = np.random.default_rng(1)
    times = arrival_times(rng, rate=200.0, duration=20.0)
    expected = 4000
    assert abs(len(times) - expected) < 5 * np.sqrt(expected)
    assert np.all(np.diff(times) >= 0) and times[0] >= 0 and times[-1] < 20.0
    gaps = np.diff(times)
    # exponential gaps: coefficient of variation near 1 (a metronome would give 0)
    assert 0.9 < gaps.std() / gaps.mean() < 1.1


def test_diurnal_shape_moves_traffic_to_the_peak() -> None:
    rng = np.random.default_rng(2)
    times = arrival_times(rng, rate=200.0, duration=20.0, diurnal_amplitude=0.8)
    first_half = np.sum(times < 10.0)  # sin > 0 over the first half of the period
    second_half = len(times) - first_half
    assert first_half > 1.5 * second_half
    assert abs(len(times) - 4000) < 6 * np.sqrt(4000)  # the mean rate is unchanged


def test_synthesize_mix_zipf_and_determinism() -> None:
    pool = UserPool(user_ids=[f"u{i}" for i in range(100)], histories=[(str(i),) for i in range(100)])
    kwargs = dict(seed=7, mode_mix={"session": 0.25, "items": 0.75}, beam_widths=[32, 128], num_items=[5, 10], zipf=1.2)
    records = synthesize(pool, 100.0, 30.0, **kwargs)
    again = synthesize(pool, 100.0, 30.0, **kwargs)
    assert records == again
    assert records != synthesize(pool, 100.0, 30.0, **{**kwargs, "seed": 8})
    modes = Counter(r.mode for r in records)
    assert abs(modes["items"] / len(records) - 0.75) < 0.05
    assert {r.beam_width for r in records} == {32, 128}
    assert {r.num_items for r in records} == {5, 10}
    users = Counter(r.user_id for r in records)
    top_share = users.most_common(1)[0][1] / len(records)
    assert top_share > 0.1  # uniform over 100 users would give about 0.01
    assert all(r.history == (r.user_id[1:],) for r in records)  # each request carries its user's history


def test_parsers_reject_bad_input() -> None:
    assert parse_mode_mix("session=1,items=3") == {"session": 0.25, "items": 0.75}
    assert parse_int_list("32,128", "x") == [32, 128]
    for bad in ("bulk=1", "session", "session=-1", "session=0"):
        with pytest.raises(ValueError):
            parse_mode_mix(bad)
    with pytest.raises(ValueError):
        parse_int_list("32,0", "x")


def test_user_pool_from_a_sequence_file(tmp_path: Path) -> None:
    data = tmp_path / "seq.txt"
    data.write_text("a 1 2 3 4\nb 5 6\n")
    pool = load_user_pool(str(data), history_length=2)
    assert pool.user_ids == ["a", "b"]
    assert pool.histories == [("3", "4"), ("5", "6")]


def test_synth_cli_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "trace.jsonl"
    code = loadtest_main(
        [
            "traffic",
            "synth",
            "--dataset",
            "synthetic",
            "--rate",
            "50",
            "--duration",
            "4",
            "--out",
            str(out),
            "--diurnal",
            "--mode-mix",
            "session=0.5,items=0.5",
            "--beam-widths",
            "32,128",
            "--num-items",
            "10",
            "--zipf",
            "1.1",
            "--seed",
            "3",
        ]
    )
    assert code == 0
    records = read_trace(out)
    assert 100 < len(records) < 320
    assert {r.mode for r in records} == {"session", "items"}
    assert all(r.history and r.num_items == 10 for r in records)


def test_synth_cli_reports_bad_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = loadtest_main(
        [
            "traffic",
            "synth",
            "--dataset",
            str(tmp_path / "missing.txt"),
            "--rate",
            "5",
            "--duration",
            "1",
            "--out",
            str(tmp_path / "t.jsonl"),
        ]
    )
    assert code == 2
    assert "error" in capsys.readouterr().err

"""Trace format (read/write/validation) and trace synthesis (`onerec traffic synth`)."""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from loadtest.cli import main as loadtest_main
from loadtest.synth import (
    UserPool,
    UserPoolError,
    arrival_times,
    made_up_user_pool,
    parse_int_list,
    parse_mode_mix,
    read_user_pool,
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
            exclude_history=False,
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
        ('{"t": 1, "user_id": "u", "exclude_history": "no"}', "'exclude_history'"),
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
    data.write_text("a 1 2 3 4\n\nb 5 6\nc\n")
    pool = read_user_pool(data, history_length=2)
    assert pool.user_ids == ["a", "b", "c"]
    assert pool.histories == [("3", "4"), ("5", "6"), ()]
    assert read_user_pool(data, history_length=0).histories is None
    records = synthesize(pool, 200.0, 2.0, seed=1)
    assert {r.history for r in records if r.user_id == "c"} == {None}  # no items: the stored history
    data.write_text("a 1\nb 2\na 3\n")
    with pytest.raises(UserPoolError, match=r"seq.txt:3: user 'a' already appeared on line 1"):
        read_user_pool(data)


def test_made_up_users_draw_distinct_catalogue_items() -> None:
    items = [str(i) for i in range(40)]
    pool = made_up_user_pool(items, num_users=50, history_length=8, seed=3)
    assert pool.user_ids[:2] == ["u0", "u1"] and len(pool.user_ids) == 50
    assert pool.histories is not None
    assert all(len(h) == 8 and len(set(h)) == 8 and set(h) <= set(items) for h in pool.histories)
    assert len({item for h in pool.histories for item in h}) > 30  # spread over the sample
    assert made_up_user_pool(items, 50, 8, seed=3) == pool
    assert made_up_user_pool(items, 50, 8, seed=4) != pool
    assert all(len(h) == 3 for h in made_up_user_pool(items[:3], 5, 8).histories or [])  # capped by the sample
    assert made_up_user_pool(items, 5, 0).histories is None


def test_synth_cli_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "trace.jsonl"
    users = tmp_path / "users.txt"
    users.write_text("".join(f"u{u} {' '.join(str(u * 7 + i) for i in range(12))}\n" for u in range(300)))
    code = loadtest_main(
        [
            "traffic",
            "synth",
            "--users",
            str(users),
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
    assert all(r.history and len(r.history) == 12 and r.num_items == 10 for r in records)


def test_synth_cli_reports_bad_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = loadtest_main(
        [
            "traffic",
            "synth",
            "--users",
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


class CatalogueStub:
    """A stand-in service that answers GET /v1/models, to test `traffic synth --service` alone."""

    def __init__(self, described: dict[str, object]) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server name)
                owner.paths.append(self.path)
                body = json.dumps(owner.described).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.described = described
        self.paths: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> CatalogueStub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def synth_args(out: Path, *source: str) -> list[str]:
    return ["traffic", "synth", *source, "--rate", "40", "--duration", "2", "--out", str(out), "--seed", "2"]


def test_synth_from_the_service_uses_only_the_items_it_lists(tmp_path: Path) -> None:
    listed = [f"item-{i}" for i in range(30)]
    out = tmp_path / "trace.jsonl"
    with CatalogueStub({"loaded": True, "catalog_size": 400, "popular_items": listed}) as service:
        args = synth_args(out, "--service", service.url, "--catalog-sample", "30", "--num-users", "20")
        assert loadtest_main([*args, "--history-length", "5"]) == 0
    assert service.paths == ["/v1/models?popular_items=30"]
    records = read_trace(out)
    assert len(records) > 20
    assert {r.user_id for r in records} <= {f"u{i}" for i in range(20)}
    assert all(r.history and len(r.history) == 5 and set(r.history) <= set(listed) for r in records)


def test_synth_from_the_service_refuses_what_it_cannot_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "trace.jsonl"
    with CatalogueStub({"loaded": False, "pinned": None}) as service:
        assert loadtest_main(synth_args(out, "--service", service.url)) == 2
    assert "no model loaded" in capsys.readouterr().err
    with CatalogueStub({"loaded": True, "catalog_size": 400}) as service:  # a service without the listing
        assert loadtest_main(synth_args(out, "--service", service.url)) == 2
    assert "did not list item ids" in capsys.readouterr().err
    assert loadtest_main(synth_args(out, "--service", "http://192.0.2.1:8000")) == 2  # TEST-NET: never contacted
    assert "not a loopback address" in capsys.readouterr().err
    assert not out.exists()

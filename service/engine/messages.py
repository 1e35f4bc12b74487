"""Messages between the front end and an engine process, declared once.

Encoded as msgpack by msgspec (typed decoding: a malformed message fails loudly on decode instead of
surfacing as a KeyError later). Ids of items are the *internal* indices of the model version the
request was planned against; the front end maps external ids in and out, so the engine never sees
catalogue strings except in catalogue changes. Deadlines are ``time.monotonic()`` seconds, which on
Linux is one clock for every process on the machine.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from onerec.generate import Mode

# ---- front end -> engine ---------------------------------------------------------------------------


class Submit(msgspec.Struct, tag="submit"):
    """One recommend request, planned against model ``version``."""

    id: int
    version: int
    history: list[int]  # internal item indices, newest last, already trimmed to the encoder window
    num_items: int
    mode: Mode
    beam_width: int
    exclude: list[int]
    exclude_history: bool
    user_id: str
    deadline: float  # time.monotonic() seconds


class Cancel(msgspec.Struct, tag="cancel"):
    """The caller stopped waiting: drop the request wherever it is (queued or mid-search)."""

    id: int


class LoadModel(msgspec.Struct, tag="load"):
    """Verify, build and warm a version; rows in flight keep the version they started on."""

    id: int
    path: str  # the version directory
    overlay: str | None  # the catalogue overlay file of the model (withdrawn / added items), if any


class CatalogChange(msgspec.Struct, tag="catalog"):
    """Live catalogue edits of the serving version, applied between two decode steps."""

    id: int
    version: int
    withdraw: list[str] = []
    restore: list[str] = []
    add: list[tuple[str, list[int]]] = []


class Stop(msgspec.Struct, tag="stop"):
    """Finish what is in flight (within ``drain_s``), then exit."""

    drain_s: float


ToEngine = Submit | Cancel | LoadModel | CatalogChange | Stop


# ---- engine -> front end ---------------------------------------------------------------------------


class Hello(msgspec.Struct, tag="hello"):
    """First message of an engine incarnation."""

    engine: int
    generation: int
    pid: int


class Finished(msgspec.Struct, tag="finished"):
    """A request's answer: (internal item, score, semantic id) best first."""

    id: int
    items: list[tuple[int, float, list[int]]]
    queued_s: float  # from arrival at the engine to its admission into the row set
    steps: int  # decode steps it took part in


class Failed(msgspec.Struct, tag="failed"):
    """A request the engine could not answer; ``kind`` maps to an error of the front end."""

    id: int
    kind: Literal["deadline", "invalid", "not_loaded", "internal", "stopping"]
    message: str


class ControlDone(msgspec.Struct, tag="control"):
    """Answer to LoadModel / CatalogChange: ok, or why not."""

    id: int
    ok: bool
    message: str = ""
    version: int | None = None


class StepStats(msgspec.Struct, tag="stats"):
    """What the engine measured since its last report (the front end exports it to Prometheus)."""

    engine: int
    steps: list[tuple[int, int, float]]  # (requests, rows, seconds) per decode step
    encodes: list[float]  # encoder seconds of the steps at which requests joined
    invalid_paths: int  # generated paths that were not valid items since the last report (must stay 0)
    backlog_rowsteps: int  # row x step units still to compute (live rows' remaining steps + waiting)
    received_rowsteps: int  # total row x step units of every Submit received so far
    live_rows: int
    waiting: int


FromEngine = Hello | Finished | Failed | ControlDone | StepStats

to_engine_encoder = msgspec.msgpack.Encoder()
to_engine_decoder = msgspec.msgpack.Decoder(ToEngine)
from_engine_encoder = msgspec.msgpack.Encoder()
from_engine_decoder = msgspec.msgpack.Decoder(FromEngine)

"""The trace format: JSON Lines, one request per line (DESIGN.md section 8).

A line looks like ``{"t": 0.25, "user_id": "u42", "history": ["17", "3"], "num_items": 10,
"mode": "session", "beam_width": 32}``. Only ``t`` and ``user_id`` are required. ``t`` is seconds
from the start of the trace. The optional fields are those of the body of ``POST /v1/recommend``
(``exclude``, ``timeout_ms`` and ``exclude_history`` too) so a replayed request is the request that
was captured. Unknown keys are ignored (a capture may carry bookkeeping such as a request id), but
every known key is validated, and a bad line is reported with its line number so a broken capture is
found at once instead of half-way through a replay.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# The request modes. loadtest may not import the model, so this is a copy of onerec.generate.MODES;
# tests/test_wire_contract.py asserts the two agree.
MODES = ("session", "items")
MAX_LINE_BYTES = 1 << 20


class TraceError(ValueError):
    """A trace line that cannot be replayed; names the file and the 1-based line number."""

    def __init__(self, path: str | Path, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path = str(path)
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class TraceRecord:
    """One request of a trace, at ``t`` seconds from the trace's start.

    The fields after ``t`` are the recommend request's, named as in ``POST /v1/recommend`` and the
    proto's ``RecommendRequest`` (tests/test_wire_contract.py holds the three to each other); None
    means absent, so the service's default applies. ``REQUEST_FIELDS`` is read from this class, so a
    field added here is written, read and sent without another list to update.
    """

    t: float
    user_id: str
    history: tuple[str, ...] | None = None
    num_items: int | None = None
    mode: str | None = None
    beam_width: int | None = None
    exclude: tuple[str, ...] | None = None
    timeout_ms: int | None = None
    exclude_history: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def request_body(self) -> dict[str, Any]:
        """The JSON body of ``POST /v1/recommend`` for this record (only the fields that are set)."""
        body: dict[str, Any] = {}
        for name in REQUEST_FIELDS:
            value = getattr(self, name)
            if value is not None:
                body[name] = list(value) if isinstance(value, tuple) else value
        return body

    def to_json(self) -> dict[str, Any]:
        """The trace line for this record (``t`` first, then the request fields)."""
        return {"t": round(self.t, 6), **self.request_body()}


REQUEST_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(TraceRecord) if f.name not in ("t", "extra"))


def _id_list(value: Any, name: str) -> tuple[str, ...]:
    """Item ids are strings on the wire; integers are accepted and converted (captures of old clients)."""
    if not isinstance(value, list):
        raise ValueError(f"'{name}' must be a list of item ids, got {type(value).__name__}")
    out = []
    for position, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise ValueError(f"'{name}[{position}]' must be a string item id, got {item!r}")
        out.append(str(item))
    return tuple(out)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"'{name}' must be a positive integer, got {value!r}")
    return value


def _mode(value: Any, name: str) -> str:
    if value not in MODES:
        raise ValueError(f"'{name}' must be one of {MODES}, got {value!r}")
    return str(value)


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"'{name}' must be true or false, got {value!r}")
    return value


# How each optional request field of a trace line is checked (user_id is required and read apart).
_PARSERS: dict[str, Callable[[Any, str], Any]] = {
    "history": _id_list,
    "num_items": _positive_int,
    "mode": _mode,
    "beam_width": _positive_int,
    "exclude": _id_list,
    "timeout_ms": _positive_int,
    "exclude_history": _boolean,
}


def parse_record(obj: Any) -> TraceRecord:
    """Validate one decoded trace line; raises ValueError with a message naming the field."""
    if not isinstance(obj, dict):
        raise ValueError(f"a trace line must be a JSON object, got {type(obj).__name__}")
    if "t" not in obj:
        raise ValueError("missing 't' (seconds from the start of the trace)")
    t = obj["t"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise ValueError(f"'t' must be a finite number >= 0, got {t!r}")
    user_id = obj.get("user_id")
    if isinstance(user_id, int) and not isinstance(user_id, bool):
        user_id = str(user_id)
    if not isinstance(user_id, str) or not user_id:
        raise ValueError(f"'user_id' must be a non-empty string, got {user_id!r}")
    optional = {
        name: _PARSERS[name](obj[name], name)
        for name in REQUEST_FIELDS
        if name != "user_id" and obj.get(name) is not None
    }
    known = {"t", *REQUEST_FIELDS}
    return TraceRecord(
        t=float(t),
        user_id=user_id,
        **optional,
        extra={key: value for key, value in obj.items() if key not in known},
    )


def iter_trace(path: str | Path) -> Iterator[TraceRecord]:
    """Yield the records of a trace file in file order; blank lines are skipped."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if len(line) > MAX_LINE_BYTES:
                raise TraceError(path, number, f"line longer than {MAX_LINE_BYTES} bytes")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceError(path, number, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
            try:
                yield parse_record(obj)
            except ValueError as exc:
                raise TraceError(path, number, str(exc)) from None


def read_trace(path: str | Path) -> list[TraceRecord]:
    """Read and validate a whole trace, sorted by ``t``.

    Sorting (stable) matters for captures: the service writes lines from concurrent requests, so
    neighbouring lines can be a few microseconds out of order.
    """
    records = list(iter_trace(path))
    records.sort(key=lambda record: record.t)
    return records


def write_trace(path: str | Path, records: Iterable[TraceRecord]) -> int:
    """Write records as JSON Lines; returns the number of lines written."""
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json(), separators=(",", ":")) + "\n")
            count += 1
    return count

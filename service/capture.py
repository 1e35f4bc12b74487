"""Traffic capture: a sampled share of received recommend requests, as a replayable JSON Lines trace.

Format (DESIGN.md section 8), one request per line:
    {"t": seconds_from_start, "user_id": "...", "history": [...]?, "num_items": N, "mode": "...",
     "beam_width": B, "exclude": [...]?, "timeout_ms": T?, "exclude_history": false?}
that is, the fields of the recommend request (service.schemas.RecommendBody) that the caller set,
with the server's defaults written out for num_items, mode and beam_width. `history` appears only
when the request carried one (otherwise replay uses the stored history, as the original request
did). `t` counts from the moment capture started in this process.

The request path only samples and puts a small dict on a bounded queue (never blocks, never does
I/O); a daemon thread serialises and appends. When the queue is full the record is dropped and
counted. When the file reaches `max_bytes` it is rotated to `<path>.1` (one old file kept), so a
forgotten capture cannot fill the disk.
"""

from __future__ import annotations

import json
import os
import queue
import random
import threading
import time
from pathlib import Path
from typing import Any

from service.logs import get_logger
from service.metrics import ServiceMetrics
from service.schemas import RecommendBody

log = get_logger("capture")
_STOP = object()


def request_record(body: RecommendBody, num_items: int, beam_width: int) -> dict[str, Any]:
    """The capture record of one request (without ``t``): the fields its caller set, by the body's names.

    Derived from the body model, so a field added to RecommendBody is captured (and replayed) without
    touching this; ``num_items``, ``mode`` and ``beam_width`` are written out with the values the
    server used, so a replay asks for the same work even where the server's defaults differ.
    """
    record = body.model_dump(exclude_defaults=True)
    if not record.get("history"):
        record.pop("history", None)  # empty means "the stored history", as an absent field
    record.update(num_items=num_items, mode=body.mode, beam_width=beam_width)
    return record


class CaptureWriter:
    """Samples records on the caller's thread, writes them on its own thread."""

    def __init__(
        self,
        path: Path,
        rate: float,
        max_bytes: int,
        metrics: ServiceMetrics | None = None,
        queue_size: int = 10000,
        seed: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.rate = rate
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.started = time.monotonic()
        self._random = random.Random(seed)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="onerec-capture", daemon=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def offer(self, record: dict[str, Any]) -> bool:
        """Sample and enqueue one request record; never blocks. True when it was queued."""
        if self.rate <= 0 or (self.rate < 1 and self._random.random() >= self.rate):
            return False
        record = {"t": round(time.monotonic() - self.started, 6), **record}
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._count("dropped")
            return False
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued and stop the writer thread."""
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _count(self, result: str, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.capture_records.labels(result).inc(n)

    def _run(self) -> None:
        handle = _open_private(self.path)
        size = handle.tell()
        try:
            while True:
                item = self._queue.get()
                lines = []
                stop = item is _STOP
                if not stop:
                    lines.append(item)
                # drain what else is waiting: one write + flush per burst, not per record
                while not stop and len(lines) < 1000:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is _STOP:
                        stop = True
                    else:
                        lines.append(more)
                if lines:
                    text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in lines)
                    if size + len(text) > self.max_bytes and size > 0:
                        handle = self._rotate(handle)
                        size = 0
                    handle.write(text)
                    handle.flush()
                    size += len(text.encode("utf-8"))
                    self._count("written", len(lines))
                if stop:
                    return
        except OSError:
            log.exception("capture writer failed; capture stops", extra={"path": str(self.path)})
        finally:
            handle.close()

    def _rotate(self, handle: Any) -> Any:
        handle.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        log.info("capture file rotated", extra={"path": str(self.path), "max_bytes": self.max_bytes})
        return _open_private(self.path)


def _open_private(path: Any) -> Any:
    """Append-open the capture file readable by its owner only (0600): it holds user ids."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)  # a file left by an older version keeps its mode otherwise
    return os.fdopen(fd, "a", encoding="utf-8")

"""The engine process: sockets around a ``Scheduler``, in a busy loop.

    loop:  take every message waiting on the inbox (block briefly only when idle)
           scheduler.step(): expire, admit, one decode step for all live rows, answer the finished
           every 100 ms: ship step timings and the backlog to the front end (metrics, admission)

The process exits when told to stop (after finishing what it holds, within the drain budget), or when
its parent (the front end) is gone, so a killed front end never leaves an orphan holding a model in
memory. It ignores SIGINT and SIGTERM: the front end decides when it stops.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass

import msgspec
import zmq

from service.engine import messages as msg
from service.engine.scheduler import Scheduler
from service.logs import get_logger

STATS_EVERY_S = 0.1
PARENT_CHECK_S = 0.5
IDLE_POLL_MS = 20

log = get_logger("engine")


@dataclass(frozen=True)
class EngineConfig:
    """How the front end starts an engine (passed as JSON on the command line)."""

    index: int
    generation: int
    inbox: str  # zmq address the engine binds and pulls requests from
    outbox: str  # zmq address the engine pushes replies to
    device: str = "cpu"
    kernels: str = "auto"  # Settings.kernels: the backend every kernel dispatcher is asked for
    torch_threads: int = 1
    max_rows: int = 2048
    max_requests: int = 16
    scheduler: str = "continuous"
    log_level: str = "INFO"


class Engine:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.ctx = zmq.Context()
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.bind(cfg.inbox)  # the front end connects to it (see client._spawn)
        self.outbox = self.ctx.socket(zmq.PUSH)
        self.outbox.setsockopt(zmq.LINGER, 2000)
        self.outbox.connect(cfg.outbox)
        self.scheduler = Scheduler(
            self.send,
            index=cfg.index,
            device=cfg.device,
            kernels=cfg.kernels,
            max_rows=cfg.max_rows,
            max_requests=cfg.max_requests,
            mode=cfg.scheduler,
        )
        self.parent = os.getppid()

    def send(self, message: msg.FromEngine) -> None:
        self.outbox.send(msg.from_engine_encoder.encode(message), copy=False)

    def _receive(self, timeout_ms: int) -> None:
        if not self.inbox.poll(timeout_ms):
            return
        while True:
            try:
                raw = self.inbox.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self.scheduler.handle(msg.to_engine_decoder.decode(raw.buffer))
            except msgspec.DecodeError as exc:
                log.error("undecodable message from the front end", extra={"error": str(exc)})

    def run(self) -> int:
        cfg, scheduler = self.cfg, self.scheduler
        self.send(msg.Hello(cfg.index, cfg.generation, os.getpid()))
        log.info("engine started", extra={"engine": cfg.index, "generation": cfg.generation, "pid": os.getpid()})
        last_stats = last_parent_check = time.monotonic()
        code = 0
        while True:
            self._receive(0 if scheduler.busy else IDLE_POLL_MS)
            scheduler.step()
            now = time.monotonic()
            if now - last_stats >= STATS_EVERY_S:
                last_stats = now
                self.send(scheduler.stats())
            if scheduler.stopping_at is not None and (not scheduler.busy or now >= scheduler.stopping_at):
                break
            if now - last_parent_check > PARENT_CHECK_S:
                last_parent_check = now
                if os.getppid() != self.parent:
                    log.error("front end is gone; engine exits")
                    code = 1
                    break
        scheduler.fail_everything("the engine stopped before this request finished")
        self.send(scheduler.stats())
        self.outbox.close()
        self.inbox.close(0)
        self.ctx.term()
        return code


def main(argv: list[str] | None = None) -> int:
    """``python -m service.engine.core CONFIG_JSON``: what the front end's client runs."""
    parser = argparse.ArgumentParser(description="OneRec engine process (started by `onerec serve`)")
    parser.add_argument("config", help="EngineConfig as JSON")
    args = parser.parse_args(argv)
    cfg = EngineConfig(**json.loads(args.config))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from service.logs import configure_logging

    configure_logging(cfg.log_level)
    import torch

    torch.set_num_threads(cfg.torch_threads)
    return Engine(cfg).run()


if __name__ == "__main__":
    sys.exit(main())

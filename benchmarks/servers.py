"""Starting the servers the benchmarks measure, each a subprocess on a free port (``loadtest.launcher``).

Ours is ``onerec serve`` (``start_onerec``): its front-end process spawns and supervises the engine
processes. The alternative is ``python -m benchmarks.hf_baseline`` (``start_hf``). Both get the
same thread settings (``thread_env``), so neither side's math library takes every core from its
event loop.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from loadtest.launcher import REPO_ROOT, ServerHandle, ServiceHandle, free_port, start_server, start_service

READY_TIMEOUT_S = 300.0  # a loaded shared machine may take minutes to import torch and load a model


def thread_env(threads: int) -> dict[str, str]:
    """Environment of a server with ``threads`` math-library threads, importing this checkout."""
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def onerec_env(name: str | None, device: str, threads: int, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """Settings of our service in the benchmark: torch threads per engine, no version polling, quiet logs.

    The front end is one asyncio process; each engine (``ONEREC_ENGINES``, default 1) is a child
    process with ``threads`` torch threads; ``ONEREC_SCHEDULER`` (continuous by default) picks the
    engine's scheduler. Anything in ``extra_env`` (``--service-env``) overrides these.
    """
    env = thread_env(threads)
    env.update(
        {
            "ONEREC_TORCH_THREADS": str(threads),
            "ONEREC_DEVICE": device,
            "ONEREC_POLL_INTERVAL_S": "0",
            "ONEREC_LOG_LEVEL": "WARNING",
        }
    )
    if name:
        env["ONEREC_MODEL_NAME"] = name
    env.update(extra_env or {})
    return env


def start_onerec(store: Path, env: dict[str, str], log_dir: Path) -> ServiceHandle:
    """Our service on free ports, started as the tests start it; returns once it is ready."""
    return start_service(store, log_dir / "onerec.log", env=env, ready_timeout=READY_TIMEOUT_S)


def start_hf(
    spec_path: Path, device: str, threads: int, log_dir: Path, max_batch: int = 1, max_rows: int = 2048
) -> ServerHandle:
    """The Hugging Face baseline (one request at a time when ``max_batch`` is 1, else static batches)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "benchmarks.hf_baseline",
        "--spec", str(spec_path),
        "--port", str(port),
        "--device", device,
        "--threads", str(threads),
        "--max-batch", str(max_batch),
        "--max-rows", str(max_rows),
    ]  # fmt: skip
    name = "hf" if max_batch == 1 else "hf_batched"
    return start_server(cmd, port, log_dir / f"{name}.log", env=thread_env(threads), ready_timeout=READY_TIMEOUT_S)

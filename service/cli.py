"""`onerec serve` and `onerec features load` (registered into the `onerec` command by onerec/cli.py).

`serve` gets one flag per Settings field (--max-batch-size for ONEREC_MAX_BATCH_SIZE, ...); a flag
given on the command line overrides the environment, an absent one leaves it alone. The admin token
has no flag on purpose (a command line is visible to every user of the machine): use the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

SECRET_FIELDS = frozenset({"admin_token"})


def register(subparsers: Any) -> None:
    """Add `serve` and `features load` to the `onerec` sub-command parser."""
    _add_serve(subparsers)
    _add_features(subparsers)


def _add_serve(subparsers: Any) -> None:
    from service.settings import Settings

    parser = subparsers.add_parser(
        "serve",
        help="serve recommendations over HTTP and gRPC",
        description="Serve the newest valid model of a store over HTTP and gRPC. Every flag can also be "
        "set as an environment variable ONEREC_<NAME> (flags win).",
    )
    for name, field in Settings.model_fields.items():
        if name in SECRET_FIELDS:
            continue
        flag = "--" + name.replace("_", "-")
        default = field.default
        parser.add_argument(
            flag,
            dest=name,
            default=None,
            metavar=name.split("_")[-1].upper(),
            help=f"{field.description} (env ONEREC_{name.upper()}, default {default})",
        )
    parser.set_defaults(func=run_serve)


def settings_from_args(args: argparse.Namespace) -> Any:
    """Settings from the environment, overridden by the flags that were given."""
    from service.settings import Settings

    overrides = {
        name: getattr(args, name)
        for name in Settings.model_fields
        if name not in SECRET_FIELDS and getattr(args, name, None) is not None
    }
    return Settings(**overrides)


def run_serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"onerec serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    from service.server import serve

    return serve(settings)


def _add_features(subparsers: Any) -> None:
    parser = subparsers.add_parser("features", help="feature-store tools")
    sub = parser.add_subparsers(dest="features_command", required=True)
    load = sub.add_parser(
        "load",
        help="bulk-load user histories into the feature store",
        description="Load a sequence file (one line per user: `user item item ...`, oldest first) into "
        "Redis (--redis-url or ONEREC_REDIS_URL; each user's list is replaced) or into a running service "
        "over HTTP (--target; appended through POST /v1/events, which also works for the embedded store).",
    )
    load.add_argument(
        "--dataset",
        required=True,
        type=Path,
        help="sequence file, e.g. ../shared/data/amazon-beauty/sequences.txt",
    )
    load.add_argument("--redis-url", default=None, help="Redis URL (default: ONEREC_REDIS_URL)")
    load.add_argument("--target", default=None, help="a running service, e.g. http://127.0.0.1:8000")
    load.add_argument("--history-length", type=int, default=256, help="keep the newest N items per user")
    load.add_argument("--limit-users", type=int, default=None, help="load only the first N users")
    load.set_defaults(func=run_features_load)


def run_features_load(args: argparse.Namespace) -> int:
    from onerec.data import SequenceFileError, read_histories
    from service.settings import Settings

    if not args.dataset.is_file():
        print(f"onerec features load: --dataset {args.dataset}: no such file", file=sys.stderr)
        return 2
    try:
        histories = read_histories(args.dataset, strict=False)
    except SequenceFileError as exc:
        print(f"onerec features load: {exc}", file=sys.stderr)
        return 2
    if args.limit_users is not None:
        histories = dict(list(histories.items())[: args.limit_users])
    redis_url = args.redis_url or Settings().redis_url
    started = time.perf_counter()
    if args.target:
        written = asyncio.run(_load_over_http(args.target, histories, args.history_length))
        where = args.target
    elif redis_url:
        written = asyncio.run(_load_into_redis(redis_url, histories, args.history_length))
        where = redis_url
    else:
        print(
            "onerec features load: no destination: pass --redis-url (or set ONEREC_REDIS_URL), or --target "
            "http://HOST:PORT of a running service using the embedded store",
            file=sys.stderr,
        )
        return 2
    report = {
        "users": written,
        "items": sum(len(h[-args.history_length :]) for h in histories.values()),
        "destination": where,
        "seconds": round(time.perf_counter() - started, 3),
    }
    print(json.dumps(report))
    return 0


async def _load_into_redis(url: str, histories: dict[str, list[str]], limit: int) -> int:
    from service.features import RedisFeatureStore

    store = RedisFeatureStore(url, timeout_s=5.0)
    try:
        return await store.load_histories(histories, limit)
    finally:
        await store.close()


async def _load_over_http(target: str, histories: dict[str, list[str]], limit: int, concurrency: int = 8) -> int:
    import httpx

    queue: asyncio.Queue[tuple[str, list[str]]] = asyncio.Queue()
    for item in histories.items():
        queue.put_nowait(item)
    written = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal written
        while not queue.empty():
            user_id, items = queue.get_nowait()
            response = await client.post("/v1/events", json={"user_id": user_id, "items": items[-limit:]})
            response.raise_for_status()
            written += 1

    async with httpx.AsyncClient(base_url=target, timeout=30.0) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return written


def main(argv: list[str] | None = None) -> int:
    """`python -m service [serve|features load] ...` (defaults to `serve`)."""
    parser = argparse.ArgumentParser(prog="python -m service")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        argv = ["serve", *argv]
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)

"""Synthetic traces: Poisson arrivals (optionally diurnal), Zipf-popular users, a mix of request shapes.

Why not uniform users at a constant rate: real traffic has bursts (Poisson gaps, not a metronome),
a few very active users (Zipf), and a daily swell; a replay that lacks them flatters the batcher and
the feature-store cache. Each request can carry the user's recent history (external item ids,
newest last) so a replay works against a service whose feature store is empty.

The users come from a sequence file (``read_user_pool``) or are made up over the item ids that the
running service lists (``fetch_popular_items`` + ``made_up_user_pool``): the load tester needs only
the wire, never the model's dataset readers.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtest.targets import check_target_allowed, parse_target
from loadtest.trace import MODES, TraceRecord


@dataclass(frozen=True)
class UserPool:
    """The users a trace draws from, and (optionally) each one's recent history, newest last."""

    user_ids: list[str]
    histories: list[tuple[str, ...]] | None = None

    def __post_init__(self) -> None:
        if not self.user_ids:
            raise ValueError("a user pool needs at least one user")
        if self.histories is not None and len(self.histories) != len(self.user_ids):
            raise ValueError("histories must align with user_ids")


class UserPoolError(ValueError):
    """A user-pool file that cannot be read; names the file and the 1-based line."""

    def __init__(self, path: str | Path, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")


def read_user_pool(path: str | Path, history_length: int = 50) -> UserPool:
    """Users and their last ``history_length`` items from a sequence file: ``user item item ...``.

    The format of the datasets (``onerec build --dataset``) and of ``ONEREC_FEATURES_PRELOAD``: one
    user a line, whitespace separated, oldest item first. A line with a user alone is a user without
    a history (its requests use the stored one). A user named twice is refused, since a replay would
    silently carry only one of the two histories.
    """
    user_ids: list[str] = []
    histories: list[tuple[str, ...]] = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            tokens = line.split()
            if not tokens:
                continue
            user, items = tokens[0], tokens[1:]
            if user in first_line:
                raise UserPoolError(path, number, f"user {user!r} already appeared on line {first_line[user]}")
            first_line[user] = number
            user_ids.append(user)
            histories.append(tuple(items[-history_length:]) if history_length > 0 else ())
    if not user_ids:
        raise UserPoolError(path, 0, "file holds no users")
    return UserPool(user_ids=user_ids, histories=histories if history_length > 0 else None)


def fetch_popular_items(service_url: str, count: int, allow_remote: bool = False, timeout_s: float = 10.0) -> list[str]:
    """Up to ``count`` live item ids of the serving catalogue, most popular first (GET /v1/models).

    Why ask the service: the load tester runs where only the wire is, without the dataset or the
    model, and the ids it sends must be ones the serving version knows.
    """
    address = parse_target(service_url)
    if address.scheme != "http":
        raise ValueError(f"the catalogue is read over HTTP: want http://HOST:PORT, got {service_url!r}")
    check_target_allowed(address, allow_remote)
    url = f"{address.url}/v1/models?popular_items={count}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            described = json.load(response)
    except urllib.error.URLError as exc:  # HTTPError is one too
        raise ValueError(f"cannot read the catalogue from {url}: {exc}") from None
    if not described.get("loaded"):
        raise ValueError(f"{address.url} has no model loaded yet: nothing to draw items from")
    items = described.get("popular_items")
    if not isinstance(items, list) or not items or not all(isinstance(item, str) for item in items):
        raise ValueError(f"{url} did not list item ids (a service older than this load tester?)")
    return items


def made_up_user_pool(items: Sequence[str], num_users: int, history_length: int, seed: int = 0) -> UserPool:
    """``num_users`` users ``u0``, ``u1``, ... each with ``history_length`` distinct items drawn from ``items``.

    For a service whose users the load tester does not know: the histories only need ids the
    catalogue has and a realistic length (what a request costs), not a real user's taste. Items are
    drawn uniformly; deterministic for ``seed``.
    """
    if num_users <= 0:
        raise ValueError("the number of users must be positive")
    if not items:
        raise ValueError("no items to draw histories from")
    user_ids = [f"u{i}" for i in range(num_users)]
    if history_length <= 0:
        return UserPool(user_ids=user_ids)
    rng = np.random.default_rng(seed)
    pool = np.asarray(items, dtype=object)
    length = min(history_length, len(items))
    histories = [tuple(str(item) for item in rng.choice(pool, size=length, replace=False)) for _ in user_ids]
    return UserPool(user_ids=user_ids, histories=histories)


def parse_mode_mix(text: str) -> dict[str, float]:
    """``session=0.5,items=0.5`` -> normalised weights; names must be known modes."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MODES:
            raise ValueError(f"bad mode mix entry {part!r}: want MODE=WEIGHT with MODE in {MODES}")
        weight = float(value)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"mode weight must be >= 0, got {value!r}")
        weights[name] = weight
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("mode mix weights sum to zero")
    return {name: weight / total for name, weight in weights.items()}


def parse_int_list(text: str, name: str) -> list[int]:
    """``32,128`` -> [32, 128]; every entry must be a positive integer."""
    values = []
    for part in text.split(","):
        value = int(part)
        if value <= 0:
            raise ValueError(f"{name} entries must be positive, got {value}")
        values.append(value)
    return values


def arrival_times(
    rng: np.random.Generator,
    rate: float,
    duration: float,
    diurnal_amplitude: float = 0.0,
    diurnal_period: float | None = None,
) -> np.ndarray:
    """Poisson arrival times in [0, duration) at mean ``rate``; with an amplitude a > 0 the rate is
    ``rate * (1 + a * sin(2 pi t / period))`` (thinning of a Poisson process at the peak rate)."""
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    if not 0.0 <= diurnal_amplitude < 1.0:
        raise ValueError("diurnal amplitude must lie in [0, 1)")
    peak = rate * (1.0 + diurnal_amplitude)
    expected = peak * duration
    gaps = rng.exponential(1.0 / peak, size=int(expected + 10 * math.sqrt(expected) + 10))
    times = np.cumsum(gaps)
    while times[-1] < duration:  # astronomically rare; keep the process exact anyway
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / peak, size=len(times)))])
    times = times[times < duration]
    if diurnal_amplitude > 0:
        period = diurnal_period or duration
        keep = rng.random(len(times)) < (1.0 + diurnal_amplitude * np.sin(2 * np.pi * times / period)) / (
            1.0 + diurnal_amplitude
        )
        times = times[keep]
    return times


def zipf_user_choice(rng: np.random.Generator, n_users: int, count: int, exponent: float) -> np.ndarray:
    """``count`` user indices with P(user of popularity rank r) proportional to 1/r^exponent.

    Ranks are a random permutation, so the most active users are not simply the first in the file.
    """
    if exponent < 0:
        raise ValueError("zipf exponent must be >= 0")
    ranks = rng.permutation(n_users) + 1
    weights = 1.0 / ranks.astype(np.float64) ** exponent
    return rng.choice(n_users, size=count, p=weights / weights.sum())


def synthesize(
    pool: UserPool,
    rate: float,
    duration: float,
    *,
    seed: int = 0,
    diurnal_amplitude: float = 0.0,
    diurnal_period: float | None = None,
    mode_mix: dict[str, float] | None = None,
    beam_widths: Sequence[int] | None = None,
    num_items: Sequence[int] | None = (10,),
    zipf: float = 1.1,
) -> list[TraceRecord]:
    """A trace of Poisson arrivals over ``duration`` seconds; deterministic for ``seed``.

    Unset shape options (``mode_mix``, ``beam_widths``, ``num_items``) are left out of the requests,
    so the service's defaults apply.
    """
    rng = np.random.default_rng(seed)
    times = arrival_times(rng, rate, duration, diurnal_amplitude, diurnal_period)
    users = zipf_user_choice(rng, len(pool.user_ids), len(times), zipf)
    modes = None
    if mode_mix:
        names = list(mode_mix)
        modes = [names[i] for i in rng.choice(len(names), size=len(times), p=[mode_mix[n] for n in names])]
    beams = rng.choice(np.asarray(beam_widths), size=len(times)) if beam_widths else None
    counts = rng.choice(np.asarray(num_items), size=len(times)) if num_items else None
    records = []
    for i, (t, user) in enumerate(zip(times, users, strict=True)):
        records.append(
            TraceRecord(
                t=float(t),
                user_id=pool.user_ids[user],
                history=(pool.histories[user] or None) if pool.histories is not None else None,
                num_items=int(counts[i]) if counts is not None else None,
                mode=modes[i] if modes is not None else None,
                beam_width=int(beams[i]) if beams is not None else None,
            )
        )
    return records

"""Synthetic traces: Poisson arrivals (optionally diurnal), Zipf-popular users, a mix of request shapes.

Why not uniform users at a constant rate: real traffic has bursts (Poisson gaps, not a metronome),
a few very active users (Zipf), and a daily swell; a replay that lacks them flatters the batcher and
the feature-store cache. Each request can carry the user's recent history (external item ids,
newest last) so a replay works against a service whose feature store is empty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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


def load_user_pool(dataset: str, history_length: int = 50, world_seed: int = 0) -> UserPool:
    """Users and their last ``history_length`` items, from ``synthetic`` (the demo world) or a file."""
    from onerec import data as onerec_data  # lazy: only synth needs the dataset readers

    if dataset == "synthetic":
        interactions = onerec_data.make_synthetic(onerec_data.SyntheticConfig(seed=world_seed)).data
    else:
        interactions = onerec_data.load_sequence_file(dataset)
    histories = None
    if history_length > 0:
        item_ids = interactions.item_ids
        histories = [tuple(item_ids[int(i)] for i in seq[-history_length:]) for seq in interactions.sequences]
    return UserPool(user_ids=list(interactions.user_ids), histories=histories)


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
                history=pool.histories[user] if pool.histories is not None else None,
                num_items=int(counts[i]) if counts is not None else None,
                mode=modes[i] if modes is not None else None,
                beam_width=int(beams[i]) if beams is not None else None,
            )
        )
    return records

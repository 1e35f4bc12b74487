"""Offline evaluation: full-ranking Recall@K / NDCG@K (leave-one-out), the most-popular baseline and legality.

Ranking uses the generator as the service answers: ``items`` mode (the top beams of a trie-constrained
search over the whole catalogue, no sampled negatives) and none of the user's own history. Legality is
the share of beam-search paths that name a live item, measured with the trie switched off and, as a
check of the served search, with it on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from onerec.data import EvalSet
from onerec.generate import Generator, RecRequest


def ranking_metrics(ranked: Sequence[Sequence[int]], targets: Sequence[int], ks: Sequence[int]) -> dict[str, float]:
    """Recall@K and NDCG@K with one relevant item per row.

    A negative target (an item the ranker cannot know) counts as a miss whatever the row holds.
    """
    out: dict[str, float] = {}
    n = max(len(targets), 1)
    for k in ks:
        hits, gain = 0, 0.0
        for row, target in zip(ranked, targets):
            top = list(row[:k])
            if target >= 0 and target in top:
                hits += 1
                gain += 1.0 / math.log2(top.index(target) + 2)
        out[f"recall@{k}"] = hits / n
        out[f"ndcg@{k}"] = gain / n
    return out


def popularity_ranking(popularity: np.ndarray, k: int) -> list[int]:
    """The most-popular baseline: the same top-k items for everybody (ties to the lower index)."""
    return [int(i) for i in np.argsort(-popularity, kind="stable")[:k]]


def evaluate_generator(
    generator: Generator,
    histories: Sequence[np.ndarray],
    targets: Sequence[int],
    user_ids: Sequence[str],
    ks: Sequence[int] = (5, 10),
    beam_width: int | None = None,
    batch_size: int = 64,
    exclude_history: bool = True,
    progress: bool = True,
    mode: str = "items",
) -> dict[str, float]:
    """Full-ranking metrics of the generator over the given rows, as served: by default items mode
    (the top beams) and no item of the user's own history (the service's default).

    `mode="session"` ranks what session mode answers for `max(ks)` items: the best session's items in
    order, then the next sessions' (the generator's top-up).
    """
    ranked = ranked_items(
        generator, histories, user_ids, max(ks), beam_width, batch_size, exclude_history, progress, mode
    )
    return ranking_metrics(ranked, [int(t) for t in targets], ks)


def ranked_items(
    generator: Generator,
    histories: Sequence[np.ndarray],
    user_ids: Sequence[str],
    top: int,
    beam_width: int | None = None,
    batch_size: int = 64,
    exclude_history: bool = True,
    progress: bool = True,
    mode: str = "items",
) -> list[list[int]]:
    """The generator's answer (``top`` item indices, best first) for each history, as served."""
    beam = max(beam_width or top, top)
    ranked: list[list[int]] = []
    bar = tqdm(total=len(histories), desc="eval", unit="user", disable=not progress, leave=False)
    for start in range(0, len(histories), batch_size):
        reqs = [
            RecRequest(
                history=[int(i) for i in histories[j]],
                num_items=top,
                mode=mode,
                beam_width=beam,
                exclude_history=exclude_history,
                user_id=user_ids[j],
            )
            for j in range(start, min(start + batch_size, len(histories)))
        ]
        results, _ = generator.generate(reqs)
        ranked.extend([it.item for it in r.items] for r in results)
        bar.update(len(reqs))
    bar.close()
    return ranked


@dataclass
class SplitMetrics:
    """The generator and the most-popular baseline on the same evaluation rows."""

    model: dict[str, float]
    most_popular: dict[str, float]
    users: int


def evaluate_split(
    generator: Generator,
    rows: EvalSet,
    user_ids: Sequence[str],
    train_popularity: np.ndarray,
    *,
    ks: Sequence[int] = (5, 10),
    beam_width: int | None = None,
    max_users: int | None = None,
    mode: str = "items",
    model_index: np.ndarray | None = None,
    progress: bool = True,
) -> SplitMetrics:
    """Full-ranking metrics of the generator (see ``evaluate_generator``) and of the most-popular
    baseline (``train_popularity``'s top items for everybody) on the first ``max_users`` rows.

    Histories are cut to the model's encoder window. ``rows``, ``user_ids`` (indexed by
    ``rows.users``) and ``train_popularity`` are in the dataset's item indices; ``model_index`` maps
    them to the model's (-1: an item the model does not know) when the dataset is not the one the
    model was built from (``onerec eval``): unknown history items are dropped, an unknown target is
    a miss for both rankers, and an unknown popular item keeps its place in the baseline's list.
    """
    take = len(rows) if max_users is None else min(len(rows), max_users)
    histories = rows.truncated(generator.model.cfg.history_window)[:take]
    targets = np.asarray(rows.targets[:take], dtype=np.int64)
    popular = np.asarray(popularity_ranking(train_popularity, max(ks)), dtype=np.int64)
    if model_index is not None:
        histories = [model_index[h][model_index[h] >= 0] for h in histories]
        targets, popular = model_index[targets], model_index[popular]
    users = [user_ids[u] for u in rows.users[:take]]
    model = evaluate_generator(
        generator, histories, targets.tolist(), users, ks=ks, beam_width=beam_width, progress=progress, mode=mode
    )
    baseline = ranking_metrics([popular.tolist()] * take, targets.tolist(), ks)
    return SplitMetrics(model=model, most_popular=baseline, users=take)


@torch.no_grad()
def legality(
    generator: Generator,
    histories: Sequence[np.ndarray],
    user_ids: Sequence[str],
    beam_width: int = 10,
    batch_size: int = 64,
    constrained: bool = False,
) -> float:
    """Share of beam-search paths (one item) that are live catalogue items: with the trie switched off by
    default, or with it on (`constrained=True`: the served search, which must reach 1.0)."""
    snap = generator.trie.tensors
    valid = total = 0
    for start in range(0, len(histories), batch_size):
        reqs = [
            RecRequest(
                history=[int(i) for i in histories[j]],
                num_items=1,
                mode="items",
                beam_width=beam_width,
                user_id=user_ids[j],
            )
            for j in range(start, min(start + batch_size, len(histories)))
        ]
        beams = generator.search(reqs, snap, slots=1, constrained=constrained)
        alive = torch.isfinite(beams.scores)
        items = beams.items[..., 0]
        valid += int(((items >= 0) & alive).sum())
        total += int(alive.sum())
    return valid / max(total, 1)

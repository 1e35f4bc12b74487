"""Offline evaluation: full-ranking Recall@K / NDCG@K (leave-one-out) and legality.

Ranking uses the generator as the service answers: ``items`` mode (the top beams of a trie-constrained
search over the whole catalogue, no sampled negatives) and none of the user's own history. Legality is
the share of beam-search paths that name a live item, measured with the trie switched off and, as a
check of the served search, with it on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from onerec.generate import Generator, RecRequest


def ranking_metrics(ranked: Sequence[Sequence[int]], targets: Sequence[int], ks: Sequence[int]) -> dict[str, float]:
    """Recall@K and NDCG@K with one relevant item per row."""
    out: dict[str, float] = {}
    n = max(len(targets), 1)
    for k in ks:
        hits, gain = 0, 0.0
        for row, target in zip(ranked, targets):
            top = list(row[:k])
            if target in top:
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
    top = max(ks)
    beam = max(beam_width or top, top)
    ranked: list[list[int]] = []
    bar = tqdm(total=len(targets), desc="eval", unit="user", disable=not progress, leave=False)
    for start in range(0, len(targets), batch_size):
        reqs = [
            RecRequest(
                history=[int(i) for i in histories[j]],
                num_items=top,
                mode=mode,
                beam_width=beam,
                exclude_history=exclude_history,
                user_id=user_ids[j],
            )
            for j in range(start, min(start + batch_size, len(targets)))
        ]
        results, _ = generator.generate(reqs)
        ranked.extend([it.item for it in r.items] for r in results)
        bar.update(len(reqs))
    bar.close()
    return ranking_metrics(ranked, [int(t) for t in targets], ks)


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

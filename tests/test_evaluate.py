"""evaluate_split: the generator and the most-popular baseline on the same rows (build and `onerec eval`)."""

from __future__ import annotations

import numpy as np
import pytest

from onerec.data import EvalSet
from onerec.evaluate import evaluate_generator, evaluate_split, popularity_ranking, ranking_metrics
from onerec.generate import Generator
from tests.test_generator import tiny_world

USER_IDS = [f"u{i}" for i in range(6)]


def rows() -> EvalSet:
    """Four rows over a 9-item catalogue; user 3's history is longer than the tiny model's window (6)."""
    histories = [np.array([0, 1]), np.array([2]), np.array([5, 6, 7]), np.arange(8, dtype=np.int64)]
    return EvalSet(users=np.array([0, 1, 3, 5]), histories=histories, targets=np.array([4, 3, 4, 8]))


def test_ranking_metrics_never_hit_a_negative_target() -> None:
    assert ranking_metrics([[-1, 2]], [-1], (1, 2)) == {"recall@1": 0.0, "ndcg@1": 0.0, "recall@2": 0.0, "ndcg@2": 0.0}
    assert ranking_metrics([[7, 2]], [2], (1, 2))["recall@2"] == 1.0


def test_split_metrics_are_the_generator_and_the_popularity_baseline_on_the_first_rows() -> None:
    generator = Generator(*tiny_world())
    popularity = np.array([0, 9, 0, 0, 5, 0, 0, 0, 1])  # popular: 1, 4, 8, then the ties in index order
    got = evaluate_split(generator, rows(), USER_IDS, popularity, ks=(1, 2), beam_width=4, max_users=3, progress=False)
    assert got.users == 3
    assert got.most_popular == pytest.approx(
        {"recall@1": 0, "ndcg@1": 0, "recall@2": 2 / 3, "ndcg@2": (2 / 3) / np.log2(3)}
    )
    window = generator.model.cfg.history_window
    want = evaluate_generator(
        generator, [h[-window:] for h in rows().histories[:3]], [4, 3, 4], ["u0", "u1", "u3"], (1, 2), 4, progress=False
    )
    assert got.model == want


def test_items_the_model_does_not_know_are_dropped_or_missed() -> None:
    generator = Generator(*tiny_world())
    popularity = np.array([0, 9, 0, 0, 5, 0, 0, 0, 1])
    # dataset item 4 (the target of rows 0 and 2, popular) is unknown to the model; the others shift by one
    model_index = np.array([0, 1, 2, 3, -1, 4, 5, 6, 7])
    got = evaluate_split(
        generator, rows(), USER_IDS, popularity, ks=(2, 3), beam_width=4, model_index=model_index, progress=False
    )
    # baseline list in model indices: [1, -1 (item 4 keeps its place), 7]; only row 3 (item 8 -> 7) hits, at rank 3
    assert got.most_popular["recall@2"] == 0.0
    assert got.most_popular["recall@3"] == 1 / 4
    histories = [np.array([0, 1]), np.array([2]), np.array([4, 5, 6]), np.array([2, 3, 4, 5, 6])]
    assert popularity_ranking(popularity, 3) == [1, 4, 8]
    want = evaluate_generator(generator, histories, [-1, 3, -1, 7], ["u0", "u1", "u3", "u5"], (2, 3), 4, progress=False)
    assert got.model == want

"""Collaborative embeddings, balanced k-means and bijective residual semantic IDs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onerec.tokenizer import (
    balanced_kmeans,
    cooccurrence,
    item_embeddings,
    residual_semantic_ids,
)


def assert_bijective(codes: np.ndarray, level_sizes: list[int]) -> None:
    """Every item has its own path and every code is inside its level's vocabulary."""
    assert codes.dtype == np.int64
    assert codes.shape[1] == len(level_sizes)
    assert len({tuple(row) for row in codes.tolist()}) == len(codes)
    assert (codes >= 0).all()
    assert (codes < np.asarray(level_sizes)[None, :]).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 120),
    k=st.integers(1, 40),
    dim=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    method=st.sampled_from(["sequential", "greedy"]),
)
def test_balanced_kmeans_sizes_differ_by_at_most_one(n: int, k: int, dim: int, seed: int, method: str) -> None:
    x = np.random.default_rng(seed).standard_normal((n, dim))
    labels = balanced_kmeans(x, k, iters=5, seed=seed, method=method)
    k_eff = min(k, n)
    sizes = np.bincount(labels, minlength=k_eff)
    assert labels.shape == (n,) and labels.min() >= 0 and labels.max() < k_eff
    assert sizes.max() - sizes.min() <= 1
    assert sizes.min() == n // k_eff


def test_balanced_kmeans_finds_separated_clusters() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    truth = np.repeat(np.arange(4), 25)
    x = centres[truth] + 0.1 * rng.standard_normal((100, 2))
    labels = balanced_kmeans(x, 4, iters=10, seed=3)
    # Each found cluster is exactly one true cluster (labels are a permutation of the truth).
    assert len({(int(a), int(b)) for a, b in zip(truth, labels, strict=True)}) == 4


def test_balanced_kmeans_is_deterministic() -> None:
    x = np.random.default_rng(1).standard_normal((200, 8))
    assert np.array_equal(balanced_kmeans(x, 16, seed=5), balanced_kmeans(x, 16, seed=5))


def test_balanced_kmeans_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        balanced_kmeans(np.zeros((0, 3)), 2)
    with pytest.raises(ValueError):
        balanced_kmeans(np.zeros((4, 3)), 0)


def test_semantic_ids_unique_without_collisions_keep_depth() -> None:
    x = np.random.default_rng(0).standard_normal((64, 8))
    ids = residual_semantic_ids(x, levels=2, codes_per_level=8, seed=0)
    assert_bijective(ids.codes, ids.level_sizes)
    # 64 items, 8 x 8 paths: either unique at depth 2 or disambiguated; the report must agree with codes.
    if ids.report.colliding_items == 0:
        assert ids.depth == 2 and ids.report.extra_level_size == 0
    else:
        assert ids.depth == 3 and ids.level_sizes[-1] == ids.report.max_group_size


def test_semantic_ids_forced_collisions_duplicated_embeddings() -> None:
    base = np.random.default_rng(2).standard_normal((10, 4))
    emb = np.repeat(base, 5, axis=0)  # 5 identical copies of each vector
    ids = residual_semantic_ids(emb, levels=2, codes_per_level=4, seed=1)
    assert_bijective(ids.codes, ids.level_sizes)
    assert ids.depth == 3
    assert ids.report.colliding_items > 0 and ids.report.extra_level_size >= 2
    # Items with a unique k-means path get 0 on the extra level; colliding groups are numbered 0..g-1.
    prefixes: dict[tuple[int, ...], list[int]] = {}
    for row in ids.codes.tolist():
        prefixes.setdefault(tuple(row[:-1]), []).append(row[-1])
    assert all(sorted(extra) == list(range(len(extra))) for extra in prefixes.values())


def test_distinct_last_level_separates_the_items_under_each_prefix_without_an_extra_level() -> None:
    """The duplicated embeddings above collide at the last level; with distinct_last every prefix's items
    get distinct codes (each prefix holds fewer items than the codebook), so the paths are unique at depth 2."""
    base = np.random.default_rng(2).standard_normal((10, 4))
    emb = np.repeat(base, 3, axis=0)  # 3 identical copies of each vector: the same path without the option
    plain = residual_semantic_ids(emb, levels=2, codes_per_level=[4, 16], seed=1)
    ids = residual_semantic_ids(emb, levels=2, codes_per_level=[4, 16], seed=1, distinct_last=True)
    assert plain.depth == 3 and plain.report.colliding_items > 0
    assert_bijective(ids.codes, ids.level_sizes)
    assert ids.depth == 2 and ids.level_sizes == [4, 16] and ids.report.colliding_items == 0
    assert (ids.codes[:, 0] == plain.codes[:, 0]).all()  # the first level is untouched
    for prefix in np.unique(ids.codes[:, 0]):
        last = ids.codes[ids.codes[:, 0] == prefix, 1]
        assert len(np.unique(last)) == len(last)


def test_distinct_codes_go_to_the_nearest_pairs_first() -> None:
    """Two items under one prefix both nearest to code 0: the nearer keeps it, the other takes its own next
    nearest free code; an item alone under its prefix keeps its label even where another code is nearer."""
    from onerec.tokenizer import _distinct_in_groups

    prefixes = np.array([[0], [0], [1]])
    dist = np.array([[0.1, 0.5, 0.4], [0.2, 0.3, 0.25], [0.9, 0.1, 0.5]])
    labels = np.array([0, 0, 2])
    assert _distinct_in_groups(prefixes, dist, labels).tolist() == [0, 2, 2]
    assert _distinct_in_groups(prefixes, dist[:, ::-1], labels).tolist() == [2, 0, 2]


def test_distinct_last_level_keeps_the_extra_level_where_a_prefix_outgrows_the_codebook() -> None:
    emb = np.repeat(np.eye(3), 5, axis=0)  # 3 groups of 5 identical items, 2 codes per level: 5 > 2
    ids = residual_semantic_ids(emb, levels=2, codes_per_level=[3, 2], seed=0, distinct_last=True)
    assert_bijective(ids.codes, ids.level_sizes)
    assert ids.depth == 3 and ids.report.colliding_items > 0


def test_semantic_ids_forced_collisions_tiny_codebook() -> None:
    emb = np.random.default_rng(3).standard_normal((200, 6))
    ids = residual_semantic_ids(emb, levels=2, codes_per_level=2, seed=0)  # at most 4 paths for 200 items
    assert_bijective(ids.codes, ids.level_sizes)
    assert ids.level_sizes[:2] == [2, 2]
    assert ids.report.colliding_groups <= 4 and ids.report.max_group_size >= 50
    assert ids.report.utilisation == [1.0, 1.0]


def test_semantic_ids_k_larger_than_n_is_clamped() -> None:
    emb = np.random.default_rng(4).standard_normal((5, 3))
    ids = residual_semantic_ids(emb, levels=3, codes_per_level=[16, 16, 16], seed=0)
    assert_bijective(ids.codes, ids.level_sizes)
    assert ids.level_sizes[0] == 5 and ids.depth == 3
    assert ids.path_to_item()[tuple(ids.codes[3].tolist())] == 3


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(1, 6), levels=st.integers(1, 3), dup=st.integers(1, 4))
def test_semantic_ids_always_bijective(n: int, k: int, levels: int, dup: int) -> None:
    emb = np.repeat(np.random.default_rng(n * 7 + k).standard_normal((n, 3)), dup, axis=0)
    ids = residual_semantic_ids(emb, levels=levels, codes_per_level=k, seed=0, iters=3)
    assert_bijective(ids.codes, ids.level_sizes)
    assert ids.n_items == n * dup


def test_cooccurrence_is_symmetric_and_windowed() -> None:
    rows, cols, weights = cooccurrence([np.array([0, 1, 2]), np.array([3])], n_items=4, window=1)
    pairs = {(int(r), int(c)): float(w) for r, c, w in zip(rows, cols, weights, strict=True)}
    assert pairs == {(0, 1): 1.0, (1, 0): 1.0, (1, 2): 1.0, (2, 1): 1.0}


def test_cooccurrence_fades_each_pair_by_the_items_after_it_in_its_sequence() -> None:
    """A naive count: pair (i, j), i < j, of one sequence weighs exp(-(len - 1 - j) / decay) / (j - i)."""
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 6, size=rng.integers(1, 9)) for _ in range(12)]
    decay, backward = 2.5, 0.25
    want = np.zeros((6, 6))
    for seq in seqs:
        for j in range(len(seq)):
            for i in range(max(0, j - 3), j):
                if seq[i] != seq[j]:
                    fade = np.exp(-(len(seq) - 1 - j) / decay) / (j - i)
                    want[seq[i], seq[j]] += fade
                    want[seq[j], seq[i]] += backward * fade
    rows, cols, weights = cooccurrence(seqs, n_items=6, window=3, backward=backward, decay=decay)
    got = np.zeros((6, 6))
    got[rows, cols] = weights
    np.testing.assert_allclose(got, want, rtol=1e-12)
    flat = np.zeros((6, 6))
    r, c, w = cooccurrence(seqs, n_items=6, window=3, backward=backward)
    flat[r, c] = w
    assert (got <= flat + 1e-12).all() and (got < flat - 1e-6).any()  # fading only ever lowers a count


def test_cooccurrence_weighs_a_neighbour_seen_before_the_item_by_backward() -> None:
    seqs = [np.array([0, 1, 2])]
    rows, cols, weights = cooccurrence(seqs, n_items=3, window=2, backward=0.5)
    pairs = {(int(r), int(c)): float(w) for r, c, w in zip(rows, cols, weights, strict=True)}
    # row a, column b: b after a at 1/distance, b before a at 0.5/distance
    assert pairs == {(0, 1): 1.0, (0, 2): 0.5, (1, 2): 1.0, (1, 0): 0.5, (2, 1): 0.5, (2, 0): 0.25}
    rows, cols, weights = cooccurrence(seqs, n_items=3, window=2, backward=0.0)
    assert sorted(zip(rows.tolist(), cols.tolist(), weights.tolist())) == [(0, 1, 1.0), (0, 2, 0.5), (1, 2, 1.0)]


def test_item_embeddings_deterministic_and_collaborative() -> None:
    # Two groups of items that only co-occur within their group.
    rng = np.random.default_rng(0)
    seqs = [rng.permutation(np.arange(0, 10))[:6] for _ in range(60)]
    seqs += [rng.permutation(np.arange(10, 20))[:6] for _ in range(60)]
    emb = item_embeddings(seqs, n_items=22, dim=8, seed=3)  # items 20, 21 never occur
    assert emb.shape == (22, 8) and emb.dtype == np.float32
    assert np.array_equal(emb, item_embeddings(seqs, n_items=22, dim=8, seed=3))
    assert np.isfinite(emb).all()
    sim = emb[:20] @ emb[:20].T
    within = (sim[:10, :10].sum() - np.trace(sim[:10, :10])) / 90
    across = sim[:10, 10:].mean()
    assert within > across + 0.3
    assert np.abs(emb[20] - emb[21]).max() > 0  # cold items get distinct random vectors

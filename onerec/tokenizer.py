"""Semantic-ID tokenizer: collaborative item embeddings and balanced residual k-means.

OneRec (Zhou et al., 2025) gives every item a path of codes, one per level, by residual k-means over item
embeddings, with *balanced* k-means at each level (Algorithm 1: each cluster takes |V|/K items) because
unbalanced codebooks waste capacity and skew beam search. On top, this project requires item <-> path to
be a bijection: where full paths collide, an extra disambiguating level is appended (as TIGER does).

Everything here is numpy only and deterministic for a seed, so a build can be reproduced exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "SemanticIdReport",
    "SemanticIds",
    "balanced_kmeans",
    "codebook_size",
    "content_embeddings",
    "cooccurrence",
    "item_embeddings",
    "join_embeddings",
    "residual_semantic_ids",
]

# --------------------------------------------------------------------------------------------------
# Collaborative item embeddings: windowed co-occurrence -> PPMI -> truncated eigendecomposition
# --------------------------------------------------------------------------------------------------


def cooccurrence(
    sequences: Sequence[np.ndarray], n_items: int, window: int = 5, backward: float = 1.0, decay: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Co-occurrence of items within `window` positions, weighted 1/distance, as COO arrays.

    Returns (rows, cols, weights) with unique (row, col) pairs sorted by row, then col. Items seen next
    to each other in a sequence are what a sequential recommender must tell apart, so they should get
    nearby embeddings (and hence shared code prefixes). Row a, column b counts b seen *after* a at
    weight 1/distance and b seen *before* a at ``backward``/distance: 1 (the default) is the symmetric
    count the embeddings use; below 1 leans a row towards what follows the item, which is what a
    next-item candidate list wants.

    ``decay`` > 0 also fades each pair with its age, ``exp(-age / decay)``, where age counts the items
    after the pair's later item in its sequence (0 for the newest pair): the newest interactions of every
    sequence are the closest in time to what comes next, so they say more about it. 0 counts every pair alike.
    """
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    if lengths.sum() == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float64)
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
    seq_id = np.repeat(np.arange(len(sequences)), lengths)
    # (N,) items after each position in its sequence, where pairs fade
    age = (np.cumsum(lengths) - 1)[seq_id] - np.arange(len(flat)) if decay > 0 else None
    keys: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for dist in range(1, window + 1):
        same = seq_id[dist:] == seq_id[:-dist]
        a, b = flat[:-dist][same], flat[dist:][same]
        distinct = a != b
        a, b = a[distinct], b[distinct]
        fade = np.exp(-age[dist:][same][distinct] / decay) if age is not None else np.ones(len(a))
        keys += [a * n_items + b, b * n_items + a]
        weights += [fade / dist, backward * fade / dist]
    all_keys = np.concatenate(keys)
    unique, inverse = np.unique(all_keys, return_inverse=True)
    summed = np.bincount(inverse, weights=np.concatenate(weights), minlength=len(unique))
    seen = summed > 0  # backward = 0 leaves pairs seen in one direction only at weight 0
    return unique[seen] // n_items, unique[seen] % n_items, summed[seen]


def top_neighbours(
    rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, n_items: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each item's k strongest co-occurring items, strongest first (ties: lower index first).

    Takes ``cooccurrence``'s COO arrays; returns (n_items, k) item indices (-1 where an item has fewer
    than k neighbours) and their weights (0 there).
    """
    order = np.lexsort((cols, -weights, rows))
    r, c, w = rows[order], cols[order], weights[order]
    starts = np.searchsorted(r, np.arange(n_items))
    rank = np.arange(len(r)) - starts[r]
    keep = rank < k
    items = np.full((n_items, k), -1, dtype=np.int64)
    values = np.zeros((n_items, k), dtype=np.float32)
    items[r[keep], rank[keep]] = c[keep]
    values[r[keep], rank[keep]] = w[keep]
    return items, values


def _ppmi(rows: np.ndarray, cols: np.ndarray, counts: np.ndarray, n_items: int) -> np.ndarray:
    """Positive PMI of each nonzero, context smoothing 0.75 (Levy et al., 2015) against popularity bias."""
    row_sum = np.bincount(rows, weights=counts, minlength=n_items)
    col_sum = np.bincount(cols, weights=counts, minlength=n_items) ** 0.75
    pmi = np.log(counts * col_sum.sum() / (row_sum[rows] * col_sum[cols]))
    return np.maximum(pmi, 0.0)


class _SparseSymmetric:
    """A sparse (n, n) matrix for repeated products with dense blocks (torch's CSR kernel, ~20x numpy's).

    torch is imported lazily: it is a project dependency anyway, but importing the tokenizer stays cheap.
    """

    def __init__(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int) -> None:
        import warnings

        import torch

        indptr = np.zeros(n + 1, dtype=np.int64)
        indptr[1:] = np.cumsum(np.bincount(rows, minlength=n))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            self._matrix = torch.sparse_csr_tensor(
                torch.from_numpy(indptr),
                torch.from_numpy(np.ascontiguousarray(cols)),
                torch.from_numpy(np.ascontiguousarray(vals, dtype=np.float64)),
                size=(n, n),
                check_invariants=True,
            )
        self._torch = torch

    def __matmul__(self, dense: np.ndarray) -> np.ndarray:
        return (self._matrix @ self._torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float64))).numpy()


class _SparseRows:
    """A sparse (n, v) matrix X for products X @ dense and X^T @ dense (torch CSR kernels)."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int, v: int) -> None:
        import torch

        idx = torch.from_numpy(np.stack([rows, cols]))
        values = torch.from_numpy(np.ascontiguousarray(vals, dtype=np.float64))
        self._x = torch.sparse_coo_tensor(idx, values, (n, v), check_invariants=True).coalesce()
        self._xt = self._x.t().coalesce()
        self._torch = torch

    def __matmul__(self, dense: np.ndarray) -> np.ndarray:
        return (self._x @ self._torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float64))).numpy()

    def t_matmul(self, dense: np.ndarray) -> np.ndarray:
        return (self._xt @ self._torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float64))).numpy()


def _top_eigvecs(
    rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int, rank: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Leading eigenpairs (by value) of the symmetric sparse matrix: exact when small, randomized else."""
    if n <= 1500:
        dense = np.zeros((n, n))
        dense[rows, cols] = vals
        values, vectors = np.linalg.eigh(dense)
        order = np.argsort(-values, kind="stable")[:rank]
        return values[order], vectors[:, order]
    matrix = _SparseSymmetric(rows, cols, vals, n)
    sketch = min(n, rank + 16)
    basis, _ = np.linalg.qr(matrix @ rng.standard_normal((n, sketch)))
    for _ in range(3):  # power iterations sharpen the spectrum's tail
        basis, _ = np.linalg.qr(matrix @ basis)
    projected = basis.T @ (matrix @ basis)
    values, small = np.linalg.eigh((projected + projected.T) / 2)
    order = np.argsort(-values, kind="stable")[:rank]
    return values[order], basis @ small[:, order]


def item_embeddings(
    train_sequences: Sequence[np.ndarray], n_items: int, dim: int, seed: int = 0, window: int = 5
) -> np.ndarray:
    """Collaborative item embeddings (n_items, dim), float32, from training interactions only.

    Windowed co-occurrence -> PPMI -> leading eigenvectors scaled by sqrt(eigenvalue), rows L2
    normalised (cosine geometry suits k-means on co-occurrence spectra). Columns beyond the available
    rank are zero. Deterministic for `seed`. Items without any training co-occurrence get random *unit*
    directions (they still take a code) rather than near-zero vectors: near-zero vectors all fall into
    the same cluster at every level and form one big colliding group, inflating the extra level.
    """
    if n_items < 1 or dim < 1:
        raise ValueError("need n_items >= 1 and dim >= 1")
    rng = np.random.default_rng(seed)
    rows, cols, counts = cooccurrence(train_sequences, n_items, window)
    emb = np.zeros((n_items, dim), dtype=np.float64)
    if len(rows):
        rank = min(dim, n_items)
        values, vectors = _top_eigvecs(rows, cols, _ppmi(rows, cols, counts, n_items), n_items, rank, rng)
        vectors *= np.where(np.abs(vectors).max(axis=0) == vectors.max(axis=0), 1.0, -1.0)  # fixed signs
        emb[:, : len(values)] = vectors * np.sqrt(np.maximum(values, 0.0))
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    warm = norms[:, 0] > 1e-12
    emb[warm] /= norms[warm]
    cold = ~warm
    noise = rng.standard_normal((int(cold.sum()), dim))
    emb[cold] = noise / np.maximum(np.linalg.norm(noise, axis=1, keepdims=True), 1e-12)
    return emb.astype(np.float32)


def content_embeddings(tokens: Sequence[Sequence[str]], dim: int, seed: int = 0) -> np.ndarray:
    """Content item embeddings (n_items, dim), float32, rows L2 normalised (zero for items without tokens).

    TF-IDF over each item's tokens (attribute ids, title words), rows L2 normalised, then the leading
    left singular vectors of that matrix scaled by their singular values (a randomized truncated SVD),
    so items with shared rare tokens land close together. Deterministic for `seed`.
    """
    n = len(tokens)
    if n < 1 or dim < 1:
        raise ValueError("need at least one item and dim >= 1")
    vocab: dict[str, int] = {}
    rows: list[int] = []
    cols: list[int] = []
    for item, toks in enumerate(tokens):
        # sorted: a set's order follows Python's per-process string hashing, and the column order
        # decides which random sketch column each token meets, so unsorted the embedding (and the
        # semantic IDs built on it) changed from one build of the same data to the next
        for tok in sorted(set(toks)):
            rows.append(item)
            cols.append(vocab.setdefault(tok, len(vocab)))
    emb = np.zeros((n, dim), dtype=np.float64)
    if not rows:
        return emb.astype(np.float32)
    r, c = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    df = np.bincount(c, minlength=len(vocab)).astype(np.float64)
    idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
    vals = idf[c]
    row_norm = np.sqrt(np.bincount(r, weights=vals**2, minlength=n))
    vals = vals / row_norm[r]
    x = _SparseRows(r, c, vals, n, len(vocab))
    rank = min(dim, n, len(vocab))
    rng = np.random.default_rng(seed)
    sketch = min(n, len(vocab), rank + 16)
    basis, _ = np.linalg.qr(x @ rng.standard_normal((len(vocab), sketch)))  # randomized range finder
    for _ in range(3):  # power iterations on X X^T
        basis, _ = np.linalg.qr(x @ x.t_matmul(basis))
    small = x.t_matmul(basis).T  # (sketch, V) = basis^T X
    u, sing, _ = np.linalg.svd(small, full_matrices=False)
    emb[:, :rank] = (basis @ u[:, :rank]) * sing[:rank]
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = np.where(norms > 1e-12, emb / np.maximum(norms, 1e-12), 0.0)
    return emb.astype(np.float32)


def join_embeddings(collaborative: np.ndarray, content: np.ndarray, content_weight: float) -> np.ndarray:
    """Concatenate unit-norm collaborative and content rows so that the content share of each row's squared
    norm is `content_weight` (items without content keep their collaborative direction); rows unit norm."""
    if not 0.0 <= content_weight <= 1.0:
        raise ValueError("content_weight must lie in [0, 1]")
    has = (np.linalg.norm(content, axis=1) > 1e-12)[:, None]
    a = np.where(has, np.sqrt(1.0 - content_weight), 1.0)
    b = np.where(has, np.sqrt(content_weight), 0.0)
    out = np.concatenate([collaborative * a, content * b], axis=1)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.maximum(norms, 1e-12)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Balanced k-means (OneRec Algorithm 1)
# --------------------------------------------------------------------------------------------------


def _sq_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (n, k) via the dot-product expansion (one GEMM)."""
    d = (x * x).sum(axis=1)[:, None] - 2.0 * (x @ centroids.T) + (centroids * centroids).sum(axis=1)[None, :]
    return np.maximum(d, 0.0)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: spread initial centroids so no cluster starts inside another."""
    n = len(x)
    norms = (x * x).sum(axis=1)
    chosen = [int(rng.integers(n))]
    closest = np.maximum(norms - 2.0 * (x @ x[chosen[0]]) + norms[chosen[0]], 0.0)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # all remaining points coincide with a centroid: pick any unchosen point
            pick = int(rng.choice(np.setdiff1d(np.arange(n), chosen)))
        else:
            pick = int(rng.choice(n, p=closest / total))
        chosen.append(pick)
        closest = np.minimum(closest, np.maximum(norms - 2.0 * (x @ x[pick]) + norms[pick], 0.0))
    return x[chosen].copy()


def _balanced_assign(dist: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Algorithm 1's assignment: cluster by cluster, take the `sizes[k]` nearest still-unassigned items."""
    n, k = dist.shape
    labels = np.full(n, -1, dtype=np.int64)
    remaining = np.arange(n)
    for cluster in range(k):
        take = int(sizes[cluster])
        if take >= len(remaining):
            labels[remaining] = cluster
            remaining = remaining[:0]
            break
        column = dist[remaining, cluster]
        nearest = np.argpartition(column, take - 1)[:take] if take > 0 else np.zeros(0, dtype=np.int64)
        labels[remaining[nearest]] = cluster
        keep = np.ones(len(remaining), dtype=bool)
        keep[nearest] = False
        remaining = remaining[keep]
    return labels


def _greedy_assign(dist: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Balanced assignment by rounds of proposals: every unassigned item proposes to its nearest cluster
    with room left, each cluster keeps its closest proposers up to its capacity, the rest try again.

    Same balance guarantee as Algorithm 1, but no cluster is stuck with the leftovers of all the others
    (in the sequential loop the last clusters get the outliers, at every level, so outliers collide).
    """
    n, k = dist.shape
    room = sizes.astype(np.int64).copy()
    labels = np.full(n, -1, dtype=np.int64)
    pending = np.arange(n)
    while len(pending):
        sub = dist[pending]
        sub[:, room == 0] = np.inf
        choice = np.argmin(sub, axis=1)
        chosen_dist = sub[np.arange(len(pending)), choice]
        order = np.lexsort((chosen_dist, choice))
        ranked = choice[order]
        rank = np.empty(len(pending), dtype=np.int64)
        rank[order] = np.arange(len(pending)) - np.searchsorted(ranked, ranked, side="left")
        accepted = rank < room[choice]
        labels[pending[accepted]] = choice[accepted]
        room -= np.bincount(choice[accepted], minlength=k)
        pending = pending[~accepted]
    return labels


def _cluster_means(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Centroid of each cluster (clusters are never empty under balanced assignment with k <= n)."""
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=k)
    starts = np.cumsum(counts) - counts
    sums = np.add.reduceat(x[order], starts, axis=0)
    return sums / counts[:, None]


_ASSIGNERS = {"sequential": _balanced_assign, "greedy": _greedy_assign}


def balanced_kmeans_fit(
    x: np.ndarray, k: int, iters: int = 20, seed: int = 0, method: str = "sequential"
) -> tuple[np.ndarray, np.ndarray]:
    """Balanced k-means returning (labels (n,), centroids (k, d)); see `balanced_kmeans`."""
    if method not in _ASSIGNERS:
        raise ValueError(f"unknown assignment method {method!r}: want one of {sorted(_ASSIGNERS)}")
    assign = _ASSIGNERS[method]
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"need a non-empty (n, d) array, got shape {x.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = len(x)
    k = min(k, n)
    rng = np.random.default_rng(seed)
    base, extra = divmod(n, k)
    sizes = np.full(k, base, dtype=np.int64)
    sizes[:extra] += 1  # the first `extra` clusters in processing order take ceil(n/k)
    centroids = _kmeans_pp(x, k, rng)
    labels = np.full(n, -1, dtype=np.int64)
    for _ in range(max(1, iters)):
        new_labels = assign(_sq_distances(x, centroids), sizes)
        centroids = _cluster_means(x, new_labels, k)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    return labels, centroids


def balanced_kmeans(x: np.ndarray, k: int, iters: int = 20, seed: int = 0, method: str = "sequential") -> np.ndarray:
    """OneRec's balanced k-means (Algorithm 1): labels (n,) int64 with cluster sizes ceil(n/k) or floor(n/k).

    Each iteration processes clusters in turn; cluster k takes the w_k nearest items not yet assigned to
    its (previous) centroid, then moves its centroid to their mean. That is exactly the paper's loop,
    with the distance matrix computed once per iteration by one GEMM. `k` is clamped to n.
    Deterministic for `seed` (k-means++ seeding). `method="greedy"` swaps the sequential assignment for
    rounds of proposals (`_greedy_assign`), same balance guarantee, fewer outlier pile-ups.
    """
    labels, _ = balanced_kmeans_fit(x, k, iters, seed, method)
    return labels


# --------------------------------------------------------------------------------------------------
# Residual semantic IDs with a disambiguating level
# --------------------------------------------------------------------------------------------------


@dataclass
class SemanticIdReport:
    """What the tokenizer did, for logs and the manifest."""

    n_items: int
    levels: int
    level_sizes: list[int]
    codes_used: list[int]
    utilisation: list[float]
    colliding_items: int
    colliding_groups: int
    max_group_size: int
    extra_level_size: int
    reconstruction_mse: float

    def as_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class SemanticIds:
    """Every item's code path: `codes[i]` (depth D) with `codes[i, l] < level_sizes[l]`; paths are unique.

    D = levels when the k-means paths are already unique, else levels + 1 with the last level numbering
    the items that share a k-means path (0, 1, 2, ... in item order; items with a unique path get 0).
    """

    codes: np.ndarray
    level_sizes: list[int]
    report: SemanticIdReport = field(repr=False)

    @property
    def depth(self) -> int:
        return int(self.codes.shape[1])

    @property
    def n_items(self) -> int:
        return int(self.codes.shape[0])

    def path_to_item(self) -> dict[tuple[int, ...], int]:
        """Code path -> internal item index (a bijection by construction)."""
        return {tuple(int(c) for c in row): i for i, row in enumerate(self.codes)}


def _disambiguate(paths: np.ndarray, priority: np.ndarray | None = None) -> tuple[np.ndarray, int, int, int]:
    """Rank of each item within its group of identical paths; plus (colliding items, groups, max size).

    Inside a group, items are ranked by descending `priority` (e.g. training popularity), ties by item
    order; without `priority`, by item order. Ranking by popularity gives the extra level a meaning that
    holds across groups (code 0 = the group's most popular item) instead of an arbitrary numbering.
    """
    _, inverse, group_sizes = np.unique(paths, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if priority is None:
        order = np.argsort(inverse, kind="stable")  # items grouped by path, item order kept inside groups
    else:
        order = np.lexsort((np.arange(len(paths)), -np.asarray(priority, dtype=np.float64), inverse))
    starts = np.cumsum(group_sizes) - group_sizes
    rank = np.empty(len(paths), dtype=np.int64)
    rank[order] = np.arange(len(paths)) - np.repeat(starts, group_sizes)
    colliding = group_sizes > 1
    return rank, int(group_sizes[colliding].sum()), int(colliding.sum()), int(group_sizes.max())


def _distinct_in_groups(prefixes: np.ndarray, dist: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`labels` with the items of each group of equal `prefixes` moved onto distinct codes, nearest pairs
    first (greedy over the group's item-code distances `dist`); a group larger than the codebook keeps its
    labels, and the extra level names what still collides.

    Why: residual k-means assigns the last level over all items at once, so items under one prefix often
    land on one code (44% of Beauty's items did), and the extra level that separates them only ranks
    popularity. Codes unique within each prefix keep every item's path semantic and need no extra level
    (LC-Rec's uniform semantic mapping asks the same of its last level).
    """
    out = labels.copy()
    k = dist.shape[1]
    _, group = np.unique(prefixes, axis=0, return_inverse=True)
    order = np.argsort(group.reshape(-1), kind="stable")
    bounds = np.flatnonzero(np.diff(group.reshape(-1)[order])) + 1
    for members in np.split(order, bounds):
        if len(members) > k or len(np.unique(labels[members])) == len(members):
            continue
        item_done, code_taken, left = np.zeros(len(members), bool), np.zeros(k, bool), len(members)
        for flat in np.argsort(dist[members], axis=None, kind="stable"):
            i, code = divmod(int(flat), k)
            if item_done[i] or code_taken[code]:
                continue
            out[members[i]], item_done[i], code_taken[code] = code, True, True
            left -= 1
            if not left:
                break
    return out


def codebook_size(n_items: int, levels: int, max_codes: int = 256) -> int:
    """Codes per level for a catalogue of `n_items`: the power of two nearest to 2 * n_items^(1/levels),
    in [2, max_codes].

    `levels` levels of K codes give K^levels paths; about 2^levels paths per item keep every level's
    codes busy (each level-l code is shared by many items, so its embedding and head row learn from
    many examples) while residual k-means still separates most items, and the popularity-ranked extra
    level names the rest. A fixed 256 per level leaves most level-3 codes with one item (12k items).
    """
    if n_items < 1 or levels < 1:
        raise ValueError("need n_items >= 1 and levels >= 1")
    target = 2.0 * n_items ** (1.0 / levels)
    return int(min(max_codes, max(2, 2 ** round(math.log2(target)))))


def residual_semantic_ids(
    emb: np.ndarray,
    levels: int,
    codes_per_level: int | Sequence[int],
    seed: int = 0,
    iters: int = 20,
    method: str = "sequential",
    priority: np.ndarray | None = None,
    distinct_last: bool = False,
) -> SemanticIds:
    """Semantic IDs by balanced residual k-means: level l clusters the residual left by levels < l.

    `codes_per_level` is one K for all levels or one per level; each is clamped to the item count.
    With `distinct_last` the last level gives the items under each prefix distinct codes, the nearest
    free centroids (`_distinct_in_groups`). Where full paths still collide an extra level disambiguates
    them, so item <-> path is a bijection; it ranks the items of a group by descending `priority` when
    given (see `_disambiguate`).
    """
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim != 2 or len(emb) == 0:
        raise ValueError(f"need a non-empty (n_items, dim) array, got shape {emb.shape}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if isinstance(codes_per_level, int):
        ks = [int(codes_per_level)] * levels
    else:
        ks = [int(k) for k in codes_per_level]
    if len(ks) != levels:
        raise ValueError(f"got {len(ks)} codebook sizes for {levels} levels")
    n = len(emb)
    residual = emb.copy()
    columns: list[np.ndarray] = []
    sizes: list[int] = []
    for level, k in enumerate(ks):
        labels, centroids = balanced_kmeans_fit(residual, min(k, n), iters, seed + level, method)
        if distinct_last and level == levels - 1 and columns:
            labels = _distinct_in_groups(np.stack(columns, axis=1), _sq_distances(residual, centroids), labels)
        residual -= centroids[labels]
        columns.append(labels)
        sizes.append(min(k, n))
    paths = np.stack(columns, axis=1)
    rank, colliding_items, colliding_groups, max_group = _disambiguate(paths, priority)
    if max_group > 1:
        paths = np.concatenate([paths, rank[:, None]], axis=1)
    used = [int(len(np.unique(c))) for c in columns]
    report = SemanticIdReport(
        n_items=n,
        levels=levels,
        level_sizes=sizes + ([max_group] if max_group > 1 else []),
        codes_used=used,
        utilisation=[u / s for u, s in zip(used, sizes, strict=True)],
        colliding_items=colliding_items,
        colliding_groups=colliding_groups,
        max_group_size=max_group,
        extra_level_size=max_group if max_group > 1 else 0,
        reconstruction_mse=float((residual**2).sum(axis=1).mean()),
    )
    return SemanticIds(codes=paths.astype(np.int64), level_sizes=report.level_sizes, report=report)

"""The trie of valid semantic-ID paths, laid out for one vectorised gather per decoding step.

Layout (after STATIC): nodes are numbered breadth-first at build time (root 0, then depth 1, ...);
the children of node n are the CSR edges ``offsets[n]:offsets[n+1]`` with their codes sorted, so a
beam step looks up all rows' children with one gather whose cost follows the frontier's fan-out,
never the vocabulary or the catalogue. The root's row is the dense first level (all of its codes).

The live catalogue changes without a rebuild: withdrawal only decrements ``live_count`` along the
item's path (dead nodes are then banned for everybody by the generator), and addition appends the
missing nodes and re-derives the edge arrays from the (parent, code) table in one sort. Existing node
ids never change, so a batch that is already decoding keeps a consistent snapshot.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TrieTensors:
    """An immutable snapshot of the trie for one batch (swapped whole when the catalogue changes)."""

    offsets: torch.Tensor  # (N+1,) int64
    child_codes: torch.Tensor  # (E,) int64, sorted within each node
    child_nodes: torch.Tensor  # (E,) int64
    edge_keys: torch.Tensor  # (E,) int64 parent * max_code + code, ascending: (node, code) -> edge lookup
    live_count: torch.Tensor  # (N,) int64 live items under each node
    dead_nodes: torch.Tensor  # (X,) int64 sorted: nodes with no live item below (withdrawn)
    path_nodes: torch.Tensor  # (I, D) int64 node id at depth 1..D of each item's path
    node_item: torch.Tensor  # (N,) int64 item index of a leaf, -1 elsewhere
    item_codes: torch.Tensor  # (I, D) int64 code path of each item (live or not)
    item_live: torch.Tensor  # (I,) bool
    max_code: int

    @property
    def num_nodes(self) -> int:
        return int(self.live_count.shape[0])

    def child_of(self, node: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Child node reached from ``node`` by ``code`` (same shapes), -1 where there is no such edge."""
        keys = node.clamp(min=0) * self.max_code + code.clamp(min=0)
        pos = torch.searchsorted(self.edge_keys, keys).clamp_(max=self.edge_keys.numel() - 1)
        found = (self.edge_keys[pos] == keys) & (node >= 0) & (code >= 0)
        return torch.where(found, self.child_nodes[pos], -1)


class TrieIndex:
    """Item <-> code path bijection plus the CSR trie of live paths."""

    def __init__(self, paths: np.ndarray, level_sizes: list[int]):
        paths = np.asarray(paths, dtype=np.int64)
        if paths.ndim != 2 or paths.shape[0] == 0:
            raise ValueError(f"paths must be a non-empty (items, depth) array, got shape {paths.shape}")
        if paths.shape[1] != len(level_sizes):
            raise ValueError(f"paths have depth {paths.shape[1]} but level_sizes has {len(level_sizes)} levels")
        for level, size in enumerate(level_sizes):
            col = paths[:, level]
            if col.min() < 0 or col.max() >= size:
                raise ValueError(f"level {level} codes must lie in [0, {size}), got [{col.min()}, {col.max()}]")
        self.level_sizes = list(level_sizes)
        self.depth = len(level_sizes)
        self.max_code = max(level_sizes)
        self._lock = threading.Lock()
        self._path_to_item: dict[tuple[int, ...], int] = {}
        for item, row in enumerate(map(tuple, paths.tolist())):
            if row in self._path_to_item:
                raise ValueError(f"items {self._path_to_item[row]} and {item} share the path {row}")
            self._path_to_item[row] = item
        self._build(paths)
        self._snapshot = self._make_snapshot()

    # ---- construction -------------------------------------------------------------------------

    def _build(self, paths: np.ndarray) -> None:
        """Breadth-first node table: parent, code and depth of every node, and each item's path."""
        n_items, depth = paths.shape
        parent = [np.array([-1], dtype=np.int64)]
        code = [np.array([-1], dtype=np.int64)]
        prev_ids = np.zeros(n_items, dtype=np.int64)  # node of each item's prefix at the previous depth
        path_nodes = np.zeros((n_items, depth), dtype=np.int64)
        next_id = 1
        for d in range(depth):
            keys = prev_ids * self.max_code + paths[:, d]
            uniq, inverse = np.unique(keys, return_inverse=True)
            ids = next_id + inverse
            parent.append(uniq // self.max_code)
            code.append(uniq % self.max_code)
            path_nodes[:, d] = ids
            prev_ids = ids
            next_id += len(uniq)
        self._parent = np.concatenate(parent)
        self._code = np.concatenate(code)
        self._path_nodes = path_nodes
        self._node_item = np.full(next_id, -1, dtype=np.int64)
        self._node_item[path_nodes[:, -1]] = np.arange(n_items)
        self._live = np.ones(n_items, dtype=bool)

    def _make_snapshot(self) -> TrieTensors:
        n_nodes = len(self._parent)
        order = np.lexsort((self._code[1:], self._parent[1:])) + 1  # edges sorted by (parent, code)
        edge_parent = self._parent[order]
        offsets = np.zeros(n_nodes + 1, dtype=np.int64)
        np.add.at(offsets, edge_parent + 1, 1)
        offsets = np.cumsum(offsets)
        live_count = np.zeros(n_nodes, dtype=np.int64)
        live_paths = self._path_nodes[self._live]
        np.add.at(live_count, live_paths.reshape(-1), 1)
        live_count[0] = int(self._live.sum())
        dead = np.flatnonzero(live_count == 0)
        return TrieTensors(
            offsets=torch.from_numpy(offsets),
            child_codes=torch.from_numpy(self._code[order].copy()),
            child_nodes=torch.from_numpy(order.astype(np.int64)),
            edge_keys=torch.from_numpy(edge_parent * self.max_code + self._code[order]),
            live_count=torch.from_numpy(live_count),
            dead_nodes=torch.from_numpy(dead.astype(np.int64)),
            path_nodes=torch.from_numpy(self._path_nodes.copy()),
            node_item=torch.from_numpy(self._node_item.copy()),
            item_codes=torch.from_numpy(self._code[self._path_nodes]),
            item_live=torch.from_numpy(self._live.copy()),
            max_code=self.max_code,
        )

    # ---- queries ------------------------------------------------------------------------------

    @property
    def tensors(self) -> TrieTensors:
        """The current snapshot; callers keep it for the whole batch."""
        return self._snapshot

    @property
    def num_items(self) -> int:
        return len(self._live)

    @property
    def num_live(self) -> int:
        return int(self._live.sum())

    def is_live(self, item: int) -> bool:
        return 0 <= item < len(self._live) and bool(self._live[item])

    def item_of_path(self, path: tuple[int, ...] | list[int]) -> int | None:
        """The item a full path names, or None if no live item has it."""
        item = self._path_to_item.get(tuple(int(c) for c in path))
        return item if item is not None and self._live[item] else None

    def path_of_item(self, item: int) -> tuple[int, ...]:
        return tuple(int(self._code[n]) for n in self._path_nodes[item])

    def children(self, nodes: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(codes, child nodes) of each given node, live children only."""
        snap = self._snapshot
        offsets = snap.offsets.numpy()
        live = snap.live_count.numpy()
        out = []
        for n in np.asarray(nodes, dtype=np.int64).tolist():
            codes = snap.child_codes[offsets[n] : offsets[n + 1]].numpy()
            kids = snap.child_nodes[offsets[n] : offsets[n + 1]].numpy()
            keep = live[kids] > 0
            out.append((codes[keep], kids[keep]))
        return out

    # ---- live changes -------------------------------------------------------------------------

    def withdraw(self, items: list[int]) -> None:
        """Take items out of the live catalogue; beams can no longer reach them."""
        with self._lock:
            for item in items:
                if not 0 <= item < len(self._live):
                    raise KeyError(f"unknown item index {item}")
                self._live[item] = False
            self._snapshot = self._make_snapshot()

    def add(self, path: tuple[int, ...] | list[int]) -> int:
        """Make a path live; re-activates a withdrawn item or appends a new one. Returns its index."""
        path = tuple(int(c) for c in path)
        if len(path) != self.depth:
            raise ValueError(f"path {path} has depth {len(path)}, the trie has depth {self.depth}")
        for level, c in enumerate(path):
            if not 0 <= c < self.level_sizes[level]:
                raise ValueError(f"code {c} at level {level} is outside [0, {self.level_sizes[level]})")
        with self._lock:
            existing = self._path_to_item.get(path)
            if existing is not None:
                self._live[existing] = True
            else:
                existing = self._append_path(path)
            self._snapshot = self._make_snapshot()
            return existing

    def _append_path(self, path: tuple[int, ...]) -> int:
        node = 0
        nodes = []
        for c in path:
            kids = np.flatnonzero((self._parent == node) & (self._code == c))
            if len(kids):
                node = int(kids[0])
            else:
                self._parent = np.append(self._parent, node)
                self._code = np.append(self._code, c)
                self._node_item = np.append(self._node_item, -1)
                node = len(self._parent) - 1
            nodes.append(node)
        item = len(self._live)
        self._node_item[node] = item
        self._path_nodes = np.vstack([self._path_nodes, np.array(nodes, dtype=np.int64)[None]])
        self._live = np.append(self._live, True)
        self._path_to_item[path] = item
        return item

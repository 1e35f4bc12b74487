"""TrieIndex: every path it yields is a catalogue item; withdrawal and addition are exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec.trie import TrieIndex


def walk_all_paths(trie: TrieIndex) -> set[tuple[int, ...]]:
    """Depth-first enumeration through the batched children lookup only."""
    out: set[tuple[int, ...]] = set()
    frontier: list[tuple[int, tuple[int, ...]]] = [(0, ())]
    while frontier:
        node, prefix = frontier.pop()
        if len(prefix) == trie.depth:
            out.add(prefix)
            continue
        ((codes, kids),) = trie.children(np.array([node]))
        frontier.extend((int(k), prefix + (int(c),)) for c, k in zip(codes, kids))
    return out


@st.composite
def catalogues(draw: st.DrawFn) -> tuple[np.ndarray, list[int]]:
    depth = draw(st.integers(1, 4))
    sizes = [draw(st.integers(1, 5)) for _ in range(depth)]
    space = int(np.prod(sizes))
    n = draw(st.integers(1, min(space, 40)))
    flat = draw(st.lists(st.integers(0, space - 1), min_size=n, max_size=n, unique=True))
    paths = np.array(np.unravel_index(np.array(flat), sizes)).T.reshape(n, depth)
    return paths, sizes


@settings(max_examples=60, deadline=None)
@given(catalogues(), st.data())
def test_paths_are_exactly_the_catalogue_and_withdrawal_removes_one_item(cat, data) -> None:
    paths, sizes = cat
    trie = TrieIndex(paths, sizes)
    assert walk_all_paths(trie) == {tuple(int(c) for c in p) for p in paths}
    for item, p in enumerate(paths):
        assert trie.item_of_path(tuple(p)) == item
        assert trie.path_of_item(item) == tuple(int(c) for c in p)
    gone = data.draw(st.integers(0, len(paths) - 1))
    trie.withdraw([gone])
    expected = {tuple(int(c) for c in p) for i, p in enumerate(paths) if i != gone}
    assert walk_all_paths(trie) == expected
    assert trie.item_of_path(tuple(paths[gone])) is None
    # every node on the withdrawn path with no other live item below is dead; no other node is
    snap = trie.tensors
    dead = set(snap.dead_nodes.tolist())
    for node in snap.path_nodes[gone].tolist():
        still_live = any(node in snap.path_nodes[i].tolist() for i in range(len(paths)) if i != gone)
        assert (node in dead) == (not still_live)


@settings(max_examples=40, deadline=None)
@given(catalogues(), st.data())
def test_add_restores_or_appends_without_renumbering(cat, data) -> None:
    paths, sizes = cat
    trie = TrieIndex(paths, sizes)
    before = trie.tensors.path_nodes.clone()
    space = [tuple(int(c) for c in p) for p in np.ndindex(*sizes)]
    fresh = [p for p in space if trie.item_of_path(p) is None]
    if fresh:
        new_path = data.draw(st.sampled_from(fresh))
        item = trie.add(new_path)
        assert item == len(paths)
        assert trie.item_of_path(new_path) == item
        assert walk_all_paths(trie) == {tuple(int(c) for c in p) for p in paths} | {new_path}
    assert torch.equal(trie.tensors.path_nodes[: len(paths)], before)  # existing node ids are stable
    trie.withdraw([0])
    assert trie.add(tuple(int(c) for c in paths[0])) == 0  # a withdrawn item comes back under its index
    assert trie.item_of_path(tuple(paths[0])) == 0


def test_child_of_matches_children() -> None:
    paths = np.array([[0, 1], [0, 2], [1, 0], [2, 2]])
    trie = TrieIndex(paths, [3, 3])
    snap = trie.tensors
    for node in range(snap.num_nodes):
        ((codes, kids),) = trie.children(np.array([node]))
        for code in range(3):
            got = int(snap.child_of(torch.tensor([node]), torch.tensor([code]))[0])
            want = int(kids[list(codes).index(code)]) if code in codes else -1
            assert got == want


def test_rejects_colliding_paths_and_bad_codes() -> None:
    with pytest.raises(ValueError, match="share the path"):
        TrieIndex(np.array([[0, 1], [0, 1]]), [2, 2])
    with pytest.raises(ValueError, match="level 1"):
        TrieIndex(np.array([[0, 3]]), [2, 2])

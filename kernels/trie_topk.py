"""Dispatcher for the trie-constrained log-softmax + top-k.

One beam-search step for every (request, beam) row: the row sits on trie node ``node[r]``; its
allowed next codes are the CSR children of that node minus banned child nodes; the answer is
the top-k of the log-softmax renormalised over the allowed children only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kernels.dispatch import Backend, KernelBackendError, choose_backend, is_auto
from kernels.pytorch.pt_trie_topk import pt_trie_topk


class TrieTopK(NamedTuple):
    values: torch.Tensor  # (R, k) float32 log-probs over allowed children; -inf past the last allowed
    codes: torch.Tensor  # (R, k) int64 child codes; -1 where values is -inf
    nodes: torch.Tensor  # (R, k) int64 child node ids; -1 where values is -inf


def trie_topk(
    logits: torch.Tensor,
    node: torch.Tensor,
    offsets: torch.Tensor,
    child_codes: torch.Tensor,
    child_nodes: torch.Tensor,
    k: int,
    banned_keys: torch.Tensor,
    row_groups: torch.Tensor,
    num_nodes: int,
    backend: str | None = None,
    at_root: bool = False,
) -> TrieTopK:
    """Top-k allowed children of each row's trie node, with log-probs renormalised over them.

    logits: (R, V) scores over this level's code vocabulary (any float dtype; math in float32).
    node: (R,) int64 current trie node of each row; -1 marks a dead row (no children, all -inf).
    offsets: (N+1,) int64 CSR offsets; children of n are edges offsets[n]..offsets[n+1].
    child_codes, child_nodes: (E,) int64 per edge, child codes sorted within a node.
    banned_keys: (B,) int64 sorted ascending, each ``group * num_nodes + node``.
    row_groups: (R, G) int64: child c of row r is banned if ``row_groups[r, g] * num_nodes + c``
        is in banned_keys for some g (requests share a group; a beam's own session is another).
    Rows with fewer than k allowed children are filled with -inf / -1; a row with none dies.
    backend: "torch" or "triton" to force one, None or "auto" to let ``trie_topk_backend`` decide.
    at_root: the caller knows every row sits at the root (the dense first level); only used to pick
        the faster backend, since telling root rows from deep ones here would need a host sync.
    """
    if trie_topk_backend(logits, backend, at_root) == "triton":
        from kernels.triton.triton_trie_topk import triton_trie_topk

        out = triton_trie_topk(logits, node, offsets, child_codes, child_nodes, k, banned_keys, row_groups, num_nodes)
    else:
        out = pt_trie_topk(logits, node, offsets, child_codes, child_nodes, k, banned_keys, row_groups, num_nodes)
    return TrieTopK(*out)


def trie_topk_backend(logits: torch.Tensor, backend: str | None, at_root: bool) -> Backend:
    """The one decision of which implementation answers this call.

    ``choose_backend`` first (a forced backend, else by device); then, when Triton was picked but not
    forced, the shapes where the PyTorch twin is faster or the kernel has no block wide enough go to
    the twin. A forced Triton on a vocabulary the kernel cannot hold is refused, never rerouted.
    """
    chosen = choose_backend(logits, backend)
    if chosen == "torch":
        return chosen
    from kernels.triton.triton_trie_topk import MAX_BLOCK

    too_wide = logits.shape[1] > MAX_BLOCK
    if not is_auto(backend):
        if too_wide:
            raise KernelBackendError(
                f"kernel backend 'triton' forced, but a {logits.shape[1]}-code level is wider than the kernel's "
                f"widest block ({MAX_BLOCK}); leave the backend to the dispatcher"
            )
        return chosen
    return "torch" if too_wide or _twin_is_faster(logits, at_root) else chosen


def _twin_is_faster(logits: torch.Tensor, at_root: bool) -> bool:
    """Shapes where the PyTorch twin beat the kernel on the H100 (benchmarks/results/kernels-h100.json).

    At 65,536 rows on deep nodes (about 96 children) of an 8,192-code level, the twin took 2.64 ms and
    the kernel 3.66 ms: the kernel's launch is sized for the widest (root) rows, wasting warps on narrow
    ones. At the root the kernel is 5x faster than the twin, so only deep steps of wide levels switch.
    Only applied when the backend is left to the dispatcher (``trie_topk_backend``).
    """
    if at_root:
        return False
    rows, vocab = logits.shape
    return rows >= 32768 and vocab >= 8192

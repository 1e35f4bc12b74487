"""PyTorch trie-constrained log-softmax + top-k: the CPU production path and the Triton reference.

Work is proportional to the children of the rows' trie nodes (CSR), never to the vocabulary:
the only (rows, C) tensors are over C = the widest frontier node's child count.
"""

from __future__ import annotations

import torch


def banned_mask(
    child_nodes: torch.Tensor, banned_keys: torch.Tensor, row_groups: torch.Tensor, num_nodes: int
) -> torch.Tensor:
    """True where child node n of row r is banned for any group g of the row.

    child_nodes: (R, C) int64; banned_keys: (N,) sorted int64 of group * num_nodes + node;
    row_groups: (R, G) int64 -> (R, C) bool.
    """
    hit = torch.zeros(child_nodes.shape, dtype=torch.bool, device=child_nodes.device)
    if banned_keys.numel() == 0:
        return hit
    last = banned_keys.numel() - 1
    for g in range(row_groups.shape[1]):
        keys = row_groups[:, g : g + 1] * num_nodes + child_nodes  # (R, C)
        pos = torch.searchsorted(banned_keys, keys).clamp_(max=last)
        hit |= banned_keys[pos] == keys
    return hit


def pt_trie_topk(
    logits: torch.Tensor,
    node: torch.Tensor,
    offsets: torch.Tensor,
    child_codes: torch.Tensor,
    child_nodes: torch.Tensor,
    k: int,
    banned_keys: torch.Tensor,
    row_groups: torch.Tensor,
    num_nodes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See ``kernels.trie_topk.trie_topk``."""
    rows = logits.shape[0]
    live_row = node >= 0  # a row whose beam already died has node -1: no children
    start = offsets[node.clamp(min=0)]  # (R,)
    count = torch.where(live_row, offsets[node.clamp(min=0) + 1] - start, 0)  # (R,)
    width = int(count.max().item()) if rows else 0
    if width == 0:
        return _empty(rows, k, logits.device)
    ar = torch.arange(width, device=logits.device)
    allowed = ar[None, :] < count[:, None]  # (R, C)
    edge = (start[:, None] + ar[None, :]).clamp_(max=max(child_codes.numel() - 1, 0))
    codes = torch.where(allowed, child_codes[edge], 0)  # (R, C); padding reads code 0
    nodes = torch.where(allowed, child_nodes[edge], -1)  # (R, C)
    allowed &= ~banned_mask(nodes, banned_keys, row_groups, num_nodes)
    picked = logits.gather(1, codes).float()  # (R, C)
    picked = picked.masked_fill(~allowed, float("-inf"))
    norm = torch.logsumexp(picked, dim=1, keepdim=True)  # (R, 1); -inf for dead rows
    logp = picked - torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))
    take = min(k, width)
    values, pos = logp.topk(take, dim=1)  # (R, take)
    out_codes = codes.gather(1, pos)
    out_nodes = nodes.gather(1, pos)
    alive = torch.isfinite(values)
    out_codes = torch.where(alive, out_codes, -1)
    out_nodes = torch.where(alive, out_nodes, -1)
    if take < k:
        pad = k - take
        values = torch.cat([values, values.new_full((rows, pad), float("-inf"))], dim=1)
        out_codes = torch.cat([out_codes, out_codes.new_full((rows, pad), -1)], dim=1)
        out_nodes = torch.cat([out_nodes, out_nodes.new_full((rows, pad), -1)], dim=1)
    return values, out_codes, out_nodes


def _empty(rows: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values = torch.full((rows, k), float("-inf"), device=device)
    filler = torch.full((rows, k), -1, dtype=torch.int64, device=device)
    return values, filler, filler.clone()

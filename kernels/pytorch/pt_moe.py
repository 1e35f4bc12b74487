"""PyTorch sparse Mixture-of-Experts FFN: the CPU production path and the Triton kernel's reference.

Routing (softmax gate, top-k, renormalisation), grouping of (token, expert) pairs by expert,
one SwiGLU GEMM chain per expert over its rows, and a weighted scatter-add back to token order.
Differentiable, so training uses it too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pt_route(
    x: torch.Tensor, router_weight: torch.Tensor, top_k: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate weights and expert ids of each token.

    x: (T, d); router_weight: (E, d) -> weights (T, top_k) float32 (float64 for float64 x), experts (T, top_k) int64.
    """
    logits = x @ router_weight.t()  # (T, E)
    probs = torch.softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)  # (T, k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def pt_moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    renormalize: bool = True,
) -> torch.Tensor:
    """y_t = sum_{e in topk(t)} g_te * W_down_e (silu(x_t W_gate_e) * (x_t W_up_e)).

    x: (T, d); router_weight: (E, d); w_gate, w_up: (E, d, f); w_down: (E, f, d) -> (T, d).
    """
    num_tokens, _ = x.shape
    num_experts = router_weight.shape[0]
    weights, experts = pt_route(x, router_weight, top_k, renormalize)
    flat_expert = experts.reshape(-1)  # (T*k,)
    order = torch.argsort(flat_expert, stable=True)  # pairs grouped by expert
    token_of_pair = order // top_k  # (T*k,)
    counts = torch.bincount(flat_expert, minlength=num_experts).tolist()
    grouped_x = x[token_of_pair]  # (T*k, d)
    outs = []
    for e, rows in enumerate(grouped_x.split(counts)):
        if rows.shape[0] == 0:
            continue
        hidden = F.silu(rows @ w_gate[e]) * (rows @ w_up[e])  # (n_e, f)
        outs.append(hidden @ w_down[e])  # (n_e, d)
    if not outs:
        return torch.zeros_like(x)
    grouped_y = torch.cat(outs)  # (T*k, d)
    pair_weight = weights.reshape(-1)[order].to(grouped_y.dtype)
    y = torch.zeros(num_tokens, x.shape[1], dtype=grouped_y.dtype, device=x.device)
    y.index_add_(0, token_of_pair, grouped_y * pair_weight[:, None])
    return y.to(x.dtype)

"""The MoE dispatcher's PyTorch path against a naive per-token loop over experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.moe import moe


def naive_moe(x, router, w_gate, w_up, w_down, top_k, renormalize=True):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(x[t] @ router.t(), dim=-1)
        weights, experts = probs.topk(top_k)
        if renormalize:
            weights = weights / weights.sum()
        for w, e in zip(weights, experts):
            h = F.silu(x[t] @ w_gate[e]) * (x[t] @ w_up[e])
            out[t] += w * (h @ w_down[e])
    return out


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 33),
    experts=st.integers(1, 9),
    d=st.integers(1, 24),
    f=st.integers(1, 24),
    data=st.data(),
    renormalize=st.booleans(),
)
def test_torch_moe_equals_naive_loop(tokens, experts, d, f, data, renormalize) -> None:
    top_k = data.draw(st.integers(1, experts))
    g = torch.Generator().manual_seed(tokens * 1000 + experts * 10 + d)
    x = torch.randn(tokens, d, generator=g, dtype=torch.float64)
    router = torch.randn(experts, d, generator=g, dtype=torch.float64)
    w_gate, w_up = (torch.randn(experts, d, f, generator=g, dtype=torch.float64) for _ in range(2))
    w_down = torch.randn(experts, f, d, generator=g, dtype=torch.float64)
    got = moe(x, router, w_gate, w_up, w_down, top_k, renormalize, backend="torch")
    want = naive_moe(x, router, w_gate, w_up, w_down, top_k, renormalize)
    torch.testing.assert_close(got, want)


def test_one_expert_takes_every_token_and_others_get_none() -> None:
    x = torch.rand(10, 8, dtype=torch.float64) + 0.1  # positive inputs: expert 2's logit is largest for all
    router = torch.zeros(4, 8, dtype=torch.float64)
    router[2] = 10.0
    w_gate, w_up = (torch.randn(4, 8, 5, dtype=torch.float64) for _ in range(2))
    w_down = torch.randn(4, 5, 8, dtype=torch.float64)
    got = moe(x, router, w_gate, w_up, w_down, 1, backend="torch")
    torch.testing.assert_close(got, naive_moe(x, router, w_gate, w_up, w_down, 1))
    only = F.silu(x @ w_gate[2]) * (x @ w_up[2]) @ w_down[2]
    torch.testing.assert_close(got, only)


def test_torch_moe_is_differentiable() -> None:
    x = torch.randn(6, 8, requires_grad=True)
    router = torch.randn(3, 8, requires_grad=True)
    w = [
        torch.randn(3, 8, 4, requires_grad=True),
        torch.randn(3, 8, 4, requires_grad=True),
        torch.randn(3, 4, 8, requires_grad=True),
    ]
    moe(x, router, *w, 2).sum().backward()
    assert x.grad is not None and router.grad is not None and all(t.grad is not None for t in w)
    assert float(router.grad.abs().sum()) > 0  # the gate weights carry gradient to the router

"""Dispatcher for the sparse Mixture-of-Experts SwiGLU FFN of the decoder."""

from __future__ import annotations

import torch

from kernels.dispatch import choose_backend
from kernels.pytorch.pt_moe import pt_moe


def moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    renormalize: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Route each token to its top_k experts (softmax gate) and combine their SwiGLU outputs.

    x: (T, d); router_weight: (E, d); w_gate, w_up: (E, d, f); w_down: (E, f, d) -> (T, d).
    With ``renormalize`` the kept gate weights of a token are rescaled to sum to one.
    backend: "torch" or "triton" to force one, None or "auto" for Triton on CUDA (see ``kernels.dispatch``).
    The Triton path is for inference (no autograd): a call that needs gradients runs the PyTorch path,
    whatever the backend; that is this dispatcher's decision, the kernel has no fallback of its own.
    """
    chosen = choose_backend(x, backend)
    if chosen == "triton" and not (torch.is_grad_enabled() and x.requires_grad):
        from kernels.triton.triton_moe import triton_moe

        return triton_moe(x, router_weight, w_gate, w_up, w_down, top_k, renormalize)
    return pt_moe(x, router_weight, w_gate, w_up, w_down, top_k, renormalize)
